"""Server CPU per TLS handshake, side by side in one run, as ratios to a static server.

    .venv/bin/python bench/handshake.py [--rounds 20] [--count 500] [--names 100000] [--alternatives]

See bench/README.md for what each row means and the targets. Absolute microseconds drift
between machines and runs; only ratios measured in the same run are compared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fixtures import UNREACHABLE_CA, build_database, make_chain, name_for
from harness import (CLIENT_CPUS, SERVER_CPUS, Server, cpu_seconds, descendants, free_port, nginx_binary, nginx_server, pin,
                     rss_mib, run_clients)

WARM_NAMES = 1000
#: The servers measured refusing allowed names held back by their backoff.
HELD_SERVERS = ("front", "serve")


def static_nginx(workdir: Path, port: int) -> Server | None:
    """nginx with one certificate for *.bench.test, and a 7-byte alert for any other name."""
    binary = nginx_binary()
    if binary is None:
        return None
    return nginx_server("nginx", binary, workdir / "nginx", f"""
    ssl_protocols TLSv1.2 TLSv1.3;
    server {{
        listen 127.0.0.1:{port} ssl default_server;
        ssl_reject_handshake on;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name *.bench.test;
        ssl_certificate {workdir}/chain.pem;
        ssl_certificate_key {workdir}/key.pem;
        return 200 "ok\\n";
    }}""", [port], master=False)


def nginx_pid(server: Server) -> int:
    """The nginx process itself (a child of the probing shell)."""
    return descendants(server.pid)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500, help="handshakes per client process and server in a round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--names", type=int, default=100_000, help="names (certificates) in the database")
    parser.add_argument("--touch", type=int, default=5000, help="distinct names touched before reading RSS")
    parser.add_argument("--alternatives", action="store_true", help="also measure the front designs that were not kept")
    parser.add_argument("--no-nginx", action="store_true")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="autocert-bench-"))
    servers: list[Server] = []
    try:
        chain = make_chain()
        chain.write(workdir)
        started = time.perf_counter()
        db = build_database(workdir / "bench.db", args.names, chain, UNREACHABLE_CA, held=WARM_NAMES)
        print(f"database: {args.names:,} names with certificates in {time.perf_counter() - started:.1f} s", file=sys.stderr)

        def bench_server(variant: str, *extra: str) -> Server:
            port = free_port()
            argv = [sys.executable, str(HERE / "servers.py"), variant, "--port", str(port), "--chain-dir", str(workdir),
                    "--db", db, "--warm", str(WARM_NAMES), *extra]
            return Server(variant, argv, port, "ready")

        def serve_server(label: str, *extra: str) -> Server:
            port = free_port()
            argv = [sys.executable, "-m", "autocert", "--db", db, "serve", "--https", f"127.0.0.1:{port}",
                    "--http", "none", "--admin", "none", "--directory", UNREACHABLE_CA, "--cache-size", "1000", *extra]
            return Server(label, argv, port, "https listening")

        full = [bench_server("static"), bench_server("sni"), bench_server("front"), serve_server("serve")]
        floor = bench_server("alert-only")
        if args.alternatives:
            full += [bench_server("front-task"), bench_server("front-reader")]
        nginx = None if args.no_nginx else static_nginx(workdir, free_port())
        if nginx is None and not args.no_nginx:
            print("nginx is not installed: its row is skipped (apt-get install nginx-light)", file=sys.stderr)
        if nginx is not None:
            full.append(nginx)
        servers.extend([*full, floor])
        for server in [*full, floor]:
            server.start()
        pids = {server.label: nginx_pid(server) if server.label == "nginx" else server.pid for server in [*full, floor]}
        for pid in pids.values():
            pin(pid, SERVER_CPUS)
        by_label = {server.label: server for server in [*full, floor]}
        for server in full:  # first touch of every name: database loads happen here, not in the rounds
            run_clients({server.label: (server.port, None)}, WARM_NAMES, clients=1, warmup=0)
        for label in HELD_SERVERS:  # the one look at each held name's backoff, before the rounds
            run_clients({label: (by_label[label].port, None)}, WARM_NAMES, clients=1, warmup=0, extra=["--held"])

        # Idle cost of a running serve (its allowlist and certificate polls), per second.
        before = cpu_seconds(pids["serve"])
        time.sleep(5)
        serve_idle = (cpu_seconds(pids["serve"]) - before) / 5

        # Each round: one run of full handshakes spread over every server connection by
        # connection, then one run of rejections the same way. Servers side by side in time
        # see the same machine, which matters more than anything else on a shared VM.
        full_targets = {server.label: (server.port, pids[server.label]) for server in full}
        reject_targets = {f"{label} reject": (by_label[label].port, pids[label]) for label in ("front", "serve", "nginx")
                          if label in by_label}
        reject_targets["alert-only"] = (floor.port, pids["alert-only"])
        held_targets = {f"{label} held": (by_label[label].port, pids[label]) for label in HELD_SERVERS}
        per_round: dict[str, list[float]] = {label: [] for label in [*full_targets, *reject_targets, *held_targets]}
        idle_share: dict[str, list[float]] = {"serve": [], "serve reject": [], "serve held": []}
        for round_index in range(args.rounds):
            for targets, rejecting, extra in ((full_targets, False, []), (reject_targets, True, ["--unknown"]),
                                              (held_targets, True, ["--held"])):
                try:
                    measured, wall = run_clients(targets, args.count, extra=extra)
                except (RuntimeError, ValueError):
                    for server in [*full, floor]:
                        server.check_alive()
                    raise
                for label, (ok, failed, cpu) in measured.items():
                    done = failed if rejecting else ok
                    if done != 2 * args.count:
                        raise RuntimeError(f"{label}: {ok} handshakes succeeded and {failed} failed")
                    per_round[label].append(cpu / done)
                    if label in idle_share:
                        idle_share[label].append(serve_idle * wall / done)
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

        # The serve rows minus what the same process burns when idle over the same wall time.
        for label, shares in idle_share.items():
            per_round[f"{label} − idle"] = [cpu - share for cpu, share in zip(per_round[label], shares)]
        report(per_round, serve_idle, args)
        for server in full:
            server.stop()
        startup_and_memory(db, workdir, args, serve_server)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


TARGETS = {"sni": ("≤ 1.03", 1.03), "front": ("≤ 1.05", 1.05), "serve": ("≤ 1.05", 1.05), "serve − idle": ("≤ 1.05", 1.05),
           "front reject": ("≤ 0.10", 0.10), "serve reject": ("≤ 0.10", 0.10), "serve reject − idle": ("≤ 0.10", 0.10),
           "front held": ("≤ 0.20", 0.20), "serve held": ("≤ 0.20", 0.20), "serve held − idle": ("≤ 0.20", 0.20)}
DESCRIPTIONS = {
    "static": "static single-context server, uvloop (baseline)",
    "sni": "sni_callback, cache hit, 100k names in the database",
    "front": "TlsFront (ClientHello front), uvloop, cache hit",
    "serve": "`autocert serve`, uvloop, cache hit",
    "front-task": "first front design: sock_accept + task + MSG_PEEK + connect_accepted_socket",
    "front-reader": "accept in a reader callback + MSG_PEEK, task for connect_accepted_socket",
    "nginx": "nginx, one static certificate",
    "front reject": "TlsFront, unknown name: 7-byte alert",
    "serve reject": "`autocert serve`, unknown name: 7-byte alert",
    "serve − idle": "`autocert serve`, cache hit, minus its idle CPU",
    "serve reject − idle": "`autocert serve`, unknown name, minus its idle CPU",
    "front held": "TlsFront, allowed name held back by its backoff: refused from memory",
    "serve held": "`autocert serve`, allowed name held back by its backoff",
    "serve held − idle": "`autocert serve`, held-back name, minus its idle CPU",
    "alert-only": "floor: bare uvloop protocol, 7-byte alert, no parsing",
    "nginx reject": "nginx `ssl_reject_handshake on`, unknown name",
}


def report(per_round: dict[str, list[float]], serve_idle: float, args: argparse.Namespace) -> None:
    """Ratios to the static server: the pooled one (total CPU over total CPU, all rounds) and the
    spread of the per-round ones (quartiles), which shows how much the machine's noise moves them."""
    static = per_round["static"]
    nginx = per_round.get("nginx")
    print()
    print(f"Server CPU per handshake, {args.rounds} rounds × 2 client processes × {args.count} handshakes per server, "
          f"ECDSA P-256, TLS 1.3, no resumption; servers pinned to CPU {sorted(SERVER_CPUS)}, clients to {sorted(CLIENT_CPUS)}")
    print()
    print("| server | µs/handshake | ÷ static (pooled) | per-round quartiles | target | ÷ nginx |")
    print("|---|---|---|---|---|---|")
    for label, values in per_round.items():
        ratios = sorted(value / base for value, base in zip(values, static))
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        pooled = sum(values) / sum(static)
        target, limit = TARGETS.get(label, ("", None))
        verdict = "" if limit is None else (" met" if pooled <= limit else " **missed**")
        vs_nginx = f"{sum(values) / sum(nginx):.2f}" if nginx and "reject" not in label and "held" not in label and label != "alert-only" else ""
        print(f"| {DESCRIPTIONS[label]} | {sum(values) / len(values) * 1e6:.0f} | {pooled:.3f} | {q1:.3f}–{q3:.3f} | "
              f"{target}{verdict} | {vs_nginx} |")
    print()
    print(f"idle `autocert serve` with {args.names:,} allowed names: {serve_idle * 100:.1f}% of a core "
          f"(the manager's once-a-second poll)")


