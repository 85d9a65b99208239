"""A request must name the host its TLS connection was made for, or it gets 421.

End to end: a real ``autocert serve`` with certificates from Pebble, a real upstream, and
TLS clients that send one name in SNI and another in ``Host``. The rule itself (ports, case,
trailing dots, IDNA, absolute targets, pipelining) is pinned in process in tests/test_http.py.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

from support import ServeProcess, run_cli, served_certificate
from test_proxy import Upstream

NAME = "421.example.test"
OTHER = "other421.example.test"


def ask(port: int, root_ca: str, sni: str | None, host: str, target: str = "/echo") -> tuple[int, bytes]:
    """One request on a new TLS connection made for ``sni`` (None: no SNI), naming ``host``."""
    context = ssl.create_default_context(cafile=root_ca)
    if sni is None:
        context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, context.wrap_socket(raw, server_hostname=sni) as tls:
        tls.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
        response.begin()
        return response.status, response.read()


def test_misdirected_requests_get_421_and_never_reach_the_upstream(pebble, root_ca: str, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hosts.db'}"
    assert run_cli("allow", NAME, OTHER, db=db).returncode == 0
    upstream = Upstream().start()
    server = ServeProcess(db, pebble, tmp_path, extra=["--upstream", f"http://127.0.0.1:{upstream.port}", "--default-name", NAME])
    try:
        server.start()
        for name in (NAME, OTHER):
            served_certificate(server.https_port, name, root_ca)
        port = server.https_port
        upstream.requests.clear()
        for sni, host, target in [(NAME, OTHER, "/echo"), (NAME, f"{OTHER}:{port}", "/echo"), (OTHER, NAME, "/echo"),
                                  (None, OTHER, "/echo"), (NAME, NAME, f"https://{OTHER}/echo")]:
            status, body = ask(port, root_ca, sni, host, target)
            assert status == 421 and b"421 Misdirected Request" in body, (sni, host, target, status)
        assert upstream.requests == [], "a misdirected request must not be forwarded"
        for sni, host in [(NAME, f"{NAME.upper()}.:{port}"), (OTHER, OTHER), (None, NAME)]:
            status, _ = ask(port, root_ca, sni, host)
            assert status == 200, (sni, host, status)
        assert len(upstream.requests) == 3
    finally:
        server.stop()
        upstream.stop()

    unchecked = ServeProcess(db, pebble, tmp_path, env={"AUTOCERT_HOST_CHECK": "off"})
    with unchecked:
        served_certificate(unchecked.https_port, NAME, root_ca)
        status, body = ask(unchecked.https_port, root_ca, NAME, OTHER, "/")
        assert status == 200 and body == f"autocert is serving {OTHER} over HTTPS\n".encode()
