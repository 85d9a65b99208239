"""TLS pass-through: ``autocert serve --upstream tcp://HOST:PORT``.

The end-to-end tests run the real server on both event loops against a real Pebble, in front
of a small TCP upstream of the test's own that reads the PROXY header (parsed here from the
specification, not with autocert's code) and then echoes what it gets. The unit tests at the
end pin the header bytes against the specification's layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import random
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pebble import Pebble
from support import ServeProcess, eventually, free_port, run_cli, served_certificate, wait_for

from autocert._proxy_protocol import proxy_header

NAME = "relay.example.test"
SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: The upstream answers a connection that starts with this by sending BYE_REPLY and closing.
BYE = b"BYE\n"
BYE_REPLY_SIZE = 2 * 1024 * 1024


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- the upstream: parses the PROXY header, then echoes -----------------------------------------


@dataclass
class Connection:
    """What one upstream connection received."""

    header: dict[str, Any] | None = None
    data: bytearray = field(default_factory=bytearray)
    eof: threading.Event = field(default_factory=threading.Event)


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("EOF inside the PROXY header")
        data += chunk
    return data


def read_v1(sock: socket.socket) -> dict[str, Any]:
    """A version 1 header: one CRLF-terminated line of at most 107 bytes."""
    line = b""
    while not line.endswith(b"\r\n"):
        line += read_exactly(sock, 1)
        assert len(line) <= 107, "a v1 header is at most 107 bytes"
    words = line[:-2].decode("ascii").split(" ")
    assert words[0] == "PROXY"
    if words[1] == "UNKNOWN":
        return {"version": 1, "family": "UNKNOWN"}
    family, source, destination, source_port, destination_port = words[1:]
    return {"version": 1, "family": family, "source": source, "destination": destination,
            "source_port": int(source_port), "destination_port": int(destination_port)}


def read_v2(sock: socket.socket) -> dict[str, Any]:
    """A version 2 header: signature, version/command, family/protocol, length, addresses, TLVs."""
    fixed = read_exactly(sock, 16)
    assert fixed[:12] == SIGNATURE
    assert fixed[12] == 0x21, "version 2, command PROXY"
    family, length = fixed[13], struct.unpack(">H", fixed[14:16])[0]
    body = read_exactly(sock, length)
    header: dict[str, Any] = {"version": 2}
    if family == 0x11:  # TCP over IPv4
        header.update(family="TCP4", source=str(ipaddress.IPv4Address(body[0:4])), destination=str(ipaddress.IPv4Address(body[4:8])))
        header["source_port"], header["destination_port"] = struct.unpack(">HH", body[8:12])
        rest = body[12:]
    elif family == 0x21:  # TCP over IPv6
        header.update(family="TCP6", source=str(ipaddress.IPv6Address(body[0:16])), destination=str(ipaddress.IPv6Address(body[16:32])))
        header["source_port"], header["destination_port"] = struct.unpack(">HH", body[32:36])
        rest = body[36:]
    else:
        raise AssertionError(f"unexpected family/protocol byte {family:#x}")
    tlvs = {}
    while rest:
        kind, size = rest[0], struct.unpack(">H", rest[1:3])[0]
        tlvs[kind] = rest[3 : 3 + size]
        assert len(tlvs[kind]) == size, "TLV overruns the header"
        rest = rest[3 + size :]
    header["tlvs"] = tlvs
    return header


class Upstream:
    """A threaded TCP server. Each connection: the PROXY header it expects (if any), then an
    echo of every byte until EOF; a connection starting with BYE gets 2 MB and is closed."""

    def __init__(self, proxy_protocol: str | None, host: str = "127.0.0.1") -> None:
        self.proxy_protocol = proxy_protocol
        self.listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = self.listener.getsockname()[1]
        self.connections: list[Connection] = []
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        connection = Connection()
        try:
            with sock:
                if self.proxy_protocol == "v1":
                    connection.header = read_v1(sock)
                elif self.proxy_protocol == "v2":
                    connection.header = read_v2(sock)
                self.connections.append(connection)
                while True:
                    chunk = sock.recv(256 * 1024)
                    if not chunk:
                        connection.eof.set()
                        return
                    connection.data += chunk
                    if connection.data.startswith(BYE):
                        sock.sendall(payload(BYE_REPLY_SIZE, 9))
                        sock.shutdown(socket.SHUT_WR)
                        return
                    sock.sendall(chunk)
        except ConnectionError:
            pass  # e.g. a first-contact handshake that went away before the header
        except BaseException as exc:
            self.errors.append(exc)

    def connection(self, where: Callable[[Connection], bool], *, timeout: float = 15) -> Connection:
        return eventually(lambda: next((c for c in self.connections if where(c)), None), timeout=timeout, what="the upstream connection")

    def from_port(self, port: int) -> Connection:
        """The connection whose PROXY header names this client port."""
        return self.connection(lambda c: c.header is not None and c.header.get("source_port") == port)

    def close(self) -> None:
        self.listener.close()
        assert not self.errors, self.errors


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One database for the module: the first server issues the certificate, the others load it."""
    path = tmp_path_factory.mktemp("passthrough") / "autocert.db"
    db = f"sqlite:///{path}"
    assert run_cli("allow", NAME, db=db).returncode == 0
    return db


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return {"AUTOCERT_EVENT_LOOP": request.param}


