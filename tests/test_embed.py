"""The contract's aiohttp embedding snippet, run as written against a real Pebble."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, ServeProcess, cli_env, fetch, free_port, openssl_s_client, port_open, run_cli, served_certificate, wait_for


def test_embedded_app_gets_certificates_and_refuses_unknown_names(pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'embed.db'}"
    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    assert run_cli("allow", "embedded.example.test", "other.example.test", db=db).returncode == 0
    port = free_port()
    env = cli_env({
        "AUTOCERT_DB": db,
        "AUTOCERT_DIRECTORY": pebble.directory_url,
        "AUTOCERT_CA_BUNDLE": pebble.ca_bundle,
        "AUTOCERT_EMAIL": "ops@example.test",
        "EXAMPLE_PORT": str(port),
    })
    log = tmp_path / "embed.log"
    # Port 80 (Pebble's http-01 port) is held by a plain-HTTP serve on the same database: the
    # embedded manager stores its tokens there and that instance answers them.
    with open(log, "wb") as out:
        app = subprocess.Popen([sys.executable, str(REPO / "examples" / "embed_aiohttp.py")], env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port80 = ServeProcess(db, pebble, tmp_path, extra=["--https", "none", "--admin", "none"]).start()
        try:
            wait_for(lambda: app.poll() is None and port_open(port), timeout=30, what="the embedded app to listen")
            certificate = served_certificate(port, "embedded.example.test", str(root), timeout=90)
            assert format(certificate.serial_number, "x")
            assert "alert number 112" in openssl_s_client(port, "unknown.example.test")
            served_certificate(port, "other.example.test", str(root), timeout=90)
            # A request for another allowed name on this name's connection: 421, as serve does.
            assert fetch(port, "embedded.example.test", str(root)) == 200
            assert fetch(port, "embedded.example.test", str(root), host="other.example.test:443") == 421
            assert fetch(port, "other.example.test", str(root), host="OTHER.example.test.") == 200
        finally:
            port80.stop()
    finally:
        app.send_signal(signal.SIGINT)
        try:
            app.wait(timeout=15)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()
            pytest.fail("the embedded example did not stop on SIGINT:\n" + log.read_text())
