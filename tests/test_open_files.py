"""``serve`` at its open-file limit: idle clients make way for new ones, the database, the CA and
the upstream keep the descriptors kept back for them, and WebSockets are never cut for it.

End to end: a real ``autocert serve`` started with a limit of 256 descriptors, a certificate
from Pebble, a real upstream, and 300 idle TLS connections held open at once.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import ssl
from pathlib import Path

import pytest
from aiohttp import WSMsgType
from support import ServeProcess, run_cli, served_certificate, wait_for
from test_hosts import ask
from test_proxy import Upstream, client_session

from autocert._descriptors import reserve_for

NAME = "crowded.example.test"
LIMIT = 256
IDLE_CLIENTS = 300


def hold_idle_connections(port: int, root_ca: str, count: int) -> list[ssl.SSLSocket]:
    """``count`` TLS connections, each through its handshake, none sending a request."""
    context = ssl.create_default_context(cafile=root_ca)
    held = []
    for _ in range(count):
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        held.append(context.wrap_socket(raw, server_hostname=NAME))
    return held


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_idle_clients_make_way_at_the_open_file_limit_and_a_websocket_survives(pebble, root_ca: str, tmp_path: Path,
                                                                                    loop: str) -> None:
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > IDLE_CLIENTS + 100, "the test itself needs the descriptors"
    assert reserve_for(LIMIT) == 64
    db = f"sqlite:///{tmp_path / 'crowded.db'}"
    assert run_cli("allow", NAME, db=db).returncode == 0
    upstream = Upstream().start()
    server = ServeProcess(db, pebble, tmp_path, extra=["--upstream", f"http://127.0.0.1:{upstream.port}"], env={"AUTOCERT_EVENT_LOOP": loop})
    server.launch(open_files=(LIMIT, LIMIT))
    held: list[ssl.SSLSocket] = []
    try:
        wait_for(server.ready, timeout=60, what="serve to listen")
        port = server.https_port
        served_certificate(port, NAME, root_ca)
        async with client_session(root_ca) as session, session.ws_connect(f"wss://{NAME}:{port}/ws") as ws:
            held = await asyncio.to_thread(hold_idle_connections, port, root_ca, IDLE_CLIENTS)
            for _ in range(5):  # new clients get in, and their requests reach the upstream
                status, _ = await asyncio.to_thread(ask, port, root_ca, NAME, NAME)
                assert status == 200
            await ws.send_str("still here")
            message = await ws.receive(timeout=10)
            assert message.type is WSMsgType.TEXT and message.data == "echo:still here", "the WebSocket must not be cut"
        log = server.stderr_path.read_text()
        assert log.count("at the open-file limit") == 1, log[-3000:]
        (line,) = [line for line in log.splitlines() if "at the open-file limit" in line]
        assert " WARNING " in line and f"of {LIMIT} descriptors in use, 64 kept for the database" in line, line
        assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    finally:
        for tls in held:
            tls.close()
        assert server.stop() == 0, server.output()
        upstream.stop()
