"""See autocert issue and serve a certificate end to end, on this machine, in a few seconds.

Run it through ``bash scripts/demo.sh`` (which installs what it needs first) or, inside the
project's virtual environment, as ``python examples/demo.py [--once] [--name NAME]``.

What it starts, all on loopback and all stopped again on Ctrl-C:

- a throw-away ACME CA: Pebble and its fake DNS ``pebble-challtestsrv``, which resolves every
  name to 127.0.0.1 (the same runner the test suite uses, ``tests/pebble.py``);
- a small aiohttp web app on a free port;
- ``autocert serve --upstream http://127.0.0.1:PORT`` in front of it, with a fresh SQLite
  database in a temporary directory. Pebble validates http-01 and tls-alpn-01 on fixed ports of
  127.0.0.1, so serve listens exactly there.

Then it allows the demo name, fetches a page with curl over verified HTTPS (the first request
waits while the certificate is issued), and prints the answer, the certificate and
``autocert status``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web
from cryptography import x509

REPO = Path(__file__).resolve().parent.parent
DEMO_NAME = "demo.autocert.test"
#: Longest wait for serve to bind its listeners; it is normally well under a second.
START_TIMEOUT = 60.0
#: serve gets this long to drain after SIGTERM before it is killed (its own limit is 30 s).
STOP_TIMEOUT = 40.0


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def load_pebble_runner() -> ModuleType:
    """The test suite's Pebble runner, loaded by path: one implementation for tests and demo."""
    path = REPO / "tests" / "pebble.py"
    spec = importlib.util.spec_from_file_location("autocert_demo_pebble", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child_env() -> dict[str, str]:
    """The environment for autocert children: the demo's own options only, never the user's."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AUTOCERT_") or key == "AUTOCERT_EVENT_LOOP"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sample_app() -> web.Application:
    """The web app autocert sits in front of: it shows what the proxy told it."""

    async def index(request: web.Request) -> web.Response:
        lines = [
            "Hello from the sample app behind autocert!",
            f"  Host:              {request.headers.get('Host')}",
            f"  X-Forwarded-Proto: {request.headers.get('X-Forwarded-Proto')}",
            f"  X-Forwarded-For:   {request.headers.get('X-Forwarded-For')}",
            f"  Forwarded:         {request.headers.get('Forwarded')}",
        ]
        return web.Response(text="\n".join(lines) + "\n")

    app = web.Application()
    app.router.add_get("/", index)
    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Demo:
    """Everything the demo starts, so that one ``close()`` stops all of it in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.workdir = Path(tempfile.mkdtemp(prefix="autocert-demo-"))
        self.db = f"sqlite:///{self.workdir / 'autocert.db'}"
        self.pebble: Any = None
        self.app_runner: web.AppRunner | None = None
        self.serve: asyncio.subprocess.Process | None = None
        self.serve_log = self.workdir / "serve.log"
        self._drain: asyncio.Task[None] | None = None
        #: Set when something failed, so the logs stay for a look.
        self.keep_workdir = False

    async def run(self, *, once: bool) -> int:
        runner = load_pebble_runner()
        say(f"working directory {self.workdir}/ (removed on exit)")
        say("starting a local ACME CA (Pebble) and its DNS (pebble-challtestsrv)")
        self.pebble = runner.Pebble(workdir=self.workdir / "pebble")
        self.pebble.start()
        root = self.workdir / "pebble-root.pem"
        root.write_bytes(self.pebble.root_pem())
        say(f"  ACME directory {self.pebble.directory_url}")

        app_port = free_port()
        self.app_runner = web.AppRunner(sample_app(), access_log=None)
        await self.app_runner.setup()
        await web.TCPSite(self.app_runner, "127.0.0.1", app_port).start()
        say(f"sample web app listening on http://127.0.0.1:{app_port}")

        await self.autocert("allow", self.name)
        say(f"allowed {self.name}")

        https_port = self.pebble.tlsalpn01_port
        admin_port = free_port()
        await self.start_serve(https_port, self.pebble.http01_port, admin_port, app_port)

        say(f"fetching https://{self.name}:{https_port}/ with curl (the first request waits for the certificate)")
        fetched = await self.fetch(https_port, root)
        if fetched:
            await self.describe_certificate(https_port, root)
        say("autocert status:")
        print(await self.autocert("status"), end="", flush=True)
        say(f"admin page: http://127.0.0.1:{admin_port}/  (status.json, metrics, healthz)")
        if not fetched:
            self.keep_workdir = True
            say(f"serve log kept in {self.serve_log}")
            return 1
        if once:
            return 0
        say(f"serve log: {self.serve_log}")
        say(f"try: curl --cacert {root} --resolve {self.name}:{https_port}:127.0.0.1 https://{self.name}:{https_port}/")
        say("running; press Ctrl-C to stop")
        await asyncio.Event().wait()  # until a signal cancels the demo
        return 0

    async def autocert(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "autocert", "--db", self.db, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env(), cwd=REPO,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"autocert {' '.join(args)} failed ({process.returncode}): {err.decode().strip()}")
        return out.decode()

    async def start_serve(self, https_port: int, http_port: int, admin_port: int, app_port: int) -> None:
        argv = [
            sys.executable, "-m", "autocert", "--db", self.db, "serve",
            "--https", f"127.0.0.1:{https_port}",
            "--http", f"127.0.0.1:{http_port}",
            "--admin", f"127.0.0.1:{admin_port}",
            "--upstream", f"http://127.0.0.1:{app_port}",
            "--directory", self.pebble.directory_url,
            "--ca-bundle", self.pebble.ca_bundle,
            "--email", "demo@autocert.test", "--agree-tos",
        ]
        say(f"starting autocert serve --upstream http://127.0.0.1:{app_port}")
        with open(self.serve_log, "wb") as log:
            # A session of its own: Ctrl-C reaches the demo only, which then stops serve
            # gracefully after everything that depends on it.
            self.serve = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=log, env=child_env(), cwd=REPO, start_new_session=True
            )
        assert self.serve.stdout is not None
        listening = 0
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while listening < 3:
                    line = await self.serve.stdout.readline()
                    if not line:
                        raise RuntimeError(f"autocert serve exited early:\n{self.serve_log.read_text()[-3000:]}")
                    if b"listening on" in line:
                        listening += 1
                        say(f"  {line.decode().strip()}")
        except TimeoutError:
            raise RuntimeError(f"autocert serve did not listen within {START_TIMEOUT:.0f} s") from None
        self._drain = asyncio.create_task(self._drain_stdout())

    async def _drain_stdout(self) -> None:
        assert self.serve is not None and self.serve.stdout is not None
        while await self.serve.stdout.readline():
            pass

    async def fetch(self, https_port: int, root: Path) -> bool:
        curl = shutil.which("curl")
        if curl is None:
            say("curl is not installed (bash scripts/setup.sh installs it)")
            return False
        process = await asyncio.create_subprocess_exec(
            curl, "--silent", "--show-error", "--include", "--max-time", "60",
            "--cacert", str(root), "--resolve", f"{self.name}:{https_port}:127.0.0.1",
            f"https://{self.name}:{https_port}/",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            say(f"curl failed ({process.returncode}): {err.decode().strip()}")
            return False
        say("response:")
        for line in out.decode(errors="replace").replace("\r\n", "\n").splitlines():
            print(f"  | {line}")
        return True

    async def describe_certificate(self, https_port: int, root: Path) -> None:
        der = await asyncio.to_thread(peer_certificate, https_port, self.name, root)
        certificate = x509.load_der_x509_certificate(der)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        say("certificate served:")
        print(f"  subject: {certificate.subject.rfc4514_string() or '(empty)'}")
        print(f"  names:   {', '.join(names.get_values_for_type(x509.DNSName))}")
        print(f"  issuer:  {certificate.issuer.rfc4514_string()}")
        print(f"  serial:  {certificate.serial_number:x}")
        print(f"  valid:   {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} to {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
              flush=True)

    async def close(self) -> None:
        if self.serve is not None and self.serve.returncode is None:
            say("stopping autocert serve")
            self.serve.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.serve.wait()
            except TimeoutError:
                self.serve.kill()
                await self.serve.wait()
        if self._drain is not None:
            self._drain.cancel()
        if self.app_runner is not None:
            await self.app_runner.cleanup()
        if self.pebble is not None:
            say("stopping Pebble")
            self.pebble.stop()
        if not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def peer_certificate(port: int, name: str, root: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(root))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stopping = False

    def on_signal() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    demo = Demo(args.name)
    try:
        return await demo.run(once=args.once)
    except asyncio.CancelledError:
        print()
        return 0
    except Exception as exc:  # a failed step: say which, keep the logs, clean up the rest
        say(f"failed: {exc}")
        demo.keep_workdir = True
        say(f"logs kept in {demo.workdir}")
        return 1
    finally:
        await demo.close()
        say("stopped")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="autocert end to end against a local ACME CA")
    parser.add_argument("--once", action="store_true", help="exit after the first fetch instead of running until Ctrl-C")
    parser.add_argument("--name", default=DEMO_NAME, help=f"the host name to serve (default {DEMO_NAME})")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
