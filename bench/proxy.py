"""Server CPU per request of ``autocert serve --upstream``, one build against another, side by side.

    .venv/bin/python bench/proxy.py [--ref REV ...] [--rounds 5] [--access-log-off] [--quick]

Each build (every ``--ref``, a commit exported with ``git archive``, then this tree) runs two
``serve`` processes: one proxying to a small static upstream, one answering its own page.
Rows, per request (TLS 1.3, ECDSA P-256, no resumption):

1. a new TLS connection carrying one proxied GET of a 2-byte body;
2. keep-alive proxied GETs of the 2-byte body;
3. keep-alive proxied GETs of a 256 KiB body;
4. a new TLS connection carrying one GET of autocert's own page (no upstream).

Two client processes send every request (or connection) to each server in turn, so all are
measured over the same seconds; servers are pinned to one CPU, clients and the upstream to
the other; the CPU counted is the serve process's own (``/proc/PID/stat``). The table gives
medians over the rounds, in µs, and each build's ratio to the first (the median of the per-round
ratios). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

UNREACHABLE_CA = "https://127.0.0.1:9/directory"
NAME = "n0.bench.test"  # fixtures.name_for(0); clients import nothing of autocert
SMALL, LARGE = b"ok", b"x" * (256 * 1024)
ROWS = {
    # key: (title, which server, path, connections per client, requests per connection)
    "new": ("new TLS connection + 1 proxied GET (2-byte body)", "proxy", "/small", 150, 1),
    "keepalive": ("keep-alive proxied GET (2-byte body)", "proxy", "/small", 10, 150),
    "large": ("keep-alive proxied GET, 256 KiB body", "proxy", "/large", 5, 20),
    "own": ("handshake + 1 GET of autocert's own page (no upstream)", "own", "/", 150, 1),
}


# -- the upstream: a static HTTP/1.1 server, one protocol, no framework ------------------------------


class Static(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            path = head.split(b" ", 2)[1]
            body = LARGE if path == b"/large" else SMALL
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))


async def serve_upstream(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Static, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    await server.serve_forever()


# -- a client process ------------------------------------------------------------------------------


def read_response(tls: ssl.SSLSocket, buffer: bytes) -> tuple[int, int, bytes]:
    """(status, body size, bytes past the response): Content-Length, chunked or until close."""
    while b"\r\n\r\n" not in buffer:
        data = tls.recv(65536)
        if not data:
            raise ConnectionError("closed before a response head")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    fields = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]}
    if b"content-length" in fields:
        length = int(fields[b"content-length"])
        while len(rest) < length:
            data = tls.recv(max(65536, length - len(rest)))
            if not data:
                raise ConnectionError("closed mid-body")
            rest += data
        return status, length, rest[length:]
    size = 0
    if fields.get(b"transfer-encoding") == b"chunked":
        while True:
            while b"\r\n" not in rest:
                rest += tls.recv(65536)
            line, _, rest = rest.partition(b"\r\n")
            chunk = int(line.split(b";")[0], 16)
            while len(rest) < chunk + 2:
                rest += tls.recv(65536)
            size += chunk
            rest = rest[chunk + 2:]
            if chunk == 0:
                return status, size, rest
    while data := tls.recv(65536):
        rest += data
    return status, len(rest), b""


def client_run(ports: list[int], path: str, connections: int, requests: int, expected: int) -> dict[int, list[int]]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["http/1.1"])
    results = {port: [0, 0] for port in ports}
    last = f"GET {path} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()
    again = f"GET {path} HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode()
    for _ in range(connections):
        sockets = {}
        for port in ports:
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sockets[port] = [context.wrap_socket(raw, server_hostname=NAME), b""]
        for index in range(requests):
            request = last if index == requests - 1 else again
            for port, state in sockets.items():
                try:
                    state[0].sendall(request)
                    status, size, state[1] = read_response(state[0], state[1])
                    results[port][0 if status == 200 and (expected < 0 or size == expected) else 1] += 1
                except (OSError, ValueError):
                    results[port][1] += 1
        for tls, _ in sockets.values():
            tls.close()
    return results


def client_main(args: argparse.Namespace) -> None:
    ports = [int(port) for port in args.ports.split(",")]
    client_run(ports, args.path, 2, 2, args.expect)  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    results = client_run(ports, args.path, args.connections, args.requests, args.expect)
    print(json.dumps({str(port): counts for port, counts in results.items()}), flush=True)


# -- the driver ------------------------------------------------------------------------------------


def export(ref: str, into: Path) -> Path:
    """The tree of commit ``ref``, unpacked from ``git archive`` (no checkout, no worktree)."""
    target = into / ref.replace("/", "_")
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def run_row(servers: dict[str, Any], key: str, scale: float) -> dict[str, tuple[int, int, float]]:
    from handshake import CLIENT_CPUS, cpu_seconds

    _title, _kind, path, connections, requests = ROWS[key]
    ports = ",".join(str(server.port) for server in servers.values())
    expect = {"/small": len(SMALL), "/large": len(LARGE)}.get(path, -1)
    argv = [sys.executable, __file__, "--client", "--ports", ports, "--path", path, "--expect", str(expect),
            "--connections", str(max(1, int(connections * scale))), "--requests", str(requests)]
    clients = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for client in clients:
            os.sched_setaffinity(client.pid, CLIENT_CPUS)
            assert client.stdout is not None and client.stdout.readline().strip() == "ready", "a client failed to warm up"
        before = {label: cpu_seconds(server.pid) for label, server in servers.items()}
        for client in clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        results = [json.loads(client.stdout.readline()) for client in clients if client.stdout]
        after = {label: cpu_seconds(server.pid) for label, server in servers.items()}
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
            client.wait()
    return {
        label: (sum(r[str(server.port)][0] for r in results), sum(r[str(server.port)][1] for r in results),
                after[label] - before[label])
        for label, server in servers.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", action="append", default=[], help="also measure this commit (git archive), e.g. main")
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH", help="also measure the tree at PATH")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the connections per round")
    parser.add_argument("--access-log-off", action="store_true", help="also this tree with --access-log off")
    parser.add_argument("--quick", action="store_true", help="2 rounds at a quarter of the size")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--upstream-server", type=int, help=argparse.SUPPRESS)
    for option in ("--ports", "--path"):
        parser.add_argument(option, help=argparse.SUPPRESS)
    for option in ("--connections", "--requests", "--expect"):
        parser.add_argument(option, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    if args.upstream_server:
        import uvloop

        uvloop.run(serve_upstream(args.upstream_server))
        return
    if args.quick:
        args.rounds, args.scale = 2, args.scale / 4
    from fixtures import build_database, make_chain
    from handshake import CLIENT_CPUS, SERVER_CPUS, Server, cpu_seconds, free_port, pin

    workdir = Path(tempfile.mkdtemp(prefix="autocert-proxy-bench-"))
    started: list[Server] = []
    try:
        chain = make_chain()
        db = build_database(workdir / "bench.db", 2, chain, UNREACHABLE_CA)
        upstream_port = free_port()
        upstream = Server("upstream", [sys.executable, __file__, "--upstream-server", str(upstream_port)], upstream_port, "ready")
        started.append(upstream)
        upstream.start()
        os.sched_setaffinity(upstream.pid, CLIENT_CPUS)
        builds: list[tuple[str, Path, tuple[str, ...]]] = [(ref, export(ref, workdir), ()) for ref in args.ref]
        builds += [(label, Path(path), ()) for label, _, path in (tree.partition("=") for tree in args.tree)]
        builds.append(("this tree", HERE.parent, ()))
        if args.access_log_off:
            builds.append(("this tree, --access-log off", HERE.parent, ("--access-log", "off")))
        servers: dict[str, dict[str, Any]] = {"proxy": {}, "own": {}}
        for label, tree, extra in builds:
            for kind in servers:
                port = free_port()
                argv = [sys.executable, "-P", "-m", "autocert", "--db", db, "serve", "--https", f"127.0.0.1:{port}", "--http", "none",
                        "--admin", "none", "--directory", UNREACHABLE_CA, *extra,
                        *(["--upstream", f"http://127.0.0.1:{upstream_port}"] if kind == "proxy" else [])]
                server = Server(f"{label} {kind}", argv, port, "https listening", env={"PYTHONPATH": str(tree)})
                started.append(server)
                server.start()
                pin(server.pid, SERVER_CPUS)
                servers[kind][label] = server
        idle_before = {s.label: cpu_seconds(s.pid) for group in servers.values() for s in group.values()}
        time.sleep(5)
        idle = {s.label: (cpu_seconds(s.pid) - idle_before[s.label]) / 5 for group in servers.values() for s in group.values()}
        per_request: dict[tuple[str, str], list[float]] = {}
        for round_index in range(args.rounds):
            for key, (_title, kind, *_rest) in ROWS.items():
                for label, (ok, failed, cpu) in run_row(servers[kind], key, args.scale).items():
                    if failed:
                        print(f"round {round_index + 1}, {key}, {label}: {failed} failed", file=sys.stderr)
                    per_request.setdefault((key, label), []).append(cpu / max(ok, 1) * 1e6)
            print(f"round {round_index + 1} of {args.rounds} done", file=sys.stderr)
        labels = [label for label, _, _ in builds]
        print("| per request (µs of server CPU) | " + " | ".join(labels) + " | " + " | ".join(f"{lab} ÷ {labels[0]}" for lab in labels[1:]) + " |")
        print("|---" * (2 * len(labels)) + "|")
        for key, (title, *_rest) in ROWS.items():
            medians = [statistics.median(per_request[(key, label)]) for label in labels]
            ratios = [statistics.median(b / a for a, b in zip(per_request[(key, labels[0])], per_request[(key, label)]))
                      for label in labels[1:]]
            print(f"| {title} | " + " | ".join(f"{m:.0f}" for m in medians) + " | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
        print("idle CPU (share of a core): " + ", ".join(f"{label} {rate * 100:.2f}%" for label, rate in idle.items()))
    finally:
        for server in reversed(started):
            server.stop()


if __name__ == "__main__":
    main()
