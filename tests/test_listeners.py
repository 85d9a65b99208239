"""Where ``serve`` listens: IPv6 and IPv4 on one default listener, several listeners per kind,
and IPv4 clients of a dual-stack socket shown as the IPv4 addresses they are.

End to end: a real ``autocert serve`` with a certificate from Pebble, a real upstream, and
clients on 127.0.0.1 and ::1.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

import pytest
from support import ServeProcess, eventually, free_port, run_cli, served_certificate
from test_proxy import Upstream, header_values

from autocert._config import Listen, listening_sockets

NAME = "dual.example.test"


def ipv6_loopback_works() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not ipv6_loopback_works(), reason="::1 cannot be bound on this machine")


def free_port_both() -> int:
    """A port free on 127.0.0.1 and ::1 alike."""
    while True:
        port = free_port()
        try:
            with socket.create_server(("::1", port), family=socket.AF_INET6):
                return port
        except OSError:
            continue


def get(address: str, port: int, root_ca: str, path: str = "/echo") -> tuple[int, bytes]:
    """A verified TLS request for NAME sent to ``address``."""
    context = ssl.create_default_context(cafile=root_ca)
    with socket.create_connection((address, port), timeout=30) as raw, context.wrap_socket(raw, server_hostname=NAME) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
        response.begin()
        return response.status, response.read()


def redirect(address: str, port: int) -> str:
    """Where the http listener sends a client that names no host (HTTP/1.0 without Host)."""
    with socket.create_connection((address, port), timeout=30) as sock:
        sock.sendall(b"GET /page HTTP/1.0\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 308
        return response.getheader("Location") or ""


def test_the_default_host_serves_ipv4_and_ipv6_and_forwards_ipv4_clients_as_ipv4(pebble, root_ca: str, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'dual.db'}"
    assert run_cli("allow", NAME, db=db).returncode == 0
    upstream = Upstream().start()
    https, plain = pebble.tlsalpn01_port, pebble.http01_port
    server = ServeProcess(db, pebble, tmp_path, https_port=https, http_port=plain,
                          extra=["--https", f":{https}", "--http", f":{plain}", "--upstream", f"http://127.0.0.1:{upstream.port}"])
    try:
        server.start()
        assert f"https listening on https://[::]:{https}" in server.stdout_path.read_text()
        served_certificate(https, NAME, root_ca)
        upstream.requests.clear()
        for address in ("127.0.0.1", "::1"):
            status, _ = get(address, https, root_ca)
            assert status == 200, address
        ipv4, ipv6 = upstream.requests
        assert header_values(ipv4, "X-Forwarded-For") == ["127.0.0.1"] and header_values(ipv4, "X-Real-IP") == ["127.0.0.1"]
        assert header_values(ipv4, "Forwarded") == [f"for=127.0.0.1;host={NAME};proto=https"]
        assert header_values(ipv6, "X-Forwarded-For") == ["::1"]
        assert header_values(ipv6, "Forwarded") == [f'for="[::1]";host={NAME};proto=https']
        assert redirect("127.0.0.1", plain) == f"https://127.0.0.1:{https}/page"
        assert redirect("::1", plain) == f"https://[::1]:{https}/page"
        log = eventually(lambda: (text := server.stderr_path.read_text()).count('"GET /echo HTTP/1.1" 200') >= 2 and text,
                         what="the access log lines")
        assert " 127.0.0.1 [" in log and " ::1 [" in log and "::ffff:" not in log, log[-2000:]
    finally:
        server.stop()
        upstream.stop()


def test_several_listeners_from_repeated_options_and_comma_lists(pebble, root_ca: str, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'many.db'}"
    assert run_cli("allow", NAME, db=db).returncode == 0
    second_https, second_http = free_port_both(), free_port_both()
    https, plain = pebble.tlsalpn01_port, pebble.http01_port
    server = ServeProcess(db, pebble, tmp_path, https_port=https, http_port=plain,
                          extra=["--http", f"127.0.0.1:{plain}", "--http", f"[::1]:{second_http}"],
                          env={"AUTOCERT_HTTPS": f"127.0.0.1:{https},[::1]:{second_https}"})
    server.argv[server.argv.index("--https"):server.argv.index("--https") + 2] = []
    with server:
        eventually(lambda: server.stdout_path.read_text().count("listening on") == 5, what="five listeners")
        served_certificate(https, NAME, root_ca)
        for address, port in (("127.0.0.1", https), ("::1", second_https)):
            status, body = get(address, port, root_ca, "/")
            assert status == 200 and body == f"autocert is serving {NAME} over HTTPS\n".encode(), (address, port)
        assert redirect("127.0.0.1", plain) == f"https://127.0.0.1:{https}/page"
        assert redirect("::1", second_http) == f"https://[::1]:{https}/page", "redirects go to the first https listener's port"
        with pytest.raises(OSError):
            socket.create_connection(("::1", https), timeout=5).close()


def test_without_dual_stack_sockets_every_address_is_one_socket_per_family(monkeypatch: pytest.MonkeyPatch) -> None:
    """Systems that cannot turn IPV6_V6ONLY off get ``[::]`` as two sockets on one port."""
    monkeypatch.setattr(socket, "has_dualstack_ipv6", lambda: False)
    socks = listening_sockets(Listen("::", 0))
    try:
        assert [sock.family for sock in socks] == [socket.AF_INET6, socket.AF_INET]
        assert socks[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        port = socks[0].getsockname()[1]
        assert socks[1].getsockname() == ("0.0.0.0", port)
        for sock, address in zip(socks, ("::1", "127.0.0.1")):
            sock.setblocking(True)
            with socket.create_connection((address, port), timeout=10):
                sock.accept()[0].close()
    finally:
        for sock in socks:
            sock.close()
