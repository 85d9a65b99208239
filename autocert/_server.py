"""``autocert serve``: the TLS front, the http listener, the admin listener and signal handling.

The front reads each ClientHello before TLS starts. Knowing the name (and ALPN) up front lets
it refuse unknown names with a bare 7-byte alert, answer tls-alpn-01, await a certificate load
or a first issuance, and only then start the event loop's TLS on the same connection, with the
right context and the hello bytes replayed into it.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import functools
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from typing import cast

from aiohttp import web

from ._config import ServeOptions, bind_listeners, check_admin_binding
from ._manager import Manager
from ._metrics import Metrics
from ._monitor import ExpiryMonitor
from ._notify import Notifier
from ._tls import (
    MAX_CLIENT_HELLO,
    UNRECOGNIZED_NAME_ALERT,
    ClientHello,
    NotClientHello,
    build_context,
    client_hello_wanted,
    parse_client_hello,
)
from .web import CHALLENGE_PREFIX, challenge_response, middleware, status_app

log = logging.getLogger("autocert.server")

ACME_TLS_ALPN = "acme-tls/1"


class TlsFront:
    """Accepts TLS connections and routes each one by its ClientHello.

    The event loop accepts and reads in its own (C) code: every connection starts with a
    small plain protocol that collects the ClientHello as it arrives, so there is no Python
    accept loop, no task and no extra peek per connection. Once the hello is complete the
    front picks a context and turns the same transport into TLS by swapping in the loop's
    own ``SSLProtocol`` and feeding it the bytes already read, which is what
    ``loop.start_tls`` does minus the coroutine. A hand-off through ``sock_accept``, a task
    and ``connect_accepted_socket`` cost about 8% more CPU per handshake (``bench/``).

    Only names that need waiting (a database load, a first issuance, a new challenge
    certificate) get a task; their transport stops reading meanwhile.
    """

    def __init__(self, manager: Manager, protocol_factory: web.Server, options: ServeOptions) -> None:
        self._manager = manager
        self._protocol_factory = protocol_factory
        self._options = options
        self._connections: set[asyncio.Task[None]] = set()
        self._challenge_contexts: dict[tuple[str, bytes], ssl.SSLContext] = {}
        # Connections still waiting for their ClientHello, in two generations: every half
        # hello_timeout the older one is aborted, so one timer serves every connection.
        self._young: set[_HelloReader] = set()
        self._old: set[_HelloReader] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ssl_protocol: Callable[..., asyncio.BufferedProtocol] = asyncio.sslproto.SSLProtocol

    async def serve(self, listener: socket.socket) -> None:
        """Accept on ``listener`` until cancelled."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ssl_protocol = ssl_protocol_class(loop)
        server = await loop.create_server(functools.partial(_HelloReader, self), sock=listener, backlog=1024)
        sweeper = loop.create_task(self._sweep())
        try:
            await server.serve_forever()
        finally:
            sweeper.cancel()
            server.close()

    async def close(self) -> None:
        for reader in [*self._young, *self._old]:
            reader.abort()
        self._young.clear()
        self._old.clear()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _sweep(self) -> None:
        """Drop connections that have not sent a complete ClientHello in time."""
        period = max(self._options.hello_timeout / 2, 0.01)
        while True:
            await asyncio.sleep(period)
            stale, self._old, self._young = self._old, self._young, set()
            for reader in stale:
                reader.abort()

    def _done_waiting(self, reader: _HelloReader) -> None:
        self._young.discard(reader)
        self._old.discard(reader)

    def _hello_received(self, reader: _HelloReader, transport: asyncio.Transport, hello: ClientHello, data: bytes) -> None:
        """Route on the memory-only fast path; start a task only when something must be awaited."""
        manager = self._manager
        name = hello.server_name or manager.default_name
        if not name or not manager.is_allowed(name):
            manager.handshakes["unknown_name"] += 1
            self._reject(transport)
            return
        context: ssl.SSLContext | None
        if ACME_TLS_ALPN in hello.alpn:
            manager.handshakes["challenge"] += 1
            context = self._cached_challenge_context(name)
        else:
            context = manager.cache.get(name)
            if context is not None:
                manager.handshakes["served"] += 1
        if context is not None:
            self._start_tls(transport, context, data)
            return
        transport.pause_reading()
        assert self._loop is not None
        task = self._loop.create_task(self._route_later(reader, transport, hello, name, data))
        reader.task = task
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _route_later(self, reader: _HelloReader, transport: asyncio.Transport, hello: ClientHello, name: str, data: bytes) -> None:
        try:
            if ACME_TLS_ALPN in hello.alpn:
                context = await self._challenge_context(name)
            else:
                context = await self._manager.context_for(name, wait=self._options.first_contact_wait)
                self._manager.handshakes["served" if context is not None else "pending"] += 1
        except Exception:
            log.exception("could not pick a certificate for %s", name)
            context = None
        reader.task = None
        if transport.is_closing():
            return
        if context is None:
            self._reject(transport)
            return
        self._start_tls(transport, context, data)
        transport.resume_reading()

    def _start_tls(self, transport: asyncio.Transport, context: ssl.SSLContext, data: bytes) -> None:
        """Turn the plain transport into TLS, replaying the ClientHello bytes already read."""
        tls = self._ssl_protocol(
            self._loop, self._protocol_factory(), context, None,
            server_side=True, ssl_handshake_timeout=self._options.handshake_timeout,
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        view = memoryview(data)
        while view and not transport.is_closing():
            buffer = cast(memoryview, tls.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            tls.buffer_updated(size)
            view = view[size:]

    def _cached_challenge_context(self, name: str) -> ssl.SSLContext | None:
        pending = self._manager.challenges.tls_alpn.get(name)
        if pending is None:
            return None
        return self._challenge_contexts.get((name, pending[0]))

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
    def _reject(transport: asyncio.Transport) -> None:
        """Send the fatal unrecognized_name alert in plaintext and close.

        The whole ClientHello has been read by now, so closing does not make the kernel send
        a reset that could overtake the alert.
        """
        transport.write(UNRECOGNIZED_NAME_ALERT)
        transport.close()


class _HelloReader(asyncio.Protocol):
    """A connection's first protocol: collects the ClientHello, then hands over to the front."""

    __slots__ = ("_data", "_front", "_transport", "_wanted", "task")

    def __init__(self, front: TlsFront) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._data: bytes | bytearray = b""
        self._wanted = 0  # parse again only once this many bytes are here
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._front._young.add(self)

    def data_received(self, data: bytes | bytearray) -> None:
        if self._data:
            # A hello in several segments: grow one buffer, and parse only when a record
            # is complete, so a client sending bytes one by one cannot make this quadratic.
            self._data += data
            data = self._data
            if len(data) < self._wanted:
                return
        try:
            hello = parse_client_hello(data)
        except NotClientHello as exc:
            log.debug("dropping a connection that is not TLS: %s", exc)
            self.abort()
            return
        if hello is None:
            if len(data) > MAX_CLIENT_HELLO + 5:
                self.abort()
                return
            if not self._data:
                self._data = bytearray(data)
            self._wanted = client_hello_wanted(data)
            return
        self._data = b""
        self._front._done_waiting(self)
        self._front._hello_received(self, self._transport, hello, data)  # type: ignore[arg-type]

    def eof_received(self) -> bool | None:
        return None  # closed before a complete ClientHello: nothing to answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._front._done_waiting(self)
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Callable[..., asyncio.BufferedProtocol]:
    """The running loop's own TLS protocol: uvloop's reads straight into OpenSSL's buffer."""
    if type(loop).__module__.startswith("uvloop"):
        with contextlib.suppress(ImportError, AttributeError):
            from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]

            return SSLProtocol  # type: ignore[no-any-return]
    return asyncio.sslproto.SSLProtocol


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


async def serve(
    manager: Manager, options: ServeOptions, *, sockets: dict[str, socket.socket] | None = None, ready: asyncio.Event | None = None
) -> None:
    """Run every listener until SIGTERM or SIGINT, then shut down gracefully.

    ``sockets`` are the listeners already bound by :func:`autocert._config.bind_listeners`
    (the CLI binds them before it imports the server, so connections made while it starts
    wait in the kernel's queue instead of being refused); without them every configured
    listener is bound here. Sockets a failed start did not hand on are closed.
    """
    check_admin_binding(options)
    sockets = bind_listeners(options) if sockets is None else dict(sockets)
    try:
        await _serve(manager, options, sockets, ready)
    finally:
        for unused in sockets.values():  # a start that failed before handing them on
            unused.close()


async def _serve(manager: Manager, options: ServeOptions, sockets: dict[str, socket.socket], ready: asyncio.Event | None) -> None:
    if options.upstream:
        from ._proxy import proxy_app

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
    try:
        if "http" in sockets:
            runners.append(await _start_site(http_app(manager, options), sockets.pop("http"), "http", options))
        if "admin" in sockets:
            admin = status_app(manager, token=options.admin_token, checks=[listeners_health])
            runners.append(await _start_site(admin, sockets.pop("admin"), "admin", options))
        if "https" in sockets:
            https_runner = web.AppRunner(https_application, shutdown_timeout=options.shutdown_timeout, handle_signals=False)
            await https_runner.setup()
            runners.append(https_runner)
            assert https_runner.server is not None
            listener = sockets.pop("https")
            front = TlsFront(manager, https_runner.server, options)
            accept_task = loop.create_task(front.serve(listener))
            accept_task.add_done_callback(lambda _t: listener.close())
            _announce("https", listener)
        await monitor.start()  # its first scan runs once the listeners are up
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


async def _start_site(app: web.Application, sock: socket.socket, label: str, options: ServeOptions) -> web.AppRunner:
    runner = web.AppRunner(app, shutdown_timeout=options.shutdown_timeout, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    _announce(label, sock)
    return runner


def _announce(label: str, sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = {"https": "https", "http": "http", "admin": "http"}[label]
    print(f"autocert: {label} listening on {scheme}://{shown}:{port}", flush=True)