@pytest.fixture()
def relay(pebble: Pebble, relay_db: str, root_ca: str, tmp_path: Path, loop_env: dict[str, str]) -> Iterator[Callable[..., ServeProcess]]:
    """Start ``autocert serve --upstream tcp://...`` with extra arguments; stopped (and checked
    for tracebacks) at the end."""
    started: list[ServeProcess] = []

    def start(upstream_port: int, *extra: str, upstream_host: str = "127.0.0.1", https: str | None = None) -> ServeProcess:
        host = f"[{upstream_host}]" if ":" in upstream_host else upstream_host
        argv = ["--upstream", f"tcp://{host}:{upstream_port}", *extra]
        https_port = None
        if https is not None:
            https_port = int(https.rsplit(":", 1)[1])
            argv += ["--https", https]
        server = ServeProcess(relay_db, pebble, tmp_path, extra=argv, env=loop_env, https_port=https_port)
        started.append(server)
        server.start()
        if https is None:
            served_certificate(server.https_port, NAME, root_ca, timeout=60)
        return server

    yield start
    for server in reversed(started):
        assert server.stop() == 0, server.output()
        assert "Traceback" not in server.stderr_path.read_text(), server.output()


@pytest.fixture()
def upstreams() -> Iterator[Callable[..., Upstream]]:
    made: list[Upstream] = []

    def make(proxy_protocol: str | None, host: str = "127.0.0.1") -> Upstream:
        made.append(Upstream(proxy_protocol, host))
        return made[-1]

    yield make
    for upstream in made:
        upstream.close()


def client_context(root_ca: str, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=root_ca)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


@contextlib.contextmanager
def connect(port: int, root_ca: str, *, alpn: list[str] | None = None, host: str = "127.0.0.1") -> Iterator[ssl.SSLSocket]:
    raw = socket.create_connection((host, port), timeout=30)
    with client_context(root_ca, alpn).wrap_socket(raw, server_hostname=NAME) as tls:
        yield tls


def read_to_eof(tls: ssl.SSLSocket) -> bytes:
    data = bytearray()
    while chunk := tls.recv(1024 * 1024):
        data += chunk
    return bytes(data)


def exchange(tls: ssl.SSLSocket, data: bytes) -> bytes:
    tls.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = tls.recv(len(data) - len(received))
        assert chunk, "EOF before the echo came back"
        received += chunk
    return received


