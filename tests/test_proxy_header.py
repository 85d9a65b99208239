"""``--trusted-proxies``: a balancer's PROXY protocol header (v1, v2) says who the client is.

The test's balancer connects from 127.0.0.3, the only trusted address; everything else
(the test's plain clients on 127.0.0.1, Pebble validating) is an ordinary peer.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support import ServeProcess, client_context, free_port, run_cli, served_certificate, wait_for

from autocert._proxy_protocol import NotProxyHeader, parse_proxy_header, proxy_header

BALANCER = "127.0.0.3"
NAME = "proxied.autocert.test"


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({key.lower(): value for key, value in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(pebble, db: str, tmp_path: Path, upstream: str, root_ca: str) -> Iterator[ServeProcess]:
    assert run_cli("allow", NAME, db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path, extra=["--upstream", upstream, "--trusted-proxies", f"{BALANCER}/32,10.0.0.0/8"]) as serve:
        served_certificate(serve.https_port, NAME, root_ca)  # from an ordinary peer, no header: issued as usual
        yield serve


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


def _https_get(port: int, header: bytes, root_ca: str, *, source: str = BALANCER) -> dict[str, str]:
    with _connect(port, source) as raw:
        raw.sendall(header)
        with client_context(root_ca).wrap_socket(raw, server_hostname=NAME) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


def _closed_without_answer(port: int, data: bytes, source: str) -> bool:
    with _connect(port, source) as sock:
        sock.sendall(data)
        try:
            return sock.recv(1024) == b""
        except ConnectionResetError:
            return True


def test_v1_and_v2_headers_from_the_balancer_carry_the_client_address(server: ServeProcess, root_ca: str) -> None:
    port = server.https_port
    seen = _https_get(port, proxy_header(1, ("203.0.113.7", 50123), ("192.0.2.1", 443)), root_ca)
    assert seen["x-forwarded-for"] == "203.0.113.7" and seen["x-real-ip"] == "203.0.113.7"
    assert "for=203.0.113.7" in seen["forwarded"]
    seen = _https_get(port, proxy_header(2, ("2001:db8::5", 4711), ("2001:db8::1", 443), authority=NAME), root_ca)
    assert seen["x-forwarded-for"] == "2001:db8::5" and seen["x-real-ip"] == "2001:db8::5"
    assert 'for="[2001:db8::5]"' in seen["forwarded"]
    wait_for(lambda: "203.0.113.7" in server.output() and "2001:db8::5" in server.output(), timeout=10,
             what="the access log to name the carried addresses")
    # A header saying nothing (a balancer's health check) leaves the balancer's own address.
    seen = _https_get(port, b"PROXY UNKNOWN\r\n", root_ca)
    assert seen["x-forwarded-for"] == BALANCER


def test_headers_are_required_from_the_balancer_and_refused_from_anyone_else(server: ServeProcess, root_ca: str) -> None:
    hello = _client_hello()
    header = proxy_header(1, ("203.0.113.7", 50123), ("192.0.2.1", 443))
    assert _closed_without_answer(server.https_port, header + hello, "127.0.0.1"), "a client may not claim an address"
    assert _closed_without_answer(server.https_port, hello, BALANCER), "the balancer must send its header"
    # An ordinary client without a header is served as before.
    seen = _https_get(server.https_port, b"", root_ca, source="127.0.0.1")
    assert seen["x-forwarded-for"] == "127.0.0.1"
    # The http listener reads the same headers.
    request = f"GET /page HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
    assert _closed_without_answer(server.http_port, header + request, "127.0.0.1")
    with _connect(server.http_port, BALANCER) as sock:
        sock.sendall(proxy_header(2, ("198.51.100.9", 1234), ("192.0.2.1", 80)) + request)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 308"), answer


def _client_hello() -> bytes:
    """The first flight of a real TLS client, to send after a header by hand."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=NAME)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 50123 443\r\nrest", (44, ("203.0.113.7", 50123))),
        (b"PROXY TCP6 2001:db8::5 2001:db8::1 4711 443\r\n", (45, ("2001:db8::5", 4711))),
        (b"PROXY UNKNOWN\r\n", (15, None)),
        (b"PROXY TCP4 203.0.11", None),
        (proxy_header(2, ("203.0.113.7", 50123), ("192.0.2.1", 443)), (28, ("203.0.113.7", 50123))),
        (proxy_header(2, ("203.0.113.7", 50123), ("192.0.2.1", 443))[:20], None),
        (proxy_header(2, None, None), (16, None)),
    ],
)
def test_parse_proxy_header(data: bytes, expected: object) -> None:
    assert parse_proxy_header(data) == expected


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n", b"PROXY TCP4 nonsense\r\n", b"PROXY TCP4 2001:db8::5 192.0.2.1 1 2\r\n", b"PROXY " + b"x" * 120,
     b"\x16\x03\x01\x02\x00", b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x00"],
)
def test_parse_proxy_header_refuses_what_is_not_one(data: bytes) -> None:
    with pytest.raises(NotProxyHeader):
        parse_proxy_header(data)
