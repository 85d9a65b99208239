"""A second ``serve`` on the same listeners takes them over from the running one, and stopping
the first then drops nothing: the upgrade path of systemd, Compose and blue/green deploys."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pebble import Pebble, wait_for
from support import Requests, ServeProcess, run_cli, served_certificate

NAME = "handover.example.test"


def logged(server: ServeProcess) -> str:
    return server.stdout_path.read_text() + server.stderr_path.read_text()


@pytest.mark.parametrize(("workers", "then"), [("1", "1"), ("1", "2"), ("2", "1")])
def test_a_second_serve_takes_over_the_listeners_and_stopping_the_first_drops_nothing(pebble: Pebble, tmp_path: Path, workers: str,
                                                                                       then: str) -> None:
    """Also from one process to a supervisor of two workers, and back."""
    db = f"sqlite:///{tmp_path / 'handover.db'}"
    assert run_cli("allow", NAME, db=db).returncode == 0
    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    extra = ["--workers", workers]
    first = ServeProcess(db, pebble, tmp_path, extra=extra).start(timeout=120)
    second = ServeProcess(db, pebble, tmp_path, extra=["--workers", then], admin_port=first.admin_port)
    try:
        assert first.process is not None
        served_certificate(first.https_port, NAME, str(root))
        with Requests(first.https_port, NAME, str(root)) as clients:
            clients.more(30, "requests to the first serve")
            second.start(timeout=120)
            assert second.process is not None
            assert f"from the running serve (pid {first.process.pid})" in logged(second)
            clients.more(30, "requests while both serve")
            assert first.stop(timeout=60) == 0
            assert "handed the listeners to a new serve" in logged(first)
            clients.more(100, "requests after the first stopped")
        assert not clients.failures, f"{len(clients.failures)} requests failed: {clients.failures[:5]}"
        assert second.process.poll() is None
        # The second answers the next one in turn: it took the name over when the first let go.
        third = ServeProcess(db, pebble, tmp_path, extra=extra, admin_port=first.admin_port).start(timeout=120)
        try:
            assert f"from the running serve (pid {second.process.pid})" in logged(third)
        finally:
            assert third.stop(timeout=60) == 0
    finally:
        first.stop(timeout=60)
        second.stop(timeout=60)


_FOREIGN_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
sock.settimeout(30)
sock.connect(bytes.fromhex(sys.argv[1]))
data, fds, _flags, _address = socket.recv_fds(sock, 65536, 10)
print(len(data), len(fds))
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root, to ask as another user")
def test_another_user_gets_no_listeners(pebble: Pebble, tmp_path: Path) -> None:
    from autocert._cli import serve_settings
    from autocert._handover import offer_name
    from autocert._parser import parse_arguments

    db = f"sqlite:///{tmp_path / 'foreign.db'}"
    server = ServeProcess(db, pebble, tmp_path, extra=["--http", "none", "--admin", "none"]).start()
    try:
        name = offer_name(serve_settings(parse_arguments(["serve", "--https", f"127.0.0.1:{server.https_port}",
                                                         "--http", "none", "--admin", "none"])).options)
        assert name is not None
        nobody = subprocess.run(["python3", "-c", _FOREIGN_CLIENT, name.hex()], capture_output=True, text=True, timeout=60,
                                user=65534, group=65534, cwd="/")
        assert nobody.returncode == 0, nobody.stderr
        assert nobody.stdout.split() == ["0", "0"], "a process of another user must get nothing"
        wait_for(lambda: "refused the listeners to a process of user 65534" in logged(server), timeout=30, what="the refusal in the log")
    finally:
        server.stop()
