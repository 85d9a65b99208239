"""``autocert serve``: the applications its listeners run, listener start-up and signal handling.

:func:`listeners` starts the http, admin and TLS listeners on sockets bound beforehand and
stops them in order; ``serve`` runs it until a signal, and the one-shot CLI commands run it
to answer ACME challenges while they order. The TLS listener is the ClientHello front of
:mod:`autocert._front`, in front of an aiohttp application, or in pass-through mode
(``--upstream tcp://``) of :mod:`autocert._passthrough`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from ._config import ServeOptions, bind_listeners, check_admin_binding, tcp_upstream
from ._front import TlsFront
from ._signals import STOP_SIGNALS
from ._manager import Manager
from ._metrics import Metrics
from ._monitor import ExpiryMonitor
from ._notify import Notifier
from ._passthrough import PassthroughFront
from .web import CHALLENGE_PREFIX, challenge_response, middleware, status_app

log = logging.getLogger("autocert.server")


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


def https_application(options: ServeOptions) -> web.Application:
    """What TLS clients reach: the ``--upstream`` reverse proxy, else :func:`tls_app`."""
    if options.upstream:
        from ._proxy import proxy_app

        return proxy_app(options.upstream, hsts=options.hsts)
    return tls_app(options)


@contextlib.asynccontextmanager
async def listeners(
    manager: Manager,
    options: ServeOptions,
    sockets: dict[str, socket.socket],
    *,
    https_app: web.Application | None = None,
    announce: bool = True,
) -> AsyncIterator[None]:
    """Listen on each of ``sockets`` (labelled ``http``, ``admin``, ``https``) while inside.

    ``http`` answers http-01 and redirects, ``admin`` serves the status app, ``https`` runs
    the ClientHello front in front of ``https_app`` (default :func:`https_application`), or
    relays to a ``tcp://`` upstream.
    Each socket is popped from ``sockets`` once a listener owns it, so the caller closes only
    what a failed start did not hand on. ``announce`` prints one ready line per listener.
    On the way out the front stops accepting, then the sites drain in reverse order of start,
    then connections still waiting for a ClientHello or a certificate are dropped.
    """
    runners: list[web.AppRunner] = []
    front: TlsFront | None = None
    accept_task: asyncio.Task[None] | None = None

    def listeners_health() -> str | None:
        if accept_task is not None and accept_task.done():
            return "https listener stopped accepting connections"
        return None

    try:
        if "http" in sockets:
            runners.append(await _start_site(http_app(manager, options), sockets.pop("http"), "http", options, announce))
        if "admin" in sockets:
            admin = status_app(manager, token=options.admin_token, checks=[listeners_health])
            runners.append(await _start_site(admin, sockets.pop("admin"), "admin", options, announce))
        if "https" in sockets:
            passthrough = tcp_upstream(options)
            if passthrough is not None:
                front = PassthroughFront(manager, options, passthrough)
            else:
                if https_app is None:
                    https_app = https_application(options)
                https_runner = web.AppRunner(https_app, shutdown_timeout=options.shutdown_timeout, handle_signals=False)
                await https_runner.setup()
                runners.append(https_runner)
                assert https_runner.server is not None
                front = TlsFront(manager, https_runner.server, options)
            listener = sockets.pop("https")
            accept_task = asyncio.get_running_loop().create_task(front.serve(listener))
            accept_task.add_done_callback(lambda _t: listener.close())
            if announce:
                _announce("https", listener)
        yield
    finally:
        if accept_task is not None:
            accept_task.cancel()
            await asyncio.gather(accept_task, return_exceptions=True)
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
    https_app = None if tcp_upstream(options) is not None else https_application(options)
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
        async with listeners(manager, options, sockets, https_app=https_app):
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
