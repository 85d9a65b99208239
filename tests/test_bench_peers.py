"""The benches run end to end: bench/peers.py and bench/workers.py, quick passes against
autocert alone (peers.py behind the bench's own static upstream). Only that they complete
and print autocert's rows; no number is checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_peers_quick_autocert_only() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    bench = subprocess.Popen([sys.executable, str(ROOT / "bench" / "peers.py"), "--quick", "--no-nginx", "--no-caddy"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = bench.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        bench.terminate()  # SIGTERM: the bench stops the servers it started
        stdout, stderr = bench.communicate(timeout=30)
        pytest.fail(f"bench/peers.py --quick did not finish in 100 s:\n{stderr[-3000:]}")
    assert bench.returncode == 0, stderr[-3000:]
    main, _, floors = stdout.partition("Python's floors")
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in main.splitlines() if line.startswith("| ") and not line.startswith("| request")}
    assert len(rows) == 6, stdout
    floor_rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in floors.splitlines() if line.startswith("| ")}
    assert {label for label, value in floor_rows.items() if value.replace(".", "", 1).isdigit()} >= {"autocert", "uvloop floor", "blocking floor"}, stdout
    for title, (nginx, caddy, autocert, *_ratios) in rows.items():
        assert nginx == "skipped (--no-nginx)" and caddy == "skipped (--no-caddy)", title
        measured = autocert.replace(".", "", 1).isdigit()
        # TCP pass-through is measured once autocert has it, and says so until then.
        assert measured or ("TCP pass-through" in title and autocert == "not supported by this autocert"), (title, autocert)


@pytest.mark.timeout(180)
def test_workers_bench_quick_autocert_only() -> None:
    """bench/workers.py completes a short pass with both worker settings (no number checked)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    bench = subprocess.Popen([sys.executable, str(ROOT / "bench" / "workers.py"), "--rounds", "1", "--seconds", "1", "--clients", "2",
                              "--keepalive", "5", "--spread", "40", "--cache", "20", "--no-nginx", "--no-caddy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = bench.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        bench.terminate()
        stdout, stderr = bench.communicate(timeout=30)
        pytest.fail(f"bench/workers.py did not finish in 150 s:\n{stderr[-3000:]}")
    assert bench.returncode == 0, stderr[-3000:]
    rows = [line for line in stdout.splitlines() if line.startswith(("| connect", "| keep-alive"))]
    assert len(rows) == 6, stdout
    assert all(row.rstrip().endswith("| – |") for row in rows), "no Caddy, no ratio to it"
    assert sum("| control: " in row for row in rows) == 2, "the separate processes are measured under both loads"
    assert len(re.findall(r"every worker ÷ the control: \d+\.\d\d", stdout)) == 2, stdout
    memory = [line.split("|")[2] for line in stdout.splitlines() if line.startswith("| autocert") and "MiB" not in line and " | " in line
              and ("process " in line or "supervisor " in line)]
    assert len(memory) == 2, stdout
    single, every = memory
    cpus = len(os.sched_getaffinity(0))  # `auto` on one CPU is a single process too
    assert single.strip().startswith("process ") and every.strip().startswith("supervisor " if cpus > 1 else "process "), stdout
    assert every.count("worker ") == (cpus if cpus > 1 else 0), "the RSS of each worker"
    split = [line.split("|")[2:4] for line in stdout.splitlines() if line.startswith("| autocert") and line.count("|") == 6]
    assert [int(per_worker) for per_worker, _ in split] == [20, 20 // cpus], stdout
    assert all(0.0 <= float(ratio) <= 1.0 for _, ratio in split), "a hit ratio for each setting"
