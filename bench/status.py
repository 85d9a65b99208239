"""The admin listener and ``autocert status`` with 100,000 names, side by side in one run.

    .venv/bin/python bench/status.py [--names 100000] [--repeat 15] [--seconds 20] [--before DIR]

Starts ``autocert serve`` on a database of ``--names`` names (``fixtures.py``) and measures the
status page (``/``, ``?state=failed``, a page deep into the list, a name search), the whole
``/status.json`` stream (time, and the server's RSS growth while it streams), TLS handshake
latency while admin requests run against idle, and ``autocert status --state failed`` from
process start. ``--before DIR`` measures the autocert in another checkout (say, the code before
the status index) the same way, on a copy of the database at that code's schema. Prints every
figure; nothing is asserted. See bench/README.md for the method and the results.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this checkout's autocert, whatever the venv has installed

from client import client_context
from fixtures import build_database, make_chain, name_for
from handshake import CLIENT_CPUS, Server, free_port, pin, rss_mib
from servers import UNREACHABLE_CA

WARM_NAMES = 1000
TARGETS = {
    "page": 0.100, "failed": 0.100, "deep": 0.100, "search": 0.100, "json": 3.0, "json_rss": 20.0, "busy_p99": 0.020, "cli": 0.5,
}


# -- one handshake client process ------------------------------------------------------------------


def handshake_client(port: int, seconds: float) -> None:
    """Sequential full handshakes over the warm names for ``seconds``; prints their latencies."""
    context = client_context()
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    for index in itertools.count():
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with context.wrap_socket(raw, server_hostname=name_for(index % WARM_NAMES)):
                latencies.append(time.perf_counter() - started)
    print(json.dumps(latencies))


def measure_handshakes(port: int, seconds: float) -> list[float]:
    process = subprocess.Popen([sys.executable, __file__, "--handshake-client", str(port), str(seconds)], stdout=subprocess.PIPE, text=True)
    os.sched_setaffinity(process.pid, CLIENT_CPUS)
    out, _ = process.communicate(timeout=seconds + 120)
    return json.loads(out)


# -- requests --------------------------------------------------------------------------------------------


def get(port: int, path: str) -> tuple[float, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        started = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
        return elapsed, body
    finally:
        connection.close()


def stream(port: int, path: str, pid: int) -> tuple[float, int, float]:
    """GET ``path`` reading as it comes: (seconds, bytes, the server's RSS growth in MiB
    over what it held just before, sampled every 10 ms while the body streamed)."""
    before = rss_mib(pid)[0]
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_mib(pid)[0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        started = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        size = 0
        while chunk := response.read(1 << 16):
            size += len(chunk)
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
        done.set()
        sampler.join()
    return elapsed, size, peak[0] - before


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1] if len(values) > 1 else values[0]


@dataclass
class Figures:
    label: str
    requests: dict[str, list[float]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    idle: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)


def measure(label: str, code: Path, db: str, args: argparse.Namespace, *, current: bool, pycache: Path) -> Figures:
    figures = Figures(label)
    port, admin = free_port(), free_port()
    # Bytecode cached in a tree of the bench's own (an installed package has its .pyc files;
    # PYTHONDONTWRITEBYTECODE would have every command compile autocert again).
    env = {"PYTHONPATH": str(code), "PYTHONPYCACHEPREFIX": str(pycache), "PYTHONDONTWRITEBYTECODE": ""}
    python = [sys.executable, "-P"]  # -P: the checkout named in PYTHONPATH, not the working directory
    server = Server(label, [*python, "-m", "autocert", "--db", db, "serve", "--https", f"127.0.0.1:{port}", "--http", "none",
                            "--admin", f"127.0.0.1:{admin}", "--directory", UNREACHABLE_CA, "--cache-size", str(WARM_NAMES)],
                    port, "https listening", env=env)
    try:
        server.start()
        pin(server.pid, set(os.sched_getaffinity(0)))  # any CPU, as in production; its database thread too
        time.sleep(3)  # the expiry watch's first scan and the first polls
        context = client_context()
        for index in range(WARM_NAMES):  # every name the handshake clients use is in the cache
            with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw, server_hostname=name_for(index)):
                pass
        figures.values["rss_start"] = rss_mib(server.pid)[0]
        paths = {"page": "/", "failed": "/?state=failed"}
        if current:
            # A cursor 90 % of the way down the default order, from the JSON's own next cursor.
            _, body = get(admin, f"/status.json?sort=attention&limit={args.names * 9 // 10}")
            paths["deep"] = "/?cursor=" + json.loads(body)["next"]
            paths["search"] = f"/?q={name_for(77_777)[:6]}"
        get(admin, "/")  # templates compiled, the first connection made
        repeat = args.repeat if current else max(2, args.repeat // 5)
        for key, path in paths.items():
            for _ in range(repeat):
                elapsed, body = get(admin, path)
                figures.requests.setdefault(key, []).append(elapsed)
                figures.sizes[key] = len(body)
        figures.values["rss_after_page"] = rss_mib(server.pid)[0]
        for _ in range(3):
            elapsed, size, growth = stream(admin, "/status.json", server.pid)
            figures.requests.setdefault("json", []).append(elapsed)
            figures.values["json_rss"] = max(figures.values.get("json_rss", 0.0), growth)
            figures.sizes["json"] = size
        figures.values.update(json=statistics.median(figures.requests["json"]), rss_after_json=rss_mib(server.pid)[0])

        figures.idle = measure_handshakes(port, args.seconds)
        stop = threading.Event()
        served: list[str] = []

        def admin_load() -> None:
            for path in itertools.cycle(["/status.json", *paths.values()]):
                if stop.is_set():
                    return
                get(admin, path)
                served.append(path)

        loader = threading.Thread(target=admin_load, daemon=True)
        loader.start()
        figures.busy = measure_handshakes(port, args.seconds)
        stop.set()
        loader.join()
        figures.values["busy_requests"] = len(served)

        # The code before has no --state: it prints every name, which is what it did for a few too.
        status = [*python, "-m", "autocert", "--db", db, "status"]
        runs = []
        for _ in range(6 if current else 2):
            started = time.perf_counter()
            subprocess.run([*status, "--state", "failed"] if current else status, env={**os.environ, **env}, stdout=subprocess.DEVNULL, check=True)
            runs.append(time.perf_counter() - started)
        figures.requests["cli"] = runs[1:]  # the first one compiles what it imports
        imports = []
        for _ in range(3):
            started = time.perf_counter()
            # What the listing needs (the code before read through the store).
            needs = "autocert._cli, autocert._listing" if current else "autocert._cli, autocert._status, autocert._store"
            subprocess.run([*python, "-c", f"import {needs}"], env={**os.environ, **env}, check=True)
            imports.append(time.perf_counter() - started)
        figures.requests["imports"] = imports
        started = time.perf_counter()
        subprocess.run(status, env={**os.environ, **env}, stdout=subprocess.DEVNULL, check=True)
        figures.values["cli_all"] = time.perf_counter() - started
        server.check_alive()
    finally:
        server.stop()
    return figures


def schema_0007(path: Path) -> str:
    """A copy of the database as the code before the status index knew it."""
    copy = path.with_name("before.db")
    shutil.copyfile(path, copy)
    with sqlite3.connect(copy) as db:
        db.executescript("DROP TABLE names; DROP INDEX ix_name_states_lease_until; UPDATE alembic_version SET version_num = '0007';")
    return f"sqlite:///{copy}"


# -- report ------------------------------------------------------------------------------------------------


def report(runs: list[Figures], names: int) -> None:
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"

    def request(figures: Figures, key: str) -> str:
        values = figures.requests.get(key)
        if not values:
            return "n/a"
        return f"{ms(statistics.median(values))} (max {ms(max(values))})"

    def verdict(value: float, target: float) -> str:
        return "met" if value <= target else "**missed**"

    now = runs[0]
    print(f"\n{names:,} names; medians (and maxima) of repeated requests; columns: {', '.join(f.label for f in runs)}, target\n")
    print("| measure | " + " | ".join(f.label for f in runs) + " | target |")
    print("|---|" + "---|" * len(runs) + "---|")
    rows = [
        ("`/` (status page)", "page", "≤ 100 ms"), ("`/?state=failed`", "failed", "≤ 100 ms"),
        ("a page 90 % down the default order (`/?cursor=…`)", "deep", "≤ 100 ms"), ("a name search (`/?q=n77777`)", "search", "≤ 100 ms"),
    ]
    for text, key, target in rows:
        value = statistics.median(now.requests[key])
        print(f"| {text} | " + " | ".join(request(f, key) for f in runs) + f" | {target} {verdict(value, TARGETS[key])} |")
    print("| `/status.json`, every name streamed | " + " | ".join(f"{request(f, 'json')}, {f.sizes['json'] / 1e6:.1f} MB" for f in runs)
          + f" | ≤ 3 s {verdict(now.values['json'], TARGETS['json'])} |")
    print("| RSS growth of `serve` while it streams (the most of 3) | " + " | ".join(f"{f.values['json_rss']:.1f} MiB" for f in runs)
          + f" | ≤ 20 MB {verdict(now.values['json_rss'] * 1.048576, TARGETS['json_rss'])} |")
    print("| RSS of `serve`: ready, after the page requests, after the stream | "
          + " | ".join(f"{f.values['rss_start']:.0f} / {f.values['rss_after_page']:.0f} / {f.values['rss_after_json']:.0f} MiB" for f in runs) + " | |")
    for text, key in (("TLS handshake, idle: p50 / p99 / max", "idle"), ("TLS handshake while admin requests run: p50 / p99 / max", "busy")):
        cells = []
        for f in runs:
            values = getattr(f, key)
            cells.append(f"{ms(statistics.median(values))} / {ms(quantile(values, 0.99))} / {ms(max(values))} ({len(values)})")
        target = f"p99 ≤ 20 ms {verdict(quantile(now.busy, 0.99), TARGETS['busy_p99'])}" if key == "busy" else ""
        print(f"| {text} | " + " | ".join(cells) + f" | {target} |")
    print("| admin requests served while handshakes were measured | " + " | ".join(f"{f.values['busy_requests']:.0f}" for f in runs) + " | |")
    print("| `autocert status --state failed`, from process start | " + " | ".join(request(f, "cli") for f in runs)
          + f" | ≤ 0.5 s {verdict(statistics.median(now.requests['cli']), TARGETS['cli'])} |")
    print("| of which Python starting and importing what `status` needs | " + " | ".join(request(f, "imports") for f in runs) + " | |")
    print("| `autocert status`, every name, table to /dev/null | " + " | ".join(ms(f.values["cli_all"]) for f in runs) + " | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15, help="requests of each kind (a fifth of them for --before)")
    parser.add_argument("--seconds", type=float, default=30, help="length of each handshake-latency run")
    parser.add_argument("--before", type=Path, help="another checkout to measure the same way, on a copy of the database at schema 0007")
    parser.add_argument("--handshake-client", nargs=2, metavar=("PORT", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.handshake_client:
        handshake_client(int(args.handshake_client[0]), float(args.handshake_client[1]))
        return
    workdir = Path(tempfile.mkdtemp(prefix="autocert-status-bench-"))
    try:
        started = time.perf_counter()
        path = workdir / "bench.db"
        db = build_database(path, args.names, make_chain(), UNREACHABLE_CA)
        print(f"database: {args.names:,} names in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        pycache = workdir / "pycache"
        runs = [measure("now", HERE.parent, db, args, current=True, pycache=pycache)]
        if args.before is not None:
            runs.append(measure("before", args.before.resolve(), schema_0007(path), args, current=False, pycache=pycache))
        report(runs, args.names)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
