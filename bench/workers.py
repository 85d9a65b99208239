"""``serve --workers 1`` against ``serve --workers auto`` at saturation: requests per second
and server CPU per request.

    .venv/bin/python bench/workers.py [--rounds 3] [--seconds 10] [--clients 4] [--markdown FILE]

Each request is a new TLS 1.3 connection (ECDSA P-256, no resumption) carrying one GET that
``serve`` answers itself (its confirmation page), so what is measured is the handshake and
the small request, with nothing behind. Both servers start from copies of one database
holding the certificate, on every CPU; ``--clients`` client processes (bench/client.py, not
pinned either) then keep one server busy for about ``--seconds``, then the other, in turns
over the rounds. A server's CPU is that of the supervisor and all its workers.

Clients and servers share the machine's CPUs: on a machine with few of them the clients'
own handshakes take a large share, and the gain from more workers is bounded by what the
clients leave over. Medians over the rounds are printed as one Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from fixtures import UNREACHABLE_CA, build_database, make_chain, name_for
from harness import Server, cpu_seconds, descendants, free_port, print_table, stop_servers, terminate_as_interrupt

NAME = name_for(0)
ALL_CPUS = set(os.sched_getaffinity(0))
SETTINGS = {"1": "--workers 1", "auto": f"--workers auto ({len(ALL_CPUS)} workers)"}


def serve(label: str, workdir: Path, seeded: Path, workers: str) -> Server:
    db = workdir / f"autocert-{label}.db"
    shutil.copyfile(seeded, db)
    port = free_port()
    argv = [sys.executable, "-m", "autocert", "--db", f"sqlite:///{db}", "serve", "--https", f"127.0.0.1:{port}",
            "--http", "none", "--admin", "none", "--directory", UNREACHABLE_CA, "--access-log", "off", "--workers", workers]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    server = Server(label, argv, port, "https listening", env=env)
    server.cpus = ALL_CPUS
    return server


def server_cpu(server: Server) -> float:
    return sum(cpu_seconds(pid) for pid in [server.pid, *descendants(server.pid)])


def saturate(server: Server, clients: int, seconds: float, rate_guess: float) -> tuple[int, int, float, float]:
    """Keep ``server`` busy with ``clients`` processes for about ``seconds``: (ok, failed,
    wall seconds, server CPU seconds)."""
    count = max(20, int(rate_guess * seconds / clients))
    argv = [sys.executable, str(HERE / "client.py"), "--ports", str(server.port), "--count", str(count), "--names", "1",
            "--warmup", "20", "--path", "/"]
    processes = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    try:
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a client failed during warm-up")
        before = server_cpu(server)
        started = time.perf_counter()
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [json.loads(process.stdout.readline())["results"][str(server.port)] for process in processes if process.stdout]
        wall = time.perf_counter() - started
        cpu = server_cpu(server) - before
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return sum(r[0] for r in results), sum(r[1] for r in results), wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="turns of each server; medians are reported (3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="about how long each turn keeps a server busy (10)")
    parser.add_argument("--clients", type=int, default=2 * len(ALL_CPUS), help="client processes (two per CPU)")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="autocert-workers-"))
    servers: list[Server] = []
    try:
        with terminate_as_interrupt():
            seeded = workdir / "seed.db"
            build_database(seeded, 10, make_chain(NAME), UNREACHABLE_CA)
            servers = [serve(label, workdir, seeded, label) for label in SETTINGS]
            for server in servers:
                server.start()
            rates = {server.label: 200.0 for server in servers}
            measured: dict[str, list[tuple[float, float]]] = {server.label: [] for server in servers}
            for round_index in range(args.rounds):
                for server in servers:
                    ok, failed, wall, cpu = saturate(server, args.clients, args.seconds, rates[server.label])
                    if failed or not ok:
                        raise RuntimeError(f"{server.label}: {ok} requests answered, {failed} failed")
                    rates[server.label] = ok / wall
                    measured[server.label].append((ok / wall, cpu / ok * 1e6))
                    print(f"round {round_index + 1}/{args.rounds}: {SETTINGS[server.label]}: {ok / wall:.0f} requests/s",
                          file=sys.stderr)
            single = statistics.median(rate for rate, _ in measured["1"])
            lines = [
                (f"New TLS connection + one GET answered by `serve` itself; {args.clients} client processes on the same "
                 f"{len(ALL_CPUS)} CPUs as the server; medians of {args.rounds} round(s) of about {args.seconds:.0f} s."),
                "",
                "| server | requests/s | server CPU µs per request | requests/s ÷ `--workers 1` |",
                "|---|---|---|---|",
            ]
            for server in servers:
                rate = statistics.median(value for value, _ in measured[server.label])
                cpu = statistics.median(value for _, value in measured[server.label])
                lines.append(f"| {SETTINGS[server.label]} | {rate:.0f} | {cpu:.0f} | {rate / single:.2f} |")
            markdown = "\n".join(lines)
            print_table(markdown, args.markdown)
    finally:
        stop_servers(servers)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
