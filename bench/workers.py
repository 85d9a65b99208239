"""Every core at saturation: ``serve --workers 1`` and ``--workers auto`` side by side with
nginx (``worker_processes auto``) and Caddy (Go's default GOMAXPROCS, every CPU).

    .venv/bin/python bench/workers.py [--rounds 3] [--seconds 10] [--clients 4] [--keepalive 100]
                                      [--spread 2000] [--cache 1000] [--no-nginx] [--no-caddy] [--markdown FILE]

Two kinds of load, each server in turn kept busy for about ``--seconds`` by ``--clients``
client processes (bench/client.py), over the rounds:

- **connect**: each request a new TLS 1.3 connection (ECDSA P-256, no resumption) carrying
  one GET that the server answers itself (autocert's confirmation page, nginx's ``return 200``,
  Caddy's ``respond``): the handshake and a small request, with nothing behind;
- **keep-alive**: ``--keepalive`` GETs one after the other on each connection.

Nothing is pinned: the servers need every CPU, and the clients share them, so the table
gives the clients' share of the machine's CPU during each turn (after their warm-up):
what the clients take, no server could have. A server's CPU is that of all its processes
(autocert's supervisor and workers, nginx's master and workers). Medians over the rounds are
printed as one Markdown table, with requests/s ÷ Caddy's, and autocert's CPU per request with
every worker against one process (the cost of running several) and against a control: as
many separate single-process autocerts as there are workers, each client's connections going
to each in turn, which is what running that many processes costs on this machine with
nothing of ``--workers`` in the way. Then each server's resident memory per process after
its rounds, and what splitting ``--cache-size`` among the workers costs: the context cache's
hit ratio when connections go to ``--spread`` names drawn at random, more than a worker's
share of ``--cache`` holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from fixtures import UNREACHABLE_CA, Chain, build_database, make_chain, name_for
from harness import (Server, caddy_server, cpu_seconds, descendants, free_port, nginx_binary, nginx_server, print_table, rss_mib, stop_servers,
                     terminate_as_interrupt)

NAME = name_for(0)
ALL_CPUS = set(os.sched_getaffinity(0))
SINGLE, AUTO = "autocert --workers 1", f"autocert --workers auto ({len(ALL_CPUS)})"
PAIR = f"control: {len(ALL_CPUS)} separate autocert --workers 1"


@dataclass
class Separate:
    """The control for ``--workers auto``: as many single-process autocerts as it has workers,
    each on its own port and database, sharing nothing, every client's connections going to
    each in turn. What several processes cost on this machine with nothing of the supervisor,
    the shared listeners or the board: the rest of what ``--workers`` costs is its own."""

    label: str
    members: list[Server]

    @property
    def ports(self) -> list[int]:
        return [member.port for member in self.members]


#: The admin port of each autocert server, by label: its /metrics gives the cache's hits.
ADMIN: dict[str, int] = {}


def autocert(label: str, workdir: Path, chain: Chain, workers: str, names: int, cache: int) -> Server:
    db = workdir / f"autocert-{workers}.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    build_database(db, names, chain, UNREACHABLE_CA)
    port, ADMIN[label] = free_port(), free_port()
    argv = [sys.executable, "-m", "autocert", "--db", f"sqlite:///{db}", "serve", "--https", f"127.0.0.1:{port}",
            "--http", "none", "--admin", f"127.0.0.1:{ADMIN[label]}", "--directory", UNREACHABLE_CA, "--access-log", "off",
            "--workers", workers, "--cache-size", str(cache)]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    return Server(label, argv, port, "https listening", env=env, cpus=ALL_CPUS)


def nginx(workdir: Path, binary: str) -> Server | None:
    port = free_port()
    return nginx_server("nginx", binary, workdir / "nginx", f"""
    ssl_certificate {workdir}/chain.pem; ssl_certificate_key {workdir}/key.pem; ssl_protocols TLSv1.2 TLSv1.3;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} ssl;
        location / {{ return 200 "ok\\n"; }}
    }}""", [port], cpus=ALL_CPUS, workers="auto")


def caddy(workdir: Path, binary: str) -> Server:
    port = free_port()
    sites = f"""https://:{port} {{
	bind 127.0.0.1
	tls {workdir}/chain.pem {workdir}/key.pem
	respond "ok" 200
}}
"""
    server = caddy_server("Caddy", binary, workdir / "caddy", sites, [port])  # GOMAXPROCS: Go's default, every CPU
    server.cpus = ALL_CPUS
    return server


def server_cpu(server: Server | Separate) -> float:
    if isinstance(server, Separate):
        return sum(map(server_cpu, server.members))
    return sum(cpu_seconds(pid) for pid in [server.pid, *descendants(server.pid)])


def ports_of(server: Server | Separate) -> list[int]:
    return server.ports if isinstance(server, Separate) else [server.port]


def saturate(server: Server | Separate, clients: int, seconds: float, rate_guess: float, requests: int, *, names: int = 1) -> tuple[int, float, float, float]:
    """Keep ``server`` busy with ``clients`` processes for about ``seconds``, ``requests`` GETs
    per connection, each connection to one of ``names`` names drawn at random: (requests
    answered, wall seconds, server CPU seconds, client CPU seconds)."""
    ports = ports_of(server)
    count = max(20, int(rate_guess * seconds / clients / requests / len(ports)))  # per port
    argv = [sys.executable, str(HERE / "client.py"), "--ports", ",".join(map(str, ports)), "--count", str(count), "--names", str(names),
            "--warmup", str(max(2, 20 // requests)), "--path", "/", "--requests", str(requests), *(["--random"] if names > 1 else [])]
    processes = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    client_cpu = 0.0
    try:
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{server.label}: a client failed during warm-up")
        before = server_cpu(server)
        client_cpu = -sum(cpu_seconds(process.pid) for process in processes)  # start-up and warm-up left out
        started = time.perf_counter()
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        lines = [json.loads(process.stdout.readline())["results"] for process in processes if process.stdout]
        results = [line[str(port)] for line in lines for port in ports]
        wall = time.perf_counter() - started
        cpu = server_cpu(server) - before
        for process in processes:
            assert process.stdin is not None
            process.stdin.close()
            _pid, _status, usage = os.wait4(process.pid, 0)
            process.returncode = 0
            client_cpu += usage.ru_utime + usage.ru_stime
    finally:
        for process in processes:
            if process.returncode is None and process.poll() is None:
                process.kill()
                process.wait()
    ok, failed = sum(r[0] for r in results), sum(r[1] for r in results)
    if failed or not ok:
        raise RuntimeError(f"{server.label}: {ok} connections answered, {failed} failed")
    return ok * requests, wall, cpu, client_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="turns of each server; medians are reported (3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="about how long each turn keeps a server busy (10)")
    parser.add_argument("--clients", type=int, default=2 * len(ALL_CPUS), help="client processes (two per CPU)")
    parser.add_argument("--keepalive", type=int, default=100, help="GETs per connection in the keep-alive load (100)")
    parser.add_argument("--spread", type=int, default=2000, help="names in the cache split load (2000)")
    parser.add_argument("--cache", type=int, default=1000, help="autocert's --cache-size, the whole server's (1000)")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--no-caddy", action="store_true")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    loads = {"connect": 1, "keep-alive": args.keepalive}

    workdir = Path(tempfile.mkdtemp(prefix="autocert-workers-"))
    servers: list[Server] = []
    separate: Separate | None = None
    try:
        with terminate_as_interrupt():
            chain = make_chain(NAME)
            chain.write(workdir)
            servers = [autocert(SINGLE, workdir, chain, "1", args.spread, args.cache), autocert(AUTO, workdir, chain, "auto", args.spread, args.cache)]
            separate = Separate(PAIR, [autocert(f"{PAIR} #{index}", workdir / f"separate-{index}", chain, "1", args.spread, args.cache)
                                       for index in range(len(ALL_CPUS))])
            binary = None if args.no_nginx else nginx_binary()
            if binary is not None and (peer := nginx(workdir, binary)) is not None:
                servers.append(peer)
            if not args.no_caddy and (binary := shutil.which("caddy")) is not None:
                servers.append(caddy(workdir, binary))
            for server in [*servers, *separate.members]:
                server.start()
            measured_servers: list[Server | Separate] = [*servers[:2], separate, *servers[2:]]
            rates = {(server.label, load): 500.0 * requests for server in measured_servers for load, requests in loads.items()}
            measured: dict[tuple[str, str], list[tuple[float, float, float]]] = {key: [] for key in rates}
            cpus = len(ALL_CPUS)
            for round_index in range(args.rounds):
                for load, requests in loads.items():
                    for server in measured_servers:
                        answered, wall, cpu, client_cpu = saturate(server, args.clients, args.seconds, rates[server.label, load], requests)
                        rates[server.label, load] = answered / wall
                        measured[server.label, load].append((answered / wall, cpu / answered * 1e6, client_cpu / (wall * cpus)))
                        print(f"round {round_index + 1}/{args.rounds}: {load}: {server.label}: {answered / wall:.0f} requests/s",
                              file=sys.stderr)
            memory = {server.label: memory_of(server) for server in servers}
            split = cache_split(servers[:2], args)
            print_table(report(measured_servers, loads, measured, args) + "\n\n" + memory_table(memory) + "\n\n" + split, args.markdown)
    finally:
        stop_servers([*servers, *(separate.members if separate else [])])
        shutil.rmtree(workdir, ignore_errors=True)


def cache_counts(label: str) -> tuple[float, float]:
    """The whole server's context cache hits and misses so far, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN[label]}/metrics", timeout=30) as response:
        text = response.read().decode()

    def value(series: str) -> float:
        found = re.search(rf"^{series} (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    return value("autocert_context_cache_hits_total"), value("autocert_context_cache_misses_total")


def cache_split(servers: list[Server], args: argparse.Namespace) -> str:
    """What splitting ``--cache-size`` among the workers costs: each autocert server in turn
    gets new connections to names drawn at random from ``--spread`` names, more than a
    worker's share of the cache holds; the hit ratio is that of the turn (the caches start
    empty of those names, so it includes their filling)."""
    lines = [f"New connections to {args.spread} names drawn at random, `--cache-size {args.cache}` (the whole server's), one turn of about "
             f"{args.seconds:.0f} s each:", "",
             "| server | contexts per worker | cache hit ratio | requests/s | server CPU µs per request |", "|---|---|---|---|---|"]
    for server, workers in zip(servers, (1, len(ALL_CPUS))):
        hits, misses = cache_counts(server.label)
        answered, wall, cpu, _clients = saturate(server, args.clients, args.seconds, 300.0, 1, names=args.spread)
        more_hits, more_misses = cache_counts(server.label)
        lookups = (more_hits - hits) + (more_misses - misses)
        ratio = (more_hits - hits) / lookups if lookups else float("nan")
        lines.append(f"| {server.label} | {args.cache // workers} | {ratio:.2f} | {answered / wall:.0f} | {cpu / answered * 1e6:.0f} |")
    return "\n".join(lines)


def memory_of(server: Server) -> list[tuple[str, float]]:
    """Resident memory (MiB) of each process of ``server`` after the rounds, by role."""
    pids = descendants(server.pid)
    if server.argv[0] == "bash":  # nginx or Caddy under the probing shell: its processes, not the shell
        return [("process", rss_mib(pid)[0]) for pid in pids]
    if not pids:
        return [("process", rss_mib(server.pid)[0])]
    return [("supervisor", rss_mib(server.pid)[0]), *(("worker", rss_mib(pid)[0]) for pid in pids)]


def memory_table(memory: dict[str, list[tuple[str, float]]]) -> str:
    lines = ["| server | RSS after the rounds, MiB: each process | total |", "|---|---|---|"]
    for label, processes in memory.items():
        each = ", ".join(f"{role} {mib:.0f}" for role, mib in processes)
        lines.append(f"| {label} | {each} | {sum(mib for _, mib in processes):.0f} |")
    return "\n".join(lines)


def report(servers: list[Server | Separate], loads: dict[str, int], measured: dict[tuple[str, str], list[tuple[float, float, float]]],
           args: argparse.Namespace) -> str:
    def median(label: str, load: str, index: int) -> float:
        return statistics.median(sample[index] for sample in measured[label, load])

    labels = [server.label for server in servers]
    lines = [
        (f"Each server in turn kept busy by {args.clients} client processes on the same {len(ALL_CPUS)} CPUs; medians of "
         f"{args.rounds} round(s) of about {args.seconds:.0f} s. connect: a new TLS 1.3 connection per GET; keep-alive: "
         f"{args.keepalive} GETs per connection. Client CPU: the clients' share of all {len(ALL_CPUS)} CPUs during the turn."),
        "",
        "| load | server | requests/s | server CPU µs per request | client CPU | requests/s ÷ Caddy |",
        "|---|---|---|---|---|---|",
    ]
    for load in loads:
        caddy_rate = median("Caddy", load, 0) if "Caddy" in labels else None
        for label in labels:
            rate = median(label, load, 0)
            versus = f"{rate / caddy_rate:.2f}" if caddy_rate else "–"
            lines.append(f"| {load} | {label} | {rate:.0f} | {median(label, load, 1):.0f} | {median(label, load, 2):.0%} | {versus} |")
    lines.append("")
    for load in loads:
        single, every, control = median(SINGLE, load, 1), median(AUTO, load, 1), median(PAIR, load, 1)
        lines.append(f"{load}: autocert's CPU per request with every worker ÷ one process: {every / single:.2f} "
                     f"(requests/s {median(AUTO, load, 0) / median(SINGLE, load, 0):.2f} ×); the control's ÷ one process: "
                     f"{control / single:.2f}; so what --workers itself costs, every worker ÷ the control: {every / control:.2f}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
