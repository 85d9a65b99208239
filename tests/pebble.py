"""A throw-away Pebble ACME server (plus its fake DNS) on loopback, for tests.

Tests talk to a real CA rather than to mocks because the subtle parts of ACME (nonces, polling,
problem documents, validation over real sockets) are exactly what mocks get wrong. Each
instance gets fresh free ports, its own listener certificate and its own issuing root, so
instances never interfere with each other or with whatever else runs on the machine.

Pebble resolves every name through ``pebble-challtestsrv``'s DNS, which answers 127.0.0.1 for
everything, so the validator always connects to loopback on ``http01_port``/``tlsalpn01_port``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import trustme
from aiohttp import web

__all__ = ["Http01Responder", "Pebble", "PebbleError", "TlsAlpn01Responder", "free_port", "wait_for"]

PEBBLE = os.environ.get("PEBBLE_BIN", "pebble")
CHALLTESTSRV = os.environ.get("PEBBLE_CHALLTESTSRV_BIN", "pebble-challtestsrv")

# Generous: Pebble normally answers within ~100 ms, but CI machines can be slow and loaded.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
_TAIL_BYTES = 4000


class PebbleError(RuntimeError):
    """Pebble or challtestsrv could not be started or did not answer as expected."""


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago and that this test run has not handed out yet
    (the kernel may offer the same just-closed port twice in a row)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``condition`` until it holds; the short interval keeps waits close to the real event."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.25)


class Pebble:
    """One Pebble + challtestsrv pair; use as a context manager or call start()/stop()."""

    def __init__(self, env: Mapping[str, str] | None = None, *, workdir: Path | None = None,
                 config: Mapping[str, Any] | None = None, dns_server: str | None = None) -> None:
        self.extra_env: dict[str, str] = dict(env or {})
        #: Extra keys for the ``pebble`` section of its config file, e.g.
        #: ``{"externalAccountBindingRequired": True, "externalAccountMACKeys": {KID: KEY}}``.
        self.extra_config: dict[str, Any] = dict(config or {})
        #: The DNS server (``HOST:PORT``) Pebble's validator resolves through; default this
        #: instance's challtestsrv. A test with an authoritative server of its own names it here.
        self.dns_server = dns_server
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="pebble-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

        self.listen_port = free_port()
        self.management_port = free_port()
        self.http01_port = free_port()
        self.tlsalpn01_port = free_port()
        self.dns_port = free_port()
        self.challtestsrv_port = free_port()

        self.directory_url = f"https://127.0.0.1:{self.listen_port}/dir"
        self.management_url = f"https://127.0.0.1:{self.management_port}"
        self.challtestsrv_url = f"http://127.0.0.1:{self.challtestsrv_port}"
        self.ca_bundle = str(self.workdir / "listener-ca.pem")

        self._pebble: subprocess.Popen[bytes] | None = None
        self._challtestsrv: subprocess.Popen[bytes] | None = None
        self._pebble_log = self.workdir / "pebble.log"
        self._challtestsrv_log = self.workdir / "challtestsrv.log"
        self._ssl: ssl.SSLContext | None = None
        self._listener: tuple[trustme.CA, trustme.LeafCert] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Pebble:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start both processes and return once the ACME directory answers."""
        if self._pebble is not None:
            raise PebbleError("already started")
        for tool in (PEBBLE, CHALLTESTSRV):
            if shutil.which(tool) is None:
                raise PebbleError(f"{tool} is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)  # stop() removes a workdir we created
        config = self._write_config()
        try:
            self._challtestsrv = self._spawn(
                [
                    CHALLTESTSRV,
                    "-defaultIPv4", "127.0.0.1",
                    "-defaultIPv6", "",
                    "-dns01", f"127.0.0.1:{self.dns_port}",
                    "-http01", "",
                    "-https01", "",
                    "-tlsalpn01", "",
                    "-management", f"127.0.0.1:{self.challtestsrv_port}",
                ],
                self._challtestsrv_log,
                env={},
            )
            self._wait_until_up(self._challtestsrv, self._challtestsrv_log, self._challtestsrv_answers, "challtestsrv")
            env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0", **self.extra_env}
            self._pebble = self._spawn(
                [PEBBLE, "-config", str(config), "-dnsserver", self.dns_server or f"127.0.0.1:{self.dns_port}"],
                self._pebble_log,
                env=env,
            )
            self._wait_until_up(self._pebble, self._pebble_log, self._directory_answers, "pebble")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop both processes (terminate, then kill after a bound) and reap them."""
        for attr in ("_pebble", "_challtestsrv"):
            proc: subprocess.Popen[bytes] | None = getattr(self, attr)
            setattr(self, attr, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        if self._own_workdir and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._pebble is not None and self._pebble.poll() is None

    # -- management helpers ------------------------------------------------------------

    def root_pem(self) -> bytes:
        """Pebble's issuing root, which is generated anew at every start."""
        return self._management_get("/roots/0")

    def intermediate_pem(self) -> bytes:
        return self._management_get("/intermediates/0")

    def cert_status(self, serial_hex: str) -> dict[str, object]:
        """Pebble's own record of a certificate (``Status`` is ``Valid`` or ``Revoked``)."""
        data = json.loads(self._management_get(f"/cert-status-by-serial/{serial_hex}"))
        if not isinstance(data, dict):
            raise PebbleError(f"unexpected cert-status answer: {data!r}")
        return data

    def add_a(self, host: str, ip: str) -> None:
        """Make the fake DNS answer ``ip`` for ``host`` (instead of the 127.0.0.1 default)."""
        self._challtestsrv_post("/add-a", {"host": host, "addresses": [ip]})

    def clear_a(self, host: str) -> None:
        self._challtestsrv_post("/clear-a", {"host": host})

    def txt_records(self, host: str) -> list[str]:
        """The TXT values challtestsrv's DNS answers for ``host`` now (asked over UDP)."""
        import dns.message
        import dns.query

        answer = dns.query.udp(dns.message.make_query(host, "TXT"), "127.0.0.1", port=self.dns_port, timeout=5)
        return [b"".join(rdata.strings).decode() for rrset in answer.answer for rdata in rrset if rrset.rdtype == 16]

    def logs(self) -> str:
        """Both processes' output so far, for failure messages."""
        return (
            f"--- pebble ---\n{_tail(self._pebble_log)}\n--- challtestsrv ---\n{_tail(self._challtestsrv_log)}"
        )

    # -- internals ---------------------------------------------------------------------

    def _write_config(self) -> Path:
        # The listener identity survives a stop/start, as a real CA's does across an outage.
        if self._listener is None:
            listener_ca = trustme.CA()
            self._listener = (listener_ca, listener_ca.issue_cert("localhost", "127.0.0.1"))
        ca, server = self._listener
        ca.cert_pem.write_to_path(self.ca_bundle)
        cert_path = self.workdir / "listener-cert.pem"
        key_path = self.workdir / "listener-key.pem"
        server.private_key_pem.write_to_path(str(key_path))
        with cert_path.open("wb") as out:
            for blob in server.cert_chain_pems:
                out.write(blob.bytes())
        self._ssl = ssl.create_default_context(cafile=self.ca_bundle)
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.listen_port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(cert_path),
                "privateKey": str(key_path),
                "httpPort": self.http01_port,
                "tlsPort": self.tlsalpn01_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                **self.extra_config,
            }
        }
        path = self.workdir / "pebble-config.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def _spawn(self, argv: list[str], log: Path, *, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **env},
            )

    def _wait_until_up(
        self, proc: subprocess.Popen[bytes], log: Path, answers: Callable[[], bool], what: str
    ) -> None:
        def ready() -> bool:
            if proc.poll() is not None:
                raise PebbleError(f"{what} exited with status {proc.returncode}:\n{_tail(log)}")
            return answers()

        try:
            wait_for(ready, timeout=START_TIMEOUT, what=f"{what} to answer")
        except TimeoutError as exc:
            raise PebbleError(f"{exc}\n{_tail(log)}") from None

    def _open(self, request: str | urllib.request.Request, *, timeout: float) -> Any:
        """urlopen that trusts the listener CA and ignores proxy variables: all traffic is loopback."""
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self._ssl)
        )
        return opener.open(request, timeout=timeout)

    def _directory_answers(self) -> bool:
        try:
            with self._open(self.directory_url, timeout=5) as resp:
                return resp.status == 200 and b"newNonce" in resp.read()
        except (OSError, urllib.error.URLError):
            return False

    def _challtestsrv_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.challtestsrv_port), timeout=5):
                return True
        except OSError:
            return False

    def _management_get(self, path: str) -> bytes:
        try:
            with self._open(self.management_url + path, timeout=10) as resp:
                return bytes(resp.read())
        except urllib.error.URLError as exc:
            raise PebbleError(f"GET {path} on Pebble's management port failed: {exc}") from exc

    def _challtestsrv_post(self, path: str, body: Mapping[str, object]) -> None:
        request = urllib.request.Request(
            self.challtestsrv_url + path, data=json.dumps(body).encode(), method="POST"
        )
        try:
            with self._open(request, timeout=10) as resp:
                resp.read()
        except urllib.error.URLError as exc:
            raise PebbleError(f"POST {path} to challtestsrv failed: {exc}") from exc


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no output)"
    return data[-_TAIL_BYTES:].decode(errors="replace")


