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

from ._board import Board
from ._config import ServeOptions, bind_listeners, check_admin_binding, close_sockets, ready_line, tcp_upstream
from ._descriptors import DescriptorGuard
from ._duties import Duties
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
    return redirect_handler(options.https[0].port if options.https else 443, manager.store.get_challenge)


def http_server(handler: Handler, options: ServeOptions, *, tls: bool, guard: DescriptorGuard | None = None) -> HttpServer:
    """The HTTP/1.1 side of a listener, with the timeouts, HSTS and access log of ``options``."""
    close = getattr(handler, "close", None)
    return HttpServer(
        handler, tls=tls, hsts=options.hsts and tls, header_timeout=options.header_timeout, idle_timeout=options.idle_timeout,
        access_log=options.access_log and tls, on_close=close, host_check=options.host_check, guard=guard,
    )


@contextlib.asynccontextmanager
async def listeners(
    manager: Manager,
    options: ServeOptions,
    sockets: dict[str, list[socket.socket]],
    *,
    https: Handler | None = None,
    announce: bool = True,
) -> AsyncIterator[None]:
    """Listen on each of ``sockets`` (lists labelled ``http``, ``admin``, ``https``) while inside.

    ``http`` answers http-01 and redirects, ``admin`` serves the status app, ``https`` runs
    the ClientHello front in front of the ``https`` handler (default :func:`https_handler`), or
    relays to a ``tcp://`` upstream.
    Each socket is popped from ``sockets`` once a listener owns it, so the caller closes only
    what a failed start did not hand on. ``announce`` prints one ready line per listener.
    On the way out both listeners stop accepting and their connections drain: idle ones close
    at once; connections already accepted finish their ClientHello, certificate wait and
    handshake and get one response; responses in flight get ``shutdown_timeout``; WebSockets
    are closed with 1001. Then the admin site stops.
    """
    loop = asyncio.get_running_loop()
    runners: list[web.AppRunner] = []
    servers: list[HttpServer] = []
    plain: list[asyncio.Server] = []
    front: TlsFront | None = None
    accept_task: asyncio.Task[None] | None = None
    # One per process: every listener's clients count against the same open-file limit.
    guard = DescriptorGuard()
    restore_exception_handler = guard.watch_accept_errors(loop)

    def listeners_health() -> str | None:
        if accept_task is not None and accept_task.done():
            return "https listener stopped accepting connections"
        return None

    try:
        if sockets.get("http"):
            redirects = http_server(http_handler(manager, options), options, tls=False, guard=guard)
            servers.append(redirects)
            factory: Callable[[], asyncio.BaseProtocol] = redirects
            if options.trusted_proxies:
                factory = functools.partial(ProxyHeaderReader, redirects, options.trusted_proxies, options.hello_timeout)
            socks = sockets["http"]
            while socks:
                plain.append(await loop.create_server(factory, sock=socks[0], backlog=1024))
                sock = socks.pop(0)
                if announce:
                    _announce("http", sock)
        if sockets.get("admin"):
            board = manager.attachments.get(Board)  # under `serve --workers`: are they all running?
            checks = [listeners_health] if board is None else [listeners_health, board.health]
            admin = status_app(manager, token=options.admin_token, checks=checks)
            runners.append(await _start_site(admin, sockets["admin"], "admin", options, announce))
        if sockets.get("https"):
            passthrough = tcp_upstream(options)
            if passthrough is not None:
                front = PassthroughFront(manager, options, passthrough, guard)
            else:
                tls = http_server(https if https is not None else https_handler(options), options, tls=True, guard=guard)
                servers.append(tls)
                front = TlsFront(manager, tls, options, guard)
            tls_sockets = sockets.pop("https")
            accept_task = loop.create_task(front.serve(tls_sockets))
            accept_task.add_done_callback(lambda _t: close_sockets({"https": tls_sockets}))
            if announce:
                for sock in tls_sockets:
                    _announce("https", sock)
        yield
    finally:
        if accept_task is not None:
            accept_task.cancel()
            await asyncio.gather(accept_task, return_exceptions=True)
        for listener in plain:
            listener.close()
        for server in servers:
            server.start_draining()
        if front is not None:  # connections accepted before the stop still get their handshake
            await front.settle(options.hello_timeout + options.handshake_timeout)
        await asyncio.gather(*(server.shutdown(options.shutdown_timeout) for server in servers))
        for runner in reversed(runners):
            await runner.cleanup()
        if front is not None:
            await front.close()
        restore_exception_handler()


async def serve(
    manager: Manager,
    options: ServeOptions,
    *,
    sockets: dict[str, list[socket.socket]] | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    announce: bool = True,
) -> None:
    """Run every listener until SIGTERM or SIGINT (or until ``stop`` is set, when the caller
    owns the signals), then shut down gracefully.

    ``sockets`` are the listeners already bound by :func:`autocert._config.bind_listeners`
    (the CLI binds them before it imports the server, so connections made while it starts
    wait in the kernel's queue instead of being refused); without them every configured
    listener is bound here. Sockets a failed start did not hand on are closed.
    Renewals and the expiry watch run while this process holds the duties lease
    (:mod:`autocert._duties`). ``announce`` prints the ready lines (a worker leaves that to
    its supervisor).
    """
    check_admin_binding(options)
    sockets = bind_listeners(options) if sockets is None else dict(sockets)
    try:
        await _serve(manager, options, sockets, ready, stop, announce)
    finally:
        close_sockets(sockets)  # what a start that failed did not hand on


async def _serve(
    manager: Manager, options: ServeOptions, sockets: dict[str, list[socket.socket]], ready: asyncio.Event | None, stop: asyncio.Event | None,
    announce: bool,
) -> None:
    # Built before anything starts: a bad --upstream is a usage error with nothing written.
    https = None if tcp_upstream(options) is not None else https_handler(options)
    loop = asyncio.get_running_loop()
    owns_signals = stop is None
    if stop is None:
        stop = asyncio.Event()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, stop.set)
    metrics = Metrics.of(manager)  # before start(), so the ACME client gets its latency hook
    notifier = Notifier(webhook=options.webhook, command=options.on_event)
    if notifier.enabled:
        notifier.attach(manager.events)
    monitor = ExpiryMonitor.of(manager)
    duties = Duties(manager, monitor)
    await manager.start()
    board = manager.attachments.get(Board)  # a worker of `serve --workers`: share the figures
    publisher = loop.create_task(metrics.publish(board), name="autocert-board") if board is not None else None
    try:
        async with listeners(manager, options, sockets, https=https, announce=announce):
            await monitor.start()  # its first scan runs once the listeners are up
            await duties.start()
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("shutting down")
    finally:
        await duties.stop()
        await monitor.stop()
        await manager.stop()
        await notifier.close(timeout=5.0)  # last events (e.g. a failure at shutdown) still go out
        if publisher is not None:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        if owns_signals:
            for signum in STOP_SIGNALS:
                loop.remove_signal_handler(signum)


async def _start_site(app: web.Application, socks: list[socket.socket], label: str, options: ServeOptions, announce: bool) -> web.AppRunner:
    """Serve ``app`` on each of ``socks``, taking each out of the list once a site owns it."""
    runner = web.AppRunner(app, shutdown_timeout=options.shutdown_timeout, handle_signals=False, access_log=None)
    await runner.setup()
    while socks:
        await web.SockSite(runner, socks[0]).start()
        sock = socks.pop(0)
        if announce:
            _announce(label, sock)
    return runner


def _announce(label: str, sock: socket.socket) -> None:
    print(ready_line(label, sock), flush=True)
