"""One benchmark client process: sequential full TLS 1.3 handshakes, no session resumption.

    python bench/client.py --ports PORT[,PORT...] --count N [--names K] [--unknown] [--warmup W]

With several ports, consecutive connections go to the next port in turn, so every server is
measured over the same stretch of time and the machine's drift hits them all alike.

Each connection sets TCP_NODELAY, completes the handshake, half-closes TCP and reads until
the server closes, so the server has finished all its work for the connection (Finished,
session tickets, close) before the next one starts. ``--unknown`` sends names no server
knows and expects the handshake to fail. Prints ``ready`` after the warm-up, waits for a
line on stdin, then runs and prints one JSON line with its counts.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import name_for


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


def run(ports: list[int], count: int, names: list[str], context: ssl.SSLContext) -> dict[int, list[int]]:
    """``count`` handshakes per port, interleaved; returns {port: [ok, failed]}."""
    results = {port: [0, 0] for port in ports}
    for index in range(count):
        name = names[index % len(names)]
        for port in ports:
            results[port][0 if one(port, name, context) else 1] += 1
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ports", required=True, help="comma-separated")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--names", type=int, default=1000, help="distinct names to cycle through")
    parser.add_argument("--offset", type=int, default=0, help="first name index")
    parser.add_argument("--unknown", action="store_true")
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args()
    if args.unknown:
        names = [f"u{i}.unknown.test" for i in range(args.names)]
    else:
        names = [name_for(args.offset + i) for i in range(args.names)]
    context = client_context()
    ports = [int(port) for port in args.ports.split(",")]
    run(ports, args.warmup, names, context)
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    results = run(ports, args.count, names, context)
    print(json.dumps({"results": results, "seconds": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    main()
