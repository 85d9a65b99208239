"""One benchmark client process: sequential full TLS 1.3 handshakes, no session resumption.

    python bench/client.py --ports PORT[,PORT...] --count N [--names K] [--random] [--unknown] [--warmup W]
                           [--path /PATH [--requests R] [--expect-size BYTES]]

With several ports, consecutive connections go to the next port in turn, so every server is
measured over the same stretch of time and the machine's drift hits them all alike.

Each connection sets TCP_NODELAY, completes the handshake, half-closes TCP and reads until
the server closes, so the server has finished all its work for the connection (Finished,
session tickets, close) before the next one starts. ``--unknown`` sends names no server
knows and expects the handshake to fail. Prints ``ready`` after the warm-up, waits for a
line on stdin, then runs and prints one JSON line with its counts.

With ``--path``, each connection sends ``R`` HTTP/1.1 GETs one after the other on the same
TLS connection (keep-alive), the last with ``Connection: close``, reads every response whole
(``Content-Length``, chunked or until close) and then reads until the server closes. A
connection counts as done only if every response was a 200 (of ``--expect-size`` bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import held_name_for, name_for


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    return context


def one(port: int, name: str, context: ssl.SSLContext) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = context.wrap_socket(raw, server_hostname=name)
        except (ssl.SSLError, OSError):
            return False
        tls.shutdown(socket.SHUT_WR)  # drops TLS state; what follows reads plain TCP
        while tls.recv(65536):
            pass
        tls.close()
        return True


class Response:
    """Reads HTTP/1.1 responses off one connection, keeping what arrived past the last one."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(262144)
        self.buffer += data
        return bool(data)

    def _take(self, size: int) -> None:
        while len(self.buffer) < size:
            if not self._fill():
                raise ConnectionError("closed in the middle of a response")
        del self.buffer[:size]

    def _line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if not self._fill():
                raise ConnectionError("closed in the middle of a response")
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    def read(self) -> tuple[int, int]:
        """(status, body size) of the next response."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if not self._fill():
                raise ConnectionError("closed before a response")
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        status = int(head[0].split()[1])
        headers = {key.strip().lower(): value.strip() for key, _, value in (line.partition(":") for line in head[1:])}
        if "content-length" in headers:
            size = int(headers["content-length"])
            self._take(size)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            size = 0
            while chunk := int(self._line().split(b";")[0], 16):
                self._take(chunk + 2)
                size += chunk
            while self._line():  # trailers, then the empty line
                pass
        else:
            while self._fill():
                pass
            size = len(self.buffer)
            self.buffer.clear()
        return status, size


def get(port: int, name: str, context: ssl.SSLContext, path: str, requests: int, expect_size: int | None) -> bool:
    """One TLS connection carrying ``requests`` GETs in turn; True if every one was answered as expected."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = context.wrap_socket(raw, server_hostname=name)
            request = f"GET {path} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode()
            last = f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
            response = Response(tls)
            for index in range(requests):
                tls.sendall(last if index == requests - 1 else request)
                status, size = response.read()
                if status != 200 or (expect_size is not None and size != expect_size):
                    return False
            while tls.recv(65536):  # until the server closes: its work for the connection is done
                pass
            tls.close()
            return True
        except (ssl.SSLError, OSError, ValueError, IndexError):
            return False


def run(ports: list[int], count: int, names: list[str], connect: Callable[[int, str], bool],
        pick: random.Random | None = None) -> dict[int, list[int]]:
    """``count`` connections per port, interleaved, to the names in turn (or drawn at random
    by ``pick``); returns {port: [ok, failed]}."""
    results = {port: [0, 0] for port in ports}
    for index in range(count):
        name = names[index % len(names)] if pick is None else pick.choice(names)
        for port in ports:
            results[port][0 if connect(port, name) else 1] += 1
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports", required=True, help="comma-separated")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--names", type=int, default=1000, help="distinct names to cycle through")
    parser.add_argument("--offset", type=int, default=0, help="first name index")
    parser.add_argument("--unknown", action="store_true")
    parser.add_argument("--held", action="store_true", help="allowed names held back by their backoff")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--path", help="send HTTP GETs for this path after the handshake")
    parser.add_argument("--requests", type=int, default=1, help="GETs per connection (keep-alive)")
    parser.add_argument("--expect-size", type=int, help="body size every response must have")
    parser.add_argument("--random", action="store_true", help="draw each connection's name at random (uniform) instead of in turn")
    args = parser.parse_args()
    if args.unknown:
        names = [f"u{i}.unknown.test" for i in range(args.names)]
    elif args.held:
        names = [held_name_for(i) for i in range(args.names)]
    else:
        names = [name_for(args.offset + i) for i in range(args.names)]
    context = client_context()
    ports = [int(port) for port in args.ports.split(",")]

    def connect(port: int, name: str) -> bool:
        if args.path is None:
            return one(port, name, context)
        return get(port, name, context, args.path, args.requests, args.expect_size)

    pick = random.Random(os.getpid()) if args.random else None
    run(ports, args.warmup, names, connect, pick)
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    results = run(ports, args.count, names, connect, pick)
    print(json.dumps({"results": results, "seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main()
