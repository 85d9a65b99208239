"""Helpers for end-to-end tests: run the real CLI and server as processes, make real TLS
handshakes, and wait on conditions with generous bounds instead of sleeping."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from cryptography import x509

from pebble import Pebble, free_port, wait_for

__all__ = ["ServeProcess", "free_port", "run_cli", "handshake", "wait_for", "served_certificate", "openssl_s_client"]

REPO = Path(__file__).resolve().parent.parent


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AUTOCERT_DB", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(*args: str, db: str | None = None, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m autocert`` as a user would and capture its output."""
    argv = [sys.executable, "-m", "autocert", *(["--db", db] if db else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=cli_env(env), cwd=REPO)


def cli_json(*args: str, db: str) -> Any:
    result = run_cli(*args, "--json", db=db)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def acme_args(pebble: Pebble) -> list[str]:
    return ["--directory", pebble.directory_url, "--ca-bundle", pebble.ca_bundle, "--agree-tos", "--email", "ops@example.test"]


_started: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftovers() -> None:
    """A test that failed before stopping its server must not leave it running."""
    for process in _started:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class ServeProcess:
    """``autocert serve`` in a child process, listening where Pebble validates challenges."""

    def __init__(self, db: str, pebble: Pebble, workdir: Path, *, extra: Sequence[str] = (), env: dict[str, str] | None = None,
                 https_port: int | None = None, http_port: int | None = None, admin_port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.db = db
        self.host = host
        self.https_port = https_port or pebble.tlsalpn01_port
        self.http_port = http_port or pebble.http01_port
        self.admin_port = admin_port or free_port()
        # A listener option or --directory in ``extra`` replaces the default one (they add up
        # when repeated: several listeners, CAs to fall back on).
        listeners = [(flag, address) for flag, address in (("--https", f"{host}:{self.https_port}"),
                                                            ("--http", f"{host}:{self.http_port}"),
                                                            ("--admin", f"{host}:{self.admin_port}")) if flag not in extra]
        acme = acme_args(pebble)
        if "--directory" in extra:
            del acme[acme.index("--directory"):acme.index("--directory") + 2]
        self.argv = [
            sys.executable, "-m", "autocert", "--db", db, "serve",
            *(arg for pair in listeners for arg in pair),
            *acme, *extra,
        ]
        self.env = cli_env(env)
        self.workdir = workdir
        self.stdout_path = workdir / f"serve-{id(self)}.out"
        self.stderr_path = workdir / f"serve-{id(self)}.err"
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self, *, open_files: tuple[int, int] | None = None) -> ServeProcess:
        """Start the process without waiting for it to listen; ``open_files`` sets its
        RLIMIT_NOFILE (soft, hard) from the start."""
        limit = None if open_files is None else functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, open_files)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=err, env=self.env, cwd=REPO, start_new_session=True,
                                            preexec_fn=limit)
        _started.append(self.process)
        return self

    def ready(self) -> bool:
        """Whether every enabled listener has reported that it is listening."""
        return self.stdout_path.exists() and self.stdout_path.read_text().count("listening on") >= self._listeners()

    def _listeners(self) -> int:
        """One line per listener given, one per label left to its environment variable or default."""
        return sum(max(1, self.argv.count(flag)) for flag in ("--https", "--http", "--admin") if self._enabled(flag))

    def start(self, *, timeout: float = 60) -> ServeProcess:
        self.launch()

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.output()}")
            return self.ready()

        wait_for(ready, timeout=timeout, what="autocert serve to listen")
        return self

    def _enabled(self, flag: str) -> bool:
        given = [self.argv[i + 1] for i, arg in enumerate(self.argv) if arg == flag]
        return given != ["none"]

    def output(self) -> str:
        return f"--- stdout\n{self.stdout_path.read_text()}\n--- stderr\n{self.stderr_path.read_text()[-6000:]}"

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, *, timeout: float = 15) -> int:
        """SIGTERM, then wait; kill only if it does not stop within ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            raise AssertionError(f"serve did not stop within {timeout} s after SIGTERM:\n{self.output()}")

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def client_context(cafile: str | None, alpn: Sequence[str] | None = None) -> ssl.SSLContext:
    if cafile is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=cafile)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def handshake(port: int, server_name: str | None, *, cafile: str | None = None, alpn: Sequence[str] | None = None,
              timeout: float = 30, host: str = "127.0.0.1") -> x509.Certificate:
    """Make a real TLS handshake and return the certificate the server presented."""
    context = client_context(cafile, alpn)
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der)


def served_certificate(port: int, server_name: str, cafile: str, *, timeout: float = 60, host: str = "127.0.0.1") -> x509.Certificate:
    """Retry handshakes until the server presents a certificate that verifies (bounded)."""
    result: list[x509.Certificate] = []

    def attempt() -> bool:
        try:
            result.append(handshake(port, server_name, cafile=cafile, timeout=10, host=host))
            return True
        except (ssl.SSLError, OSError):
            return False

    wait_for(attempt, timeout=timeout, what=f"a verified certificate for {server_name}", interval=0.1)
    return result[-1]


def openssl_s_client(port: int, server_name: str | None, *, extra: Sequence[str] = ()) -> str:
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *(["-servername", server_name] if server_name else ["-noservername"]), *extra]
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    return result.stdout + result.stderr


def eventually(check: Callable[[], Any], *, timeout: float = 30, what: str = "condition") -> Any:
    """Call ``check`` until it returns a truthy value, and return that value."""
    box: list[Any] = []

    def probe() -> bool:
        value = check()
        if value:
            box.append(value)
            return True
        return False

    wait_for(probe, timeout=timeout, what=what, interval=0.1)
    return box[-1]


def monotonic() -> float:
    return time.monotonic()


async def websocket_echo(request: Any) -> Any:
    """An aiohttp WebSocket handler that sends every text message back."""
    from aiohttp import web

    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        await ws.send_str(message.data)
    return ws


def port_open(port: int, *, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on ``port`` of 127.0.0.1."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
    except OSError:
        return False
    return True


def fetch(port: int, name: str, cafile: str, *, source: str | None = None, host: str | None = None) -> int:
    """A new connection (from the loopback address ``source``, if given), a TLS handshake for
    ``name`` and one GET of ``/`` (``Host: host``, default ``name``): the status code."""
    with socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0) if source else None) as raw:
        with client_context(cafile).wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {host or name}\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
    return int(response.split(b" ", 2)[1])


class Requests:
    """Threads making new connections in a loop, each a TLS handshake and, unless
    ``get=False``, one GET of ``/`` (see :func:`fetch`); they count the successes and keep
    when each failure happened and what it was."""

    def __init__(self, port: int, name: str, cafile: str, threads: int = 3, *, get: bool = True) -> None:
        self.port, self.name, self.cafile, self.get = port, name, cafile, get
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _once(self) -> str | None:
        """One connection: None if it went well, else what went wrong."""
        try:
            if not self.get:
                handshake(self.port, self.name, cafile=self.cafile, timeout=60)
                return None
            status = fetch(self.port, self.name, self.cafile)
        except (OSError, ValueError, IndexError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if status == 200 else f"status {status}"

    def _loop(self) -> None:
        while not self._stop.is_set():
            failure = self._once()
            with self._lock:
                if failure is None:
                    self.ok += 1
                else:
                    self.failures.append((time.monotonic(), failure))

    def more(self, count: int, what: str, *, timeout: float = 120) -> None:
        """Wait until ``count`` more connections have gone well."""
        target = self.ok + count
        wait_for(lambda: self.ok >= target, timeout=timeout, what=what)

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)