# -- answering Pebble's validator -------------------------------------------------------------
#
# Minimal ChallengeResponder implementations that serve real sockets on the ports Pebble
# validates against, so tests exercise the same path a deployment does.


class Http01Responder:
    """Serves ``/.well-known/acme-challenge/<token>`` on 127.0.0.1:``port`` (aiohttp)."""

    challenge_types: tuple[str, ...] = ("http-01",)

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.answers: dict[str, str] = {}
        self.presented: list[tuple[str, str]] = []
        self.cleaned: list[tuple[str, str]] = []
        self.hits = 0
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Http01Responder:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            answer = self.answers.get(request.match_info["token"])
            if answer is None:
                raise web.HTTPNotFound()
            return web.Response(text=answer)

        app = web.Application()
        app.router.add_get("/.well-known/acme-challenge/{token}", handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def answer_for(self, token: str, key_authorization: str) -> str:
        """What to serve; override to serve something wrong."""
        return key_authorization

    async def present(self, name: str, challenge_type: str, token: str, key_authorization: str) -> None:
        self.presented.append((name, token))
        self.answers[token] = self.answer_for(token, key_authorization)

    async def cleanup(self, name: str, challenge_type: str, token: str) -> None:
        self.cleaned.append((name, token))
        self.answers.pop(token, None)


class TlsAlpn01Responder:
    """Answers tls-alpn-01 on 127.0.0.1:``port``: ALPN ``acme-tls/1`` with a per-name challenge cert."""

    challenge_types: tuple[str, ...] = ("tls-alpn-01",)

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.presented: list[tuple[str, str]] = []
        self.cleaned: list[tuple[str, str]] = []
        self.handshakes = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._server: asyncio.Server | None = None

    @staticmethod
    def _context() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["acme-tls/1"])
        return ctx

    async def __aenter__(self) -> TlsAlpn01Responder:
        self._dir = tempfile.TemporaryDirectory(prefix="tls-alpn-")
        base = self._context()

        def pick(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
            ctx = self.contexts.get(server_name or "")
            if ctx is None:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            sslobj.context = ctx
            return None

        base.sni_callback = pick

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.handshakes += 1
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

        self._server = await asyncio.start_server(on_connect, self.host, self.port, ssl=base)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    async def present(self, name: str, challenge_type: str, token: str, key_authorization: str) -> None:
        # Imported here so that the harness itself does not need the package importable.
        from autocert._crypto import tls_alpn_challenge_certificate

        assert self._dir is not None, "use the responder as an async context manager"
        cert_pem, key_pem = tls_alpn_challenge_certificate(name, key_authorization)
        path = Path(self._dir.name) / f"{name}.pem"
        path.write_bytes(key_pem + cert_pem)
        ctx = self._context()
        ctx.load_cert_chain(path)
        self.presented.append((name, token))
        self.contexts[name] = ctx

    async def cleanup(self, name: str, challenge_type: str, token: str) -> None:
        self.cleaned.append((name, token))
        self.contexts.pop(name, None)