def startup_and_memory(db: str, workdir: Path, args: argparse.Namespace, serve_server: object) -> None:
    make = serve_server  # type: ignore[assignment]
    code = "import time; t = time.perf_counter(); import autocert._cli, autocert._server; print(time.perf_counter() - t)"
    imports = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    def probed(make_server: object) -> list[tuple[float, float, float]]:
        timings = []
        for _ in range(3):
            server = make_server()  # type: ignore[operator]
            try:
                timings.append(server.start_probed(name_for(0)))
            finally:
                server.stop()
        return timings

    timings = probed(lambda: make("startup"))  # type: ignore[operator]
    small_db = workdir / "small.db"
    small_url = build_database(small_db, 10, make_chain(), UNREACHABLE_CA)

    def small_server() -> Server:
        port = free_port()
        return Server("small", [sys.executable, "-m", "autocert", "--db", small_url, "serve", "--https", f"127.0.0.1:{port}",
                                "--http", "none", "--admin", "none", "--directory", UNREACHABLE_CA, "--cache-size", "1000"],
                      port, "https listening")

    small_timings = probed(small_server)
    steps = json.loads(subprocess.run([sys.executable, str(HERE / "startup.py"), db], capture_output=True, text=True, check=True).stdout)
    server = make("memory")  # type: ignore[operator]
    try:
        server.start()
        rss_start, _ = rss_mib(server.pid)
        measured, _ = run_clients({"memory": (server.port, None)}, args.touch, clients=1, warmup=0,
                                  extra=["--names", str(args.touch), "--offset", "2000"])
        ok, failed, _ = measured["memory"]
        rss, peak = rss_mib(server.pid)
    finally:
        server.stop()
    print()
    print(f"`autocert serve` with {args.names:,} names, --cache-size 1000:")
    def medians(runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
        return tuple(statistics.median(run[i] for run in runs) for i in range(3))  # type: ignore[return-value]

    accepting, ready, answered = medians(timings)
    small_accepting, small_ready, small_answered = medians(small_timings)
    print(f"- start to accepting connections (port bound, clients queue): median {accepting:.2f} s of {len(timings)} "
          f"(target < 0.5 s: {'met' if accepting < 0.5 else '**missed**'}); with 10 names {small_accepting:.2f} s")
    print(f"- start to ready (\"https listening\" printed): {ready:.2f} s; with 10 names {small_ready:.2f} s; "
          f"importing what serve imports alone {float(imports.stdout or 'nan'):.2f} s")
    print(f"- start to the first handshake answered (made on the first accepted connection, certificate loaded from the "
          f"database): {answered:.2f} s; with 10 names {small_answered:.2f} s")
    print(f"- RSS after touching {args.touch:,} distinct names ({ok} served, {failed} failed): {rss:.0f} MiB, "
          f"peak {peak:.0f} MiB, {rss_start:.0f} MiB at start (target < 200 MB: {'met' if rss * 1.048576 < 200 else '**missed**'})")
    print("- step by step in one process (bench/startup.py), seconds and RSS after the step:")
    for key, label in [("imports", "import autocert._cli and autocert._server (what serve loads before it is ready)"), ("allowed_entries", "read the allowlist (cold)"),
                       ("manager_start", "Manager.start()"),
                       ("poll", "the once-a-second poll (Store.change_marks)"),
                       ("expiry_scan", "ExpiryMonitor first scan (starts right after listening)")]:
        print(f"  - {label}: {steps[key + '_s']:.3f} s, {steps[key + '_rss']:.0f} MiB")


if __name__ == "__main__":
    main()
