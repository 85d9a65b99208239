"""Where `autocert serve` spends its start-up time and memory, step by step, in one process.

    python bench/startup.py sqlite:////path/to/bench.db

Prints one JSON object: seconds and RSS (MiB) after the imports, ``Store.open``, one
allowlist read, ``Manager.start``, one of the manager's once-a-second polls and the expiry
monitor's first scan, which ``serve`` starts right after listening.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


import asyncio
import importlib

for module in ("autocert._cli", "autocert._server"):  # what `autocert serve` imports before it is ready
    importlib.import_module(module)

from autocert._manager import Manager
from autocert._monitor import ExpiryMonitor
from autocert._store import Store

UNREACHABLE_CA = "https://127.0.0.1:9/directory"


async def measure(url: str) -> dict[str, float]:
    result: dict[str, float] = {"imports_s": time.perf_counter() - started, "imports_rss": rss_mib()}

    async def timed(key: str, step: object) -> None:
        began = time.perf_counter()
        await step  # type: ignore[misc]
        result[f"{key}_s"] = time.perf_counter() - began
        result[f"{key}_rss"] = rss_mib()

    store = await Store.open(url)
    await timed("allowed_entries", store.allowed_entries())
    await store.close()
    began = time.perf_counter()
    store = await Store.open(url)
    result["store_open_s"] = time.perf_counter() - began
    await store.close()
    manager = Manager(db=url, directory=UNREACHABLE_CA, cache_size=1000, renew=False, poll_interval=3600)
    await timed("manager_start", manager.start())
    await timed("poll", manager.store.change_marks())
    await timed("expiry_scan", ExpiryMonitor.of(manager).check())
    await manager.stop()
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(sys.argv[1]))))
