"""aiohttp integration: the http-01 middleware, ``setup(app, manager)`` and the status sub-app.

``serve`` builds its own listeners from these same pieces, so an embedded autocert and the
standalone server answer challenges and report status identically.
"""

from __future__ import annotations

import hmac
import html
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .manager import Manager

__all__ = ["MANAGER_KEY", "middleware", "setup", "status_app"]

MANAGER_KEY: web.AppKey[Manager] = web.AppKey("autocert_manager", Manager)

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def challenge_response(manager: Manager, request: web.Request) -> web.Response | None:
    """The http-01 answer for this request, or None when it is not a challenge request."""
    if request.method not in ("GET", "HEAD") or not request.path.startswith(CHALLENGE_PREFIX):
        return None
    token = request.path[len(CHALLENGE_PREFIX) :]
    key_authorization = await manager.store.get_challenge(token) if token else None
    if key_authorization is None:
        return web.Response(status=404, text="no such ACME challenge\n")
    return web.Response(text=key_authorization, content_type="application/octet-stream")


def middleware(manager: Manager) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """An aiohttp middleware that answers ACME http-01 challenges before the app sees them."""

    @web.middleware
    async def autocert_challenges(request: web.Request, handler: Handler) -> web.StreamResponse:
        answer = await challenge_response(manager, request)
        if answer is not None:
            return answer
        return await handler(request)

    return autocert_challenges


def setup(app: web.Application, manager: Manager) -> None:
    """Answer http-01 on ``app`` and run the manager for the app's lifetime (``cleanup_ctx``)."""
    app[MANAGER_KEY] = manager
    app.middlewares.append(middleware(manager))

    async def manager_lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await manager.start()
        yield
        await manager.stop()

    app.cleanup_ctx.append(manager_lifecycle)


def require_token(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Every request needs ``Authorization: Bearer <token>`` (compared in constant time)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def bearer_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.Response(status=401, text="401: a valid bearer token is required\n", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return bearer_token


def status_app(manager: Manager, *, token: str | None = None) -> web.Application:
    """The status page (``/``), ``/status.json`` and ``/healthz`` as a mountable sub-app."""
    app = web.Application(middlewares=[require_token(token)] if token else [])
    app[MANAGER_KEY] = manager
    app.router.add_get("/", _status_page)
    app.router.add_get("/status.json", _status_json)
    app.router.add_get("/healthz", _healthz)
    return app


async def _status_json(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    report = await manager.status()
    return web.Response(text=json.dumps({"certificates": report}, indent=2) + "\n", content_type="application/json")


async def _healthz(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    try:
        await manager.store.ping()
    except Exception as exc:  # any database failure makes us unhealthy, whatever its type
        return web.Response(status=503, text=f"database unavailable: {exc}\n")
    return web.Response(text="ok\n")


async def _status_page(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    report = await manager.status()
    columns = ("name", "state", "not_after", "renew_at", "issuer", "attempts", "next_attempt_at", "last_error")
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    rows = "".join(
        f'<tr class="{html.escape(item["state"])}">'
        + "".join(f"<td>{html.escape('' if item[column] is None else str(item[column]))}</td>" for column in columns)
        + "</tr>"
        for item in report
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>autocert status</title></head><body><h1>autocert status</h1>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></body></html>"
    )
    return web.Response(text=page, content_type="text/html")
