"""The database going away under ``autocert serve`` and coming back.

The test runs a PostgreSQL cluster of its own in a temporary directory (``initdb``, ``pg_ctl``),
never the shared server, and stops and starts it while serve runs.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pebble import free_port
from support import ServeProcess, served_certificate, wait_for

from autocert._store import Store


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free loopback port."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="autocert-pg-"))
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0  # PostgreSQL refuses to run as root
        if self.as_postgres:
            shutil.chown(self.base, "postgres", "postgres")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        argv = [os.path.join(self.bindir, tool), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=self.base)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stdout}{result.stderr}{self.log()}")

    def log(self) -> str:
        path = self.base / "log"
        return path.read_text() if path.exists() else ""

    def init(self) -> None:
        self._run("initdb", "-D", str(self.base / "data"), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.base / "data"), "-l", str(self.base / "log"), "-w", "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.base / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.base / "data" / "postmaster.pid").exists():
            subprocess.run([*(["runuser", "-u", "postgres", "--"] if self.as_postgres else []),
                            os.path.join(self.bindir, "pg_ctl"), "-D", str(self.base / "data"), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql: database outage test skipped")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start a private PostgreSQL cluster")
    cluster = PrivatePostgres(os.path.dirname(found[-1]))
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def _health(serve: ServeProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{serve.admin_port}/healthz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _allow(url: str, name: str) -> None:
    async def allow() -> None:
        async with await Store.open(url) as store:
            await store.allow([name])

    asyncio.run(allow())


def test_serving_goes_on_through_a_database_outage_and_everything_recovers(
    private_postgres: PrivatePostgres, pebble, root_ca: str, tmp_path: Path
) -> None:
    url = private_postgres.url
    _allow(url, "before.outage.test")
    with ServeProcess(url, pebble, tmp_path) as serve:
        first = served_certificate(serve.https_port, "before.outage.test", root_ca)
        assert _health(serve) == (200, "ok\n")

        private_postgres.stop()
        wait_for(lambda: _health(serve)[0] == 503, timeout=30, what="/healthz to report the outage")
        _, reason = _health(serve)
        assert "database unavailable" in reason, reason
        served = served_certificate(serve.https_port, "before.outage.test", root_ca, timeout=10)
        assert served.serial_number == first.serial_number, "the cached name is served from memory"

        private_postgres.start()
        wait_for(lambda: _health(serve) == (200, "ok\n"), timeout=60, what="/healthz to recover")
        wait_for(lambda: "listening for changes" in serve.output() and "again" in serve.output(), timeout=30,
                 what="the change listener to reconnect")
        started = time.monotonic()
        _allow(url, "after.outage.test")  # pushed to serve, which orders it on first contact
        served_certificate(serve.https_port, "after.outage.test", root_ca, timeout=60)
        print(f"\nafter the outage: a newly allowed name was issued and served in {time.monotonic() - started:.2f} s")
        assert "reachable again" in serve.output()
