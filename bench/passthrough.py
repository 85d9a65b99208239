"""Server CPU of TLS pass-through (``--upstream tcp://``) against the HTTP proxy (``--upstream http://``).

    .venv/bin/python bench/passthrough.py [--rounds 5] [--connections 300] [--requests 2000] [--megabytes 128]

Both ``autocert serve`` processes run side by side in front of the same small HTTP/1.1
upstream (a process of its own), so HTTP clients work through either: the proxy parses
and re-issues each request, pass-through copies the bytes. Measured per server, from its own
``/proc/<pid>/stat``, less what it burns idle over the same wall time, in rounds that
alternate between the two:

- per connection: TLS 1.3 handshake, one small GET with ``Connection: close``, read to EOF;
- per request: small GETs one after another on one keep-alive connection;
- per MB: one GET of ``--megabytes`` (download) and one POST of as many (upload).

Absolute figures drift between machines and runs; compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fixtures import build_database, make_chain, name_for  # noqa: E402
from handshake import CLIENT_CPUS, Server, cpu_seconds, free_port, pin  # noqa: E402
from servers import UNREACHABLE_CA  # noqa: E402

NAME = name_for(0)
SMALL = 100
BLOCK = 256 * 1024


# -- the upstream: a minimal HTTP/1.1 server, in a process of its own -----------------------------


class _Upstream(asyncio.Protocol):
    """``GET /bytes/N`` answers N bytes; ``POST`` reads its Content-Length and answers ``ok``."""

    body = bytes(BLOCK)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.to_skip = 0  # request body bytes still to read

    def data_received(self, data: bytes) -> None:
        if self.to_skip:
            used = min(self.to_skip, len(data))
            self.to_skip -= used
            data = data[used:]
            if self.to_skip == 0:
                self._respond(b"ok", close=self.close_after)
        self.buffer += data
        while not self.to_skip and b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            self.close_after = headers.get("connection", "").lower() == "close"
            if method == "POST":
                length = int(headers.get("content-length", "0"))
                used = min(length, len(self.buffer))
                self.buffer = self.buffer[used:]
                self.to_skip = length - used
                if not self.to_skip:
                    self._respond(b"ok", close=self.close_after)
            else:
                self._respond_size(int(path.rsplit("/", 1)[1]), close=self.close_after)

    def _respond(self, body: bytes, *, close: bool) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # type: ignore[attr-defined]
        if close:
            self.transport.close()

    def _respond_size(self, size: int, *, close: bool) -> None:
        write = self.transport.write  # type: ignore[attr-defined]
        write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        while size > 0:
            write(self.body[: min(size, BLOCK)])
            size -= BLOCK
        if close:
            self.transport.close()


async def _run_upstream(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Upstream, "127.0.0.1", port, backlog=1024)
    print("upstream listening", flush=True)
    await server.serve_forever()


# -- the client ---------------------------------------------------------------------------------


def client_context(cafile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["http/1.1"])
    return context


def read_response(tls: ssl.SSLSocket, pending: bytearray) -> int:
    """Read one response (Content-Length bodies only); return the body size."""
    while b"\r\n\r\n" not in pending:
        chunk = tls.recv(BLOCK)
        if not chunk:
            raise ConnectionError("EOF before the response head")
        pending += chunk
    head, _, rest = bytes(pending).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    pending[:] = rest
    while len(pending) < length:
        chunk = tls.recv(BLOCK)
        if not chunk:
            raise ConnectionError("EOF inside the body")
        pending += chunk
    del pending[:length]
    return length


def request(method: str, path: str, *, length: int = 0, close: bool = False) -> bytes:
    extra = f"Content-Length: {length}\r\n" if method == "POST" else ""
    extra += "Connection: close\r\n" if close else ""
    return f"{method} {path} HTTP/1.1\r\nHost: {NAME}\r\n{extra}\r\n".encode()


def connections(port: int, context: ssl.SSLContext, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname=NAME) as tls:
                tls.sendall(request("GET", f"/bytes/{SMALL}", close=True))
                pending = bytearray()
                assert read_response(tls, pending) == SMALL
                while tls.recv(BLOCK):
                    pass


def keepalive_requests(port: int, context: ssl.SSLContext, count: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=NAME) as tls:
            pending = bytearray()
            for _ in range(count):
                tls.sendall(request("GET", f"/bytes/{SMALL}"))
                assert read_response(tls, pending) == SMALL


def download(port: int, context: ssl.SSLContext, size: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw, server_hostname=NAME) as tls:
        tls.sendall(request("GET", f"/bytes/{size}"))
        assert read_response(tls, bytearray()) == size


def upload(port: int, context: ssl.SSLContext, size: int) -> None:
    block = bytes(BLOCK)
    with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw, server_hostname=NAME) as tls:
        tls.sendall(request("POST", "/upload", length=size))
        for start in range(0, size, BLOCK):
            tls.sendall(block[: min(BLOCK, size - start)])
        assert read_response(tls, bytearray()) == 2


# -- the driver ----------------------------------------------------------------------------------


def measure(server: Server, idle_per_second: float, work: Callable[[], None]) -> float:
    """Server CPU seconds spent on ``work``, less its idle burn over the same wall time."""
    before, started = cpu_seconds(server.pid), time.monotonic()
    work()
    return cpu_seconds(server.pid) - before - idle_per_second * (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=300, help="connections per server per round")
    parser.add_argument("--requests", type=int, default=2000, help="keep-alive requests per server per round")
    parser.add_argument("--megabytes", type=int, default=128, help="MiB downloaded and uploaded per server per round")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--upstream-only", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream_only:
        import uvloop

        uvloop.run(_run_upstream(args.upstream_only))
        return

    os.sched_setaffinity(0, CLIENT_CPUS)
    workdir = Path(tempfile.mkdtemp(prefix="bench-passthrough-"))
    chain = make_chain()
    cafile = workdir / "ca.pem"
    cafile.write_bytes(chain.ca_pem)
    db = build_database(workdir / "autocert.db", 2, chain, UNREACHABLE_CA)
    upstream_port = free_port()
    upstream = Server("upstream", [sys.executable, str(Path(__file__).resolve()), "--upstream-only", str(upstream_port)],
                      upstream_port, "upstream listening")
    servers: dict[str, Server] = {}
    for label, url in (("pass-through", f"tcp://127.0.0.1:{upstream_port}"), ("HTTP proxy", f"http://127.0.0.1:{upstream_port}")):
        port = free_port()
        argv = [sys.executable, "-m", "autocert", "--db", db, "serve", "--https", f"127.0.0.1:{port}", "--http", "none",
                "--admin", "none", "--directory", UNREACHABLE_CA, "--upstream", url]
        servers[label] = Server(label, argv, port, "https listening", env={"AUTOCERT_EVENT_LOOP": args.loop})
    try:
        upstream.start()
        pin(upstream.pid, CLIENT_CPUS)
        for server in servers.values():
            server.start()
        context = client_context(str(cafile))
        for server in servers.values():  # first contact loads the certificate: not measured
            connections(server.port, context, 5)
        idle: dict[str, float] = {}
        for label, server in servers.items():
            before = cpu_seconds(server.pid)
            time.sleep(3)
            idle[label] = (cpu_seconds(server.pid) - before) / 3
        size = args.megabytes * 1024 * 1024
        kinds = {
            "µs per connection (handshake + 1 GET + close)": (lambda port: connections(port, context, args.connections), args.connections),
            "µs per keep-alive GET (100-byte body)": (lambda port: keepalive_requests(port, context, args.requests), args.requests),
            "ms per MiB downloaded": (lambda port: download(port, context, size), args.megabytes * 1000),
            "ms per MiB uploaded": (lambda port: upload(port, context, size), args.megabytes * 1000),
        }
        results: dict[str, dict[str, list[float]]] = {kind: {label: [] for label in servers} for kind in kinds}
        for round_number in range(args.rounds):
            for kind, (work, units) in kinds.items():
                for label, server in servers.items():
                    spent = measure(server, idle[label], lambda: work(server.port))
                    results[kind][label].append(spent * 1e6 / units)
                    server.check_alive()
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        print(f"\nserve on {args.loop}, {args.rounds} rounds; server CPU less idle ({', '.join(f'{k} {v * 1000:.1f} ms/s' for k, v in idle.items())})\n")
        print(f"| {'':48} | {'pass-through':>14} | {'HTTP proxy':>14} | {'ratio':>6} |")
        print(f"|{'-' * 50}|{'-' * 16}|{'-' * 16}|{'-' * 8}|")
        for kind, by_label in results.items():
            through, proxy = (statistics.median(by_label[label]) for label in ("pass-through", "HTTP proxy"))
            print(f"| {kind:48} | {through:14.1f} | {proxy:14.1f} | {through / proxy:6.2f} |")
    finally:
        for server in [*servers.values(), upstream]:
            server.stop()


if __name__ == "__main__":
    main()
