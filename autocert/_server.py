"""``autocert serve``: what its listeners answer with, listener start-up and signal handling.

:func:`listeners` starts the http, admin and TLS listeners on sockets bound beforehand and
stops them in order; ``serve`` runs it until a signal, and the one-shot CLI commands run it
to answer ACME challenges while they order. The TLS listener is the ClientHello front of
:mod:`autocert._front`, which hands each connection to the lean HTTP/1.1 protocol of
:mod:`autocert._http` (the reverse proxy of :mod:`autocert._proxy`, or the confirmation
page), or in pass-through mode (``--upstream tcp://``) the front of
:mod:`autocert._passthrough`; the http listener runs the same HTTP/1.1 protocol (http-01
answers and redirects). Only the admin listener is an aiohttp application.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from ._config import ServeOptions, bind_listeners, check_admin_binding, tcp_upstream
from ._front import ProxyHeaderReader, TlsFront
from ._http import HttpServer
from ._http.exchange import Handler
from ._http.pages import confirmation_handler, redirect_handler
from ._manager import Manager
from ._metrics import Metrics
from ._monitor import ExpiryMonitor
from ._notify import Notifier
from ._passthrough import PassthroughFront
from ._signals import STOP_SIGNALS
from .web import status_app

log = logging.getLogger("autocert.server")


def https_handler(options: ServeOptions) -> Handler:
    """What TLS clients reach: the ``--upstream`` reverse proxy, else a one-line confirmation page."""
    if options.upstream:
        from ._proxy import ProxyHandler

        return ProxyHandler(options.upstream)
    return confirmation_handler()


def http_handler(manager: Manager, options: ServeOptions) -> Handler:
    """Port 80: http-01 answers from the database, everything else 308 to the same URL on https."""
    return redirect_handler(options.https.port if options.https else 443, manager.store.get_challenge)


def http_server(handler: Handler, options: ServeOptions, *, tls: bool) -> HttpServer:
    """The HTTP/1.1 side of a listener, with the timeouts, HSTS and access log of ``options``."""
    close = getattr(handler, "close", None)
    return HttpServer(
        handler, tls=tls, hsts=options.hsts and tls, header_timeout=options.header_timeout, idle_timeout=options.idle_timeout,
        access_log=options.access_log and tls, on_close=close,
    )


@contextlib.asynccontextmanager
async def listeners(
    manager: Manager,
    options: ServeOptions,
    sockets: dict[str, socket.socket],
    *,
    https: Handler | None = None,
    announce: bool = True,
) -> AsyncIterator[None]:
    """Listen on each of ``sockets`` (labelled ``http``, ``admin``, ``https``) while inside.

    ``http`` answers http-01 and redirects, ``admin`` serves the status app, ``https`` runs
    the ClientHello front in front of the ``https`` handler (default :func:`https_handler`), or
    relays to a ``tcp://`` upstream.
    Each socket is popped from ``sockets`` once a listener owns it, so the caller closes only
    what a failed start did not hand on. ``announce`` prints one ready line per listener.
    On the way out both listeners stop accepting, their connections drain (idle ones close at
    once, responses in flight get ``shutdown_timeout``, WebSockets are closed with 1001), the
    admin site stops, then connections still waiting for a ClientHello or a certificate are
    dropped.
    """
    loop = asyncio.get_running_loop()
    runners: list[web.AppRunner] = []
    servers: list[HttpServer] = []
    plain: asyncio.Server | None = None
    front: TlsFront | None = None
    accept_task: asyncio.Task[None] | None = None

    def listeners_health() -> str | None:
        if accept_task is not None and accept_task.done():
            return "https listener stopped accepting connections"
        return None

    try:
        if "http" in sockets:
            redirects = http_server(http_handler(manager, options), options, tls=False)
            servers.append(redirects)
            sock = sockets.pop("http")
            factory: Callable[[], asyncio.BaseProtocol] = redirects
            if options.trusted_proxies:
                factory = functools.partial(ProxyHeaderReader, redirects, options.trusted_proxies, options.hello_timeout)
            plain = await loop.create_server(factory, sock=sock, backlog=1024)
            if announce:
                _announce("http", sock)
        if "admin" in sockets:
            admin = status_app(manager, token=options.admin_token, checks=[listeners_health])
            runners.append(await _start_site(admin, sockets.pop("admin"), "admin", options, announce))
        if "https" in sockets:
            passthrough = tcp_upstream(options)
            if passthrough is not None:
                front = PassthroughFront(manager, options, passthrough)
            else:
                tls = http_server(https if https is not None else https_handler(options), options, tls=True)
                servers.append(tls)
                front = TlsFront(manager, tls, options)
            listener = sockets.pop("https")
            accept_task = loop.create_task(front.serve(listener))
            accept_task.add_done_callback(lambda _t: listener.close())
            if announce:
                _announce("https", listener)
        yield
    finally:
        if accept_task is not None:
            accept_task.cancel()
            await asyncio.gather(accept_task, return_exceptions=True)
        if plain is not None:
            plain.close()
        await asyncio.gather(*(server.shutdown(options.shutdown_timeout) for server in servers))
        for runner in reversed(runners):
            await runner.cleanup()
        if front is not None:
            await front.close()


async def serve(
    manager: Manager,
    options: ServeOptions,
    *,
    sockets: dict[str, socket.socket] | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run every listener until SIGTERM or SIGINT (or until ``stop`` is set, when the caller
    owns the signals), then shut down gracefully.

    ``sockets`` are the listeners already bound by :func:`autocert._config.bind_listeners`
    (the CLI binds them before it imports the server, so connections made while it starts
    wait in the kernel's queue instead of being refused); without them every configured
    listener is bound here. Sockets a failed start did not hand on are closed.
    """
    check_admin_binding(options)
    sockets = bind_listeners(options) if sockets is None else dict(sockets)
    try:
        await _serve(manager, options, sockets, ready, stop)
    finally:
        for unused in sockets.values():  # a start that failed before handing them on
            unused.close()


async def _serve(
    manager: Manager, options: ServeOptions, sockets: dict[str, socket.socket], ready: asyncio.Event | None, stop: asyncio.Event | None
) -> None:
    # Built before anything starts: a bad --upstream is a usage error with nothing written.
    https = None if tcp_upstream(options) is not None else https_handler(options)
    loop = asyncio.get_running_loop()
    owns_signals = stop is None
    if stop is None:
        stop = asyncio.Event()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop.set)
    Metrics.of(manager)  # before start(), so the ACME client gets its latency hook
    notifier = Notifier(webhook=options.webhook, command=options.on_event)
    if notifier.enabled:
        notifier.attach(manager.events)
    monitor = ExpiryMonitor.of(manager)
    await manager.start()
    try:
        async with listeners(manager, options, sockets, https=https):
            await monitor.start()  # its first scan runs once the listeners are up
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("shutting down")
    finally:
        await monitor.stop()
        await manager.stop()
        await notifier.close(timeout=5.0)  # last events (e.g. a failure at shutdown) still go out
        if owns_signals:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)


async def _start_site(app: web.Application, sock: socket.socket, label: str, options: ServeOptions, announce: bool) -> web.AppRunner:
    runner = web.AppRunner(app, shutdown_timeout=options.shutdown_timeout, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    if announce:
        _announce(label, sock)
    return runner


def _announce(label: str, sock: socket.socket) -> None:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    scheme = {"https": "https", "http": "http", "admin": "http"}[label]
    print(f"autocert: {label} listening on {scheme}://{shown}:{port}", flush=True)
