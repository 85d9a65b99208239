"""``autocert serve``: the TLS front, the http listener, the admin listener and signal handling.

The front reads each ClientHello with ``MSG_PEEK`` before TLS starts. Knowing the name (and
ALPN) up front lets it refuse unknown names with a bare 7-byte alert, answer tls-alpn-01,
await a certificate load or a first issuance, and only then hand the untouched socket to the
event loop's TLS with the right context.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import ssl
from dataclasses import dataclass

from aiohttp import web

from .config import Listen
from .errors import ConfigError
from .manager import Manager
from .metrics import Metrics
from .monitor import ExpiryMonitor
from .notify import Notifier
from .tls import (
    MAX_CLIENT_HELLO,
    UNRECOGNIZED_NAME_ALERT,
    ClientHello,
    NotClientHello,
    build_context,
    parse_client_hello,
)
from .web import CHALLENGE_PREFIX, challenge_response, middleware, status_app

log = logging.getLogger(__name__)

ACME_TLS_ALPN = "acme-tls/1"


@dataclass
class ServeOptions:
    https: Listen | None
    http: Listen | None
    admin: Listen | None
    admin_token: str | None = None
    upstream: str | None = None
    first_contact_wait: float = 10.0
    hsts: bool = False
    hello_timeout: float = 5.0
    handshake_timeout: float = 10.0
    #: How long in-flight requests (a slow page, a proxied download) may run on after
    #: SIGTERM; idle connections close at once, so an idle server still stops immediately.
    shutdown_timeout: float = 30.0
    on_event: str | None = None
    webhook: str | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_admin_binding(options: ServeOptions) -> None:
    if options.admin is not None and not is_loopback(options.admin.host) and not options.admin_token:
        raise ConfigError(f"--admin {options.admin}: refusing to expose the admin listener beyond loopback without --admin-token")


class TlsFront:
    """Accepts TLS connections and routes each one by its ClientHello."""

    def __init__(self, manager: Manager, protocol_factory: web.Server, options: ServeOptions) -> None:
        self._manager = manager
        self._protocol_factory = protocol_factory
        self._options = options
        self._connections: set[asyncio.Task[None]] = set()
        self._challenge_contexts: dict[tuple[str, bytes], ssl.SSLContext] = {}

    async def serve(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(listener)
            task = loop.create_task(self._handle(connection))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def close(self) -> None:
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _handle(self, connection: socket.socket) -> None:
        connection.setblocking(False)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handed_off = False
        try:
            try:
                hello = await asyncio.wait_for(self._peek_hello(connection), self._options.hello_timeout)
            except (asyncio.TimeoutError, NotClientHello, ConnectionError, OSError):
                return
            context = await self._context_for(hello)
            if context is None:
                self._reject(connection)
                return
            loop = asyncio.get_running_loop()
            handed_off = True
            await loop.connect_accepted_socket(
                self._protocol_factory, connection, ssl=context, ssl_handshake_timeout=self._options.handshake_timeout
            )
        except (ConnectionError, ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            log.debug("TLS connection ended early: %s", exc)
        finally:
            if not handed_off:
                connection.close()

    async def _context_for(self, hello: ClientHello) -> ssl.SSLContext | None:
        name = hello.server_name or self._manager.default_name
        handshakes = self._manager.handshakes
        if not name or not self._manager.is_allowed(name):
            handshakes["unknown_name"] += 1
            return None
        if ACME_TLS_ALPN in hello.alpn:
            handshakes["challenge"] += 1
            return await self._challenge_context(name)
        context = self._manager.cache.get(name)
        if context is None:
            context = await self._manager.context_for(name, wait=self._options.first_contact_wait)
        handshakes["served" if context is not None else "pending"] += 1
        return context

    async def _challenge_context(self, name: str) -> ssl.SSLContext | None:
        """The tls-alpn-01 certificate, served only to ``acme-tls/1`` clients while pending."""
        pending = self._manager.challenges.tls_alpn.get(name)
        if pending is None:
            return None
        cert_pem, key_pem = pending
        key = (name, cert_pem)
        context = self._challenge_contexts.get(key)
        if context is None:
            context = await asyncio.to_thread(build_context, cert_pem, key_pem, (ACME_TLS_ALPN,))
            self._challenge_contexts = {k: v for k, v in self._challenge_contexts.items() if k[0] != name}
            self._challenge_contexts[key] = context
        return context

    @staticmethod
    async def _peek_hello(connection: socket.socket) -> ClientHello:
        """Wait until the whole ClientHello is buffered, without consuming it."""
        loop = asyncio.get_running_loop()
        pause = 0.001
        seen = 0
        while True:
            readable = loop.create_future()
            loop.add_reader(connection.fileno(), readable.set_result, None)
            try:
                await readable
            finally:
                loop.remove_reader(connection.fileno())
            data = connection.recv(MAX_CLIENT_HELLO + 5, socket.MSG_PEEK)
            if not data:
                raise ConnectionError("closed before ClientHello")
            hello = parse_client_hello(data)
            if hello is not None:
                return hello
            if len(data) == seen:
                # Part of the hello is buffered; readiness stays set, so back off briefly
                # instead of spinning until the rest arrives.
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.05)
            seen = len(data)

    @staticmethod
    def _reject(connection: socket.socket) -> None:
        """Send the fatal unrecognized_name alert in plaintext and close.

        The peeked ClientHello is read first: closing a socket with unread data makes the
        kernel send a reset, which can make the client drop the alert unread.
        """
        with contextlib.suppress(OSError):
            while connection.recv(MAX_CLIENT_HELLO + 5):
                pass
        with contextlib.suppress(OSError):
            connection.send(UNRECOGNIZED_NAME_ALERT)
            connection.shutdown(socket.SHUT_WR)


class ListenError(ConfigError):
    """A listener could not bind; ``errno`` tells a busy port from a forbidden one."""

    def __init__(self, listen: Listen, error: OSError) -> None:
        self.errno = error.errno
        super().__init__(f"cannot listen on {listen}: {error.strerror or error}")


def listening_socket(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    try:
        sock = socket.create_server((listen.host, listen.port), family=family, backlog=1024, reuse_port=False)
    except OSError as exc:
        raise ListenError(listen, exc) from None
    sock.setblocking(False)
    return sock


def tls_app(options: ServeOptions) -> web.Application:
    """What TLS clients reach when no upstream is configured: a short confirmation page."""

    async def hello(request: web.Request) -> web.Response:
        response = web.Response(text=f"autocert is serving {request.host} over HTTPS\n")
        if options.hsts:
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def http_app(manager: Manager, options: ServeOptions) -> web.Application:
    """Port 80: http-01 answers, everything else 308 to the same URL on https."""
    https_port = options.https.port if options.https else 443

    async def redirect(request: web.Request) -> web.Response:
        if request.path.startswith(CHALLENGE_PREFIX):
            answer = await challenge_response(manager, request)
            if answer is not None:
                return answer
        host = (request.host or "").rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        authority = host if https_port == 443 else f"{host}:{https_port}"
        raise web.HTTPPermanentRedirect(f"https://{authority}{request.rel_url}")

    app = web.Application(middlewares=[middleware(manager)])
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


async def serve(manager: Manager, options: ServeOptions, *, ready: asyncio.Event | None = None) -> None:
    """Run every listener until SIGTERM or SIGINT, then shut down gracefully."""
    check_admin_binding(options)
    if options.upstream:
        from .proxy import proxy_app

        # Built before anything starts: a bad --upstream is a usage error with nothing written.
        https_application = proxy_app(options.upstream, hsts=options.hsts)
    else:
        https_application = tls_app(options)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runners: list[web.AppRunner] = []
    front: TlsFront | None = None
    accept_task: asyncio.Task[None] | None = None
    Metrics.of(manager)  # before start(), so the ACME client gets its latency hook
    notifier = Notifier(webhook=options.webhook, command=options.on_event)
    if notifier.enabled:
        notifier.attach(manager.events)
    monitor = ExpiryMonitor.of(manager)

    def listeners_health() -> str | None:
        if accept_task is not None and accept_task.done():
            return "https listener stopped accepting connections"
        return None

    await manager.start()
    await monitor.start()
    try:
        if options.http is not None:
            runners.append(await _start_site(http_app(manager, options), options.http, "http", options))
        if options.admin is not None:
            admin = status_app(manager, token=options.admin_token, checks=[listeners_health])
            runners.append(await _start_site(admin, options.admin, "admin", options))
        if options.https is not None:
            https_runner = web.AppRunner(https_application, shutdown_timeout=options.shutdown_timeout, handle_signals=False)
            await https_runner.setup()
            runners.append(https_runner)
            assert https_runner.server is not None
            listener = listening_socket(options.https)
            front = TlsFront(manager, https_runner.server, options)
            accept_task = loop.create_task(front.serve(listener))
            accept_task.add_done_callback(lambda _t: listener.close())
            _announce("https", listener)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("shutting down")
    finally:
        if accept_task is not None:
            accept_task.cancel()
            await asyncio.gather(accept_task, return_exceptions=True)
        for runner in reversed(runners):
            await runner.cleanup()
        if front is not None:
            await front.close()
        await monitor.stop()
        await manager.stop()
        await notifier.close(timeout=5.0)  # last events (e.g. a failure at shutdown) still go out
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _start_site(app: web.Application, listen: Listen, label: str, options: ServeOptions) -> web.AppRunner:
    runner = web.AppRunner(app, shutdown_timeout=options.shutdown_timeout, handle_signals=False, access_log=None)
    await runner.setup()
    sock = listening_socket(listen)
    site = web.SockSite(runner, sock)
    await site.start()
    _announce(label, sock)
    return runner


def _announce(label: str, sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = {"https": "https", "http": "http", "admin": "http"}[label]
    print(f"autocert: {label} listening on {scheme}://{shown}:{port}", flush=True)