async def echo_both_ways(port: int, root_ca: str, size: int, seed: int) -> tuple[int, bytes]:
    """Send ``size`` bytes while reading their echo; return the client's port and the echo."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(root_ca), server_hostname=NAME)
    data = payload(size, seed)

    async def send() -> None:
        for start in range(0, size, 64 * 1024):
            writer.write(data[start : start + 64 * 1024])
            await writer.drain()

    port = writer.get_extra_info("sockname")[1]
    sender = asyncio.create_task(send())
    try:
        echoed = await asyncio.wait_for(reader.readexactly(size), 120)
        await sender
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
    return port, echoed


def half_close_tcp(tls: ssl.SSLSocket) -> None:
    """Shut down the sending half of the TCP connection under TLS (a FIN, no close_notify)."""
    with socket.socket(tls.family, tls.type, fileno=os.dup(tls.fileno())) as duplicate:
        duplicate.shutdown(socket.SHUT_WR)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


# -- end to end --------------------------------------------------------------------------------


async def test_proxy_protocol_v1_bytes_both_ways_and_both_kinds_of_close(relay, upstreams, root_ca: str) -> None:
    upstream = upstreams("v1")
    server = relay(upstream.port, "--proxy-protocol", "v1")

    def header_and_echo() -> tuple[int, bytes, str | None]:
        with connect(server.https_port, root_ca, alpn=["h2", "http/1.1"]) as tls:
            return tls.getsockname()[1], exchange(tls, b"hello over v1\n"), tls.selected_alpn_protocol()

    port, echoed, alpn = await asyncio.to_thread(header_and_echo)
    assert echoed == b"hello over v1\n"
    assert alpn == "http/1.1", "without --alpn only http/1.1 is offered"
    connection = upstream.from_port(port)
    assert connection.header == {"version": 1, "family": "TCP4", "source": "127.0.0.1", "destination": "127.0.0.1",
                                 "source_port": port, "destination_port": server.https_port}
    assert bytes(connection.data) == b"hello over v1\n", "the header is followed by the client's bytes, unchanged"

    # Several MB both ways at once, intact.
    size = 6 * 1024 * 1024
    port, echoed = await echo_both_ways(server.https_port, root_ca, size, seed=1)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload(size, 1)).digest()
    connection = upstream.from_port(port)
    assert len(connection.data) == size and hashlib.sha256(connection.data).digest() == hashlib.sha256(payload(size, 1)).digest()

    # The client half-closes TCP: the upstream reads EOF after every byte; the client then sees the end.
    def half_close(how: str) -> tuple[int, bytes]:
        with connect(server.https_port, root_ca) as tls:
            assert exchange(tls, b"before " + how.encode()) == b"before " + how.encode()
            port = tls.getsockname()[1]
            if how == "fin":
                tls.sendall(b" and the last bytes")
                half_close_tcp(tls)
                return port, read_to_eof(tls)
            # unwrap() refuses data after close_notify, so the echo is read first.
            assert exchange(tls, b" and the last bytes") == b" and the last bytes"
            tls.unwrap()  # close_notify; returns once the server's close_notify is back
            return port, b""

    for how in ("fin", "close_notify"):
        port, rest = await asyncio.to_thread(half_close, how)
        connection = upstream.from_port(port)
        assert await asyncio.to_thread(connection.eof.wait, 15), f"the upstream never saw the client's EOF ({how})"
        assert bytes(connection.data) == b"before " + how.encode() + b" and the last bytes"
        assert rest in (b"", b" and the last bytes"), "TLS cannot half-close: at most the echo already under way"

    # The upstream closes first: the client gets everything it sent, then the end.
    def bye() -> bytes:
        with connect(server.https_port, root_ca) as tls:
            tls.sendall(BYE)
            return read_to_eof(tls)

    received = await asyncio.to_thread(bye)
    assert len(received) == BYE_REPLY_SIZE and received == payload(BYE_REPLY_SIZE, 9)


async def test_proxy_protocol_v2_carries_the_sni_and_alpn(relay, upstreams, root_ca: str) -> None:
    upstream = upstreams("v2")
    server = relay(upstream.port, "--proxy-protocol", "v2", "--alpn", "h2,http/1.1")

    def echo(alpn: list[str] | None) -> tuple[int, bytes]:
        with connect(server.https_port, root_ca, alpn=alpn) as tls:
            return tls.getsockname()[1], exchange(tls, b"v2 bytes")

    port, echoed = await asyncio.to_thread(echo, ["h2"])
    assert echoed == b"v2 bytes"
    header = upstream.from_port(port).header
    assert header == {"version": 2, "family": "TCP4", "source": "127.0.0.1", "destination": "127.0.0.1",
                      "source_port": port, "destination_port": server.https_port,
                      "tlvs": {0x01: b"h2", 0x02: NAME.encode()}}
    port, _ = await asyncio.to_thread(echo, None)
    assert upstream.from_port(port).header["tlvs"] == {0x02: NAME.encode()}, "no ALPN negotiated, no ALPN TLV"

    size = 4 * 1024 * 1024
    port, echoed = await echo_both_ways(server.https_port, root_ca, size, seed=2)
    assert echoed == payload(size, 2)
    assert bytes(upstream.from_port(port).data) == payload(size, 2)


async def test_proxy_protocol_v2_over_ipv6(relay, upstreams, root_ca: str, relay_db: str) -> None:
    upstream = upstreams("v2", host="::1")
    listen_port = free_v6_port()
    # The certificate is in the module's database once an earlier test has issued it.
    if not await asyncio.to_thread(certificate_stored, relay_db):
        warm = relay(upstreams(None).port)
        warm.stop()
    server = relay(upstream.port, "--proxy-protocol", "v2", upstream_host="::1", https=f"[::1]:{listen_port}")

    def echo() -> tuple[int, bytes]:
        with connect(listen_port, root_ca, host="::1") as tls:
            return tls.getsockname()[1], exchange(tls, b"over IPv6")

    port, echoed = await asyncio.to_thread(eventually_ok, echo)
    assert echoed == b"over IPv6"
    header = upstream.from_port(port).header
    assert header is not None and header["family"] == "TCP6"
    assert (header["source"], header["destination"], header["destination_port"]) == ("::1", "::1", listen_port)
    assert header["tlvs"][0x02] == NAME.encode()
    assert server.process is not None and server.process.poll() is None


async def test_proxy_protocol_v1_gives_ipv4_clients_of_a_dual_stack_listener_as_tcp4(relay, upstreams, root_ca: str, relay_db: str) -> None:
    """On ``[::]`` an IPv4 client is ``::ffff:127.0.0.1`` to the socket; the upstream must read plain IPv4."""
    upstream = upstreams("v1")
    listen_port = free_v6_port()
    if not await asyncio.to_thread(certificate_stored, relay_db):
        relay(upstreams(None).port).stop()
    server = relay(upstream.port, "--proxy-protocol", "v1", https=f":{listen_port}")

    def echo(host: str) -> tuple[int, bytes]:
        with connect(listen_port, root_ca, host=host) as tls:
            return tls.getsockname()[1], exchange(tls, b"dual stack")

    for host, family in (("127.0.0.1", "TCP4"), ("::1", "TCP6")):
        port, echoed = await asyncio.to_thread(eventually_ok, lambda host=host: echo(host))
        assert echoed == b"dual stack"
        header = upstream.from_port(port).header
        assert header is not None and (header["family"], header["source"], header["destination"]) == (family, host, host), header
    assert server.process is not None and server.process.poll() is None


async def test_bytes_only_h2_and_the_idle_bound(relay, upstreams, root_ca: str) -> None:
    upstream = upstreams(None)
    server = relay(upstream.port, "--alpn", "h2,http/1.1", "--idle-timeout", "2")

    def h2() -> tuple[str | None, bytes]:
        with connect(server.https_port, root_ca, alpn=["h2", "http/1.1"]) as tls:
            return tls.selected_alpn_protocol(), exchange(tls, H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

    alpn, echoed = await asyncio.to_thread(h2)
    assert alpn == "h2"
    assert echoed.startswith(H2_PREFACE)
    connection = upstream.connection(lambda c: c.data.startswith(H2_PREFACE))
    assert connection.header is None
    assert bytes(connection.data) == H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", "the bytes only: no header"

    def http11() -> str | None:
        with connect(server.https_port, root_ca, alpn=["http/1.1"]) as tls:
            return tls.selected_alpn_protocol()

    assert await asyncio.to_thread(http11) == "http/1.1"

    # A connection that keeps talking outlives the bound; a silent one is closed after it.
    def idle() -> tuple[float, float]:
        with connect(server.https_port, root_ca) as tls:
            started = time.monotonic()
            for index in range(8):
                time.sleep(0.5 if index else 0)
                assert exchange(tls, b"tick %d" % index) == b"tick %d" % index
            talking = time.monotonic() - started
            silent_from = time.monotonic()
            assert read_to_eof(tls) == b""
            return talking, time.monotonic() - silent_from

    talking, silent = await asyncio.to_thread(idle)
    assert talking > 3, "a talking connection must not be cut at the idle bound"
    assert 1.9 <= silent <= 6, f"a silent connection was closed after {silent:.1f} s, not after about 2 s"


async def test_backpressure_holds_memory_when_the_client_does_not_read(relay, upstreams, root_ca: str) -> None:
    upstream = upstreams(None)
    server = relay(upstream.port)
    assert server.process is not None
    size = 64 * 1024 * 1024
    data = payload(size, 3)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.https_port, ssl=client_context(root_ca), server_hostname=NAME)
    before = rss_kib(server.process.pid)

    async def send() -> None:
        for start in range(0, size, 256 * 1024):
            writer.write(data[start : start + 256 * 1024])
            await writer.drain()

    sender = asyncio.create_task(send())
    await asyncio.sleep(3)  # the echo piles up: nobody reads it
    grown = rss_kib(server.process.pid) - before
    assert grown < 24 * 1024, f"serve grew by {grown} KiB while the client did not read: backpressure is not working"
    echoed = await asyncio.wait_for(reader.readexactly(size), 120)
    await sender
    writer.close()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()


async def test_upstream_down_closes_the_client_after_the_handshake_with_one_log_line(relay, root_ca: str) -> None:
    nobody = free_port()
    server = relay(nobody)

    def unreachable_lines() -> int:
        return sum("unreachable" in line for line in server.stderr_path.read_text().splitlines())

    await asyncio.to_thread(wait_for, lambda: unreachable_lines() >= 1, timeout=15, what="the first-contact handshakes to be logged")
    await asyncio.sleep(0.5)
    before = unreachable_lines()

    def attempt() -> tuple[str, bytes]:
        with connect(server.https_port, root_ca) as tls:
            version = tls.version() or ""
            return version, read_to_eof(tls)

    version, received = await asyncio.to_thread(attempt)
    assert version.startswith("TLS"), "the handshake itself completes"
    assert received == b""
    await asyncio.to_thread(wait_for, lambda: unreachable_lines() == before + 1, timeout=15, what="one log line")
    line = [line for line in server.stderr_path.read_text().splitlines() if "unreachable" in line][-1]
    assert NAME in line and f"127.0.0.1:{nobody}" in line


async def test_sigterm_lets_a_relayed_connection_finish(relay, upstreams, root_ca: str) -> None:
    upstream = upstreams(None)
    server = relay(upstream.port)
    assert server.process is not None

    def conversation() -> bytes:
        with connect(server.https_port, root_ca) as tls:
            assert exchange(tls, b"before") == b"before"
            server.signal(signal.SIGTERM)
            eventually(lambda: "shutting down" in server.stderr_path.read_text(), timeout=10, what="serve to start shutting down")
            return exchange(tls, b"after the signal")

    assert await asyncio.to_thread(conversation) == b"after the signal"
    assert await asyncio.to_thread(server.process.wait, 15) == 0


async def test_tls_alpn_01_is_answered_and_never_reaches_the_upstream(pebble: Pebble, db: str, root_ca: str, tmp_path: Path,
                                                                      upstreams, loop_env: dict[str, str]) -> None:
    name = "alpn-challenge.relay.example.test"
    assert run_cli("allow", name, db=db).returncode == 0
    upstream = upstreams("v2")
    server = ServeProcess(db, pebble, tmp_path, env=loop_env,
                          extra=["--http", "none", "--upstream", f"tcp://127.0.0.1:{upstream.port}", "--proxy-protocol", "v2"])
    with server:
        # The first contact waits for an order validated with tls-alpn-01 on this listener.
        await asyncio.to_thread(served_certificate, server.https_port, name, root_ca, timeout=60)

        def echo() -> bytes:
            raw = socket.create_connection(("127.0.0.1", server.https_port), timeout=30)
            with client_context(root_ca).wrap_socket(raw, server_hostname=name) as tls:
                return exchange(tls, b"after the challenge")

        assert await asyncio.to_thread(echo) == b"after the challenge"
        await asyncio.sleep(0.5)
    for connection in upstream.connections:
        assert connection.header is not None and connection.header["tlvs"].get(0x01) != b"acme-tls/1", "a validation reached the upstream"
    assert "Traceback" not in server.stderr_path.read_text(), server.output()


@pytest.mark.parametrize(
    ("argv", "env", "complaint"),
    [
        (["--alpn", "h2,http/1.1"], {}, "--alpn"),
        ([], {"AUTOCERT_ALPN": "h2"}, "--alpn"),
        (["--proxy-protocol", "v2"], {}, "--proxy-protocol"),
        (["--proxy-protocol", "v1", "--upstream", "http://127.0.0.1:8000"], {}, "--proxy-protocol"),
        (["--upstream", "tcp://127.0.0.1"], {}, "tcp://"),
        (["--upstream", "tcp://:5432"], {}, "tcp://"),
        (["--upstream", "tcp://127.0.0.1:99999"], {}, "tcp://"),
        (["--upstream", "tcp://127.0.0.1:5432/db"], {}, "tcp://"),
        (["--upstream", "tcp://user@127.0.0.1:5432"], {}, "tcp://"),
        (["--upstream", "tcp://127.0.0.1:5432", "--proxy-protocol", "v3"], {}, "--proxy-protocol"),
        (["--upstream", "tcp://127.0.0.1:5432", "--alpn", "h2,,http/1.1"], {}, "--alpn"),
        (["--upstream", "tcp://127.0.0.1:5432", "--alpn", "acme-tls/1"], {}, "--alpn"),
        (["--upstream", "tcp://127.0.0.1:5432", "--idle-timeout", "soon"], {}, "--idle-timeout"),
    ],
)
def test_usage_errors(argv: list[str], env: dict[str, str], complaint: str, tmp_path: Path) -> None:
    database = tmp_path / "untouched.db"
    result = run_cli("serve", "--https", "127.0.0.1:0", "--http", "none", "--admin", "none", *argv, db=f"sqlite:///{database}", env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autocert: error:") and complaint in lines[0], result.stderr
    assert not database.exists(), "a usage error must write nothing"


def certificate_stored(db: str) -> bool:
    import sqlite3

    path = db.removeprefix("sqlite:///")
    if not Path(path).exists():
        return False
    with contextlib.closing(sqlite3.connect(path)) as connection:
        try:
            return connection.execute("SELECT count(*) FROM certificates WHERE name = ?", (NAME,)).fetchone()[0] > 0
        except sqlite3.OperationalError:
            return False


def free_v6_port() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        return int(sock.getsockname()[1])


def eventually_ok(call: Callable[[], Any], timeout: float = 30) -> Any:
    """``call`` retried until it stops raising connection and TLS errors (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except (OSError, ssl.SSLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- the header bytes against the specification ---------------------------------------------------


def test_v1_ipv4_is_the_specification_example() -> None:
    header = proxy_header(1, ("192.168.0.1", 56324), ("192.168.0.11", 443), authority="example.com")
    assert header == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_ipv6_and_the_longest_line() -> None:
    header = proxy_header(1, ("2001:db8::1", 56324, 0, 0), ("2001:db8::11", 443, 0, 0))
    assert header == b"PROXY TCP6 2001:db8::1 2001:db8::11 56324 443\r\n"
    longest = ":".join(["ffff"] * 8)
    header = proxy_header(1, (longest, 65535, 0, 0), (longest, 65535, 0, 0))
    assert header == f"PROXY TCP6 {longest} {longest} 65535 65535\r\n".encode()
    assert len(header) == 104, "the specification's longest TCP6 line, CRLF included"


def test_v1_ipv4_mapped_addresses_are_sent_as_ipv4_and_the_rest_as_unknown() -> None:
    assert proxy_header(1, ("::ffff:203.0.113.7", 5000, 0, 0), ("::ffff:192.0.2.1", 443, 0, 0)) == b"PROXY TCP4 203.0.113.7 192.0.2.1 5000 443\r\n"
    assert proxy_header(1, None, ("192.0.2.1", 443)) == b"PROXY UNKNOWN\r\n"
    assert proxy_header(1, "/run/socket", "/run/socket") == b"PROXY UNKNOWN\r\n"
    assert proxy_header(1, ("fe80::1%eth0", 5000, 0, 2), ("fe80::2%eth0", 443, 0, 2)) == b"PROXY TCP6 fe80::1 fe80::2 5000 443\r\n"


def test_v2_ipv4_with_the_authority_tlv() -> None:
    header = proxy_header(2, ("192.168.0.1", 56324), ("192.168.0.11", 443), authority="example.com")
    assert header == (
        b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # signature
        b"\x21"  # version 2, PROXY
        b"\x11"  # AF_INET, STREAM
        b"\x00\x1a"  # 12 address bytes + 3 + 11 TLV bytes
        b"\xc0\xa8\x00\x01" b"\xc0\xa8\x00\x0b"  # source, destination
        b"\xdc\x04" b"\x01\xbb"  # 56324, 443
        b"\x02\x00\x0b" b"example.com"  # PP2_TYPE_AUTHORITY
    )


def test_v2_ipv6_with_alpn_and_authority_tlvs() -> None:
    header = proxy_header(2, ("2001:db8::1", 56324, 0, 0), ("2001:db8::11", 443, 0, 0), authority="example.com", alpn="h2")
    source = bytes.fromhex("20010db8000000000000000000000001")
    destination = bytes.fromhex("20010db8000000000000000000000011")
    assert header == (
        SIGNATURE + b"\x21\x21" + (36 + 5 + 14).to_bytes(2, "big")  # AF_INET6, STREAM
        + source + destination + b"\xdc\x04\x01\xbb"
        + b"\x01\x00\x02h2"  # PP2_TYPE_ALPN
        + b"\x02\x00\x0bexample.com"
    )


def test_v2_without_addresses_is_af_unspec() -> None:
    assert proxy_header(2, None, None) == SIGNATURE + b"\x21\x00\x00\x00"
    assert proxy_header(2, ("192.0.2.1", 1), ("2001:db8::1", 2, 0, 0), authority="a.test") == SIGNATURE + b"\x21\x00\x00\x09\x02\x00\x06a.test"
    assert proxy_header(2, ("::ffff:192.0.2.1", 1, 0, 0), ("::ffff:192.0.2.2", 2, 0, 0))[13] == 0x11, "mapped addresses are IPv4"


def test_only_versions_1_and_2_exist() -> None:
    with pytest.raises(ValueError):
        proxy_header(3, ("192.0.2.1", 1), ("192.0.2.2", 2))
