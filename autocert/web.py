"""aiohttp integration: the http-01 middleware, ``setup(app, manager)`` and the status sub-app.

``serve`` builds its own listeners from these same pieces, so an embedded autocert and the
standalone server answer challenges and report status identically.
"""

from __future__ import annotations

import functools
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import jinja2
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from ._errors import InvalidName, StoreError
from ._manager import Manager
from ._metrics import Metrics
from ._monitor import ExpiryMonitor
from ._names import normalize_name
from ._policy import STATES, is_expiring
from ._timefmt import isoformat

__all__ = ["MANAGER_KEY", "middleware", "setup", "status_app"]

MANAGER_KEY: web.AppKey[Manager] = web.AppKey("autocert_manager", Manager)

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: A health probe: None when fine, else a one-line reason for ``/healthz`` to report.
HealthCheck = Callable[[], "str | None"]

CHECKS_KEY: web.AppKey[Sequence[HealthCheck]] = web.AppKey("autocert_health_checks", Sequence)
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("autocert_metrics", Metrics)


async def challenge_response(manager: Manager, request: web.Request) -> web.Response | None:
    """The http-01 answer for this request, or None when it is not a challenge request."""
    if request.method not in ("GET", "HEAD") or not request.path.startswith(CHALLENGE_PREFIX):
        return None
    token = request.path[len(CHALLENGE_PREFIX) :]
    key_authorization = await manager.store.get_challenge(token) if token else None
    if key_authorization is None:
        return web.Response(status=404, text="no such ACME challenge\n")
    return web.Response(text=key_authorization, content_type="application/octet-stream")


def middleware(manager: Manager) -> Middleware:
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
        monitor = ExpiryMonitor.of(manager)  # expiring/expired events even without a status page
        await manager.start()
        await monitor.start()
        yield
        await monitor.stop()
        await manager.stop()

    app.cleanup_ctx.append(manager_lifecycle)


def require_token(token: str) -> Middleware:
    """Every request needs ``Authorization: Bearer <token>`` (compared in constant time)."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def bearer_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        # A header that is not UTF-8 cannot be the token: compare a stand-in, never fail.
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, expected):
            return web.Response(status=401, text="401: a valid bearer token is required\n", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return bearer_token


def status_app(
    manager: Manager, *, token: str | None = None, checks: Sequence[HealthCheck] = ()
) -> web.Application:
    """The admin pages as a mountable sub-app: ``/`` (HTML), ``/name/{name}``, ``/status.json``,
    ``/metrics`` (Prometheus) and ``/healthz``.

    ``checks`` are extra health probes (``serve`` passes one per listener); each returns None
    when fine or a one-line reason. The expiry monitor runs while the app runs, so expiring
    certificates are reported even when nothing else starts it.
    """
    app = web.Application(middlewares=[require_token(token)] if token else [])
    app[MANAGER_KEY] = manager
    app[CHECKS_KEY] = checks
    app[METRICS_KEY] = Metrics.of(manager)
    app.router.add_get("/", _status_page)
    app.router.add_get("/name/{name}", _name_page)
    app.router.add_get("/status.json", _status_json)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)

    async def monitor_lifecycle(_app: web.Application) -> AsyncIterator[None]:
        monitor = ExpiryMonitor.of(manager)
        await monitor.start()
        yield
        await monitor.stop()

    app.cleanup_ctx.append(monitor_lifecycle)
    return app


async def _status_json(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    report = await manager.status()
    return web.Response(text=json.dumps({"certificates": report}, indent=2) + "\n", content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    body = await request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    problems: list[str] = []
    try:
        await manager.store.ping()
    except Exception as exc:  # any database failure makes us unhealthy, whatever its type
        problems.append(f"database unavailable: {exc}")
    else:
        try:
            await manager.store.check_keys()
        except StoreError as exc:  # e.g. another instance wrote keys sealed with another secret
            problems.append(f"private keys unreadable: {exc}")
    for check in request.app[CHECKS_KEY]:
        try:
            problem = check()
        except Exception as exc:  # a broken probe is itself a reason to look
            problem = f"health check {check!r} failed: {exc}"
        if problem:
            problems.append(problem)
    if problems:
        return web.Response(status=503, text="\n".join(problems) + "\n")
    return web.Response(text="ok\n")


async def _status_page(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        return web.Response(status=400, text=f"unknown state {state!r}; use one of {', '.join(STATES)}\n")
    sort = request.query.get("sort") or DEFAULT_SORT
    if sort.lstrip("-") not in SORTS:
        return web.Response(status=400, text=f"unknown sort {sort!r}; use one of {', '.join(SORTS)} (prefix - to reverse)\n")
    now = datetime.now(timezone.utc)
    rows = [StatusRow.from_status(item, now) for item in await manager.status()]
    counts = {name: 0 for name in STATES}
    for row in rows:
        counts[row.state] += 1
    summary = {
        "total": len(rows),
        "attention": sum(1 for row in rows if row.needs_attention),
        "soon": sum(1 for row in rows if row.soon),
        "soonest": min((row for row in rows if row.not_after is not None and row.state != "disallowed"),
                       key=lambda row: row.not_after or now, default=None),
    }
    shown = [row for row in rows if state is None or row.state == state]
    shown.sort(key=SORTS[sort.lstrip("-")], reverse=sort.startswith("-"))
    page = render(
        "status.html",
        rows=shown[:PAGE_LIMIT],
        hidden=max(0, len(shown) - PAGE_LIMIT),
        counts=counts,
        summary=summary,
        state=state,
        sort=sort,
        sorts=SORT_LABELS,
        events=manager.events.recent(EVENTS_SHOWN),
        now=now,
        directory=manager.directory,
    )
    return web.Response(text=page, content_type="text/html")


async def _name_page(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    try:
        name = normalize_name(request.match_info["name"])
    except InvalidName as exc:
        return web.Response(status=404, text=f"no such name: {exc.reason}\n")
    now = datetime.now(timezone.utc)
    (item,) = await manager.status([name])
    attempts = await manager.store.attempts(name, limit=ATTEMPTS_SHOWN)
    if item["state"] == "disallowed" and not attempts and item["not_after"] is None:
        return web.Response(status=404, text=f"{name} is not allowed and has no history\n")
    page = render(
        "name.html",
        row=StatusRow.from_status(item, now),
        item=item,
        attempts=attempts,
        events=[event for event in manager.events.recent() if event.name == name][:EVENTS_SHOWN],
        now=now,
    )
    return web.Response(text=page, content_type="text/html")


# -- view model for the HTML pages ---------------------------------------------------------

#: Rows on the overview before it asks the reader to filter; keeps huge fleets' pages usable.
PAGE_LIMIT = 1000
EVENTS_SHOWN = 50
ATTEMPTS_SHOWN = 50

#: Most urgent first: the order of the default sort and of the ``state`` sort.
SEVERITY = {"failed": 0, "expired": 1, "renewing": 2, "issuing": 3, "pending": 4, "valid": 5, "disallowed": 6}

#: Under this many days left a certificate is flagged whatever its lifetime.
SOON_DAYS = 7.0


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


@dataclass(frozen=True)
class StatusRow:
    """One STATUS entry with what the page derives from it (days left, problem split, classes)."""

    name: str
    state: str
    not_before: datetime | None
    not_after: datetime | None
    renew_at: datetime | None
    issuer: str | None
    serial: str | None
    attempts: int
    next_attempt_at: datetime | None
    error_type: str | None
    error_detail: str | None
    days_left: float | None
    soon: bool

    @classmethod
    def from_status(cls, item: dict[str, Any], now: datetime) -> StatusRow:
        not_before, not_after = _parse_time(item["not_before"]), _parse_time(item["not_after"])
        renew_at = _parse_time(item["renew_at"])
        days_left = (not_after - now).total_seconds() / 86400 if not_after else None
        soon = bool(
            not_before and not_after and item["state"] != "disallowed" and now < not_after
            and ((days_left is not None and days_left < SOON_DAYS) or is_expiring(not_before, not_after, renew_at, now))
        )
        error_type, error_detail = split_problem(item["last_error"])
        return cls(
            name=item["name"],
            state=item["state"],
            not_before=not_before,
            not_after=not_after,
            renew_at=renew_at,
            issuer=item["issuer"],
            serial=item["serial"],
            attempts=int(item["attempts"]),
            next_attempt_at=_parse_time(item["next_attempt_at"]),
            error_type=error_type,
            error_detail=error_detail,
            days_left=days_left,
            soon=soon,
        )

    @property
    def needs_attention(self) -> bool:
        return self.state in ("failed", "expired") or self.soon

    @property
    def css_classes(self) -> str:
        classes = [f"state-{self.state}"]
        if self.soon:
            classes.append("soon")
        if self.needs_attention:
            classes.append("attention")
        return " ".join(classes)

    @property
    def issuer_short(self) -> str | None:
        """The issuer's CN (what people recognise), falling back to the whole DN."""
        if not self.issuer:
            return None
        for part in self.issuer.split(","):
            key, _, value = part.strip().partition("=")
            if key.upper() == "CN" and value:
                return value
        return self.issuer


def split_problem(error: str | None) -> tuple[str | None, str | None]:
    """``"urn:ietf:params:acme:error:connection: detail"`` into its problem type and detail."""
    if not error:
        return None, None
    if error.startswith("urn:"):
        problem_type, sep, detail = error.partition(": ")
        if sep:
            return problem_type, detail
        return error, None
    return None, error


def _sort_time(value: datetime | None) -> tuple[bool, datetime]:
    return (value is None, value or datetime.max.replace(tzinfo=timezone.utc))


SORTS: dict[str, Callable[[StatusRow], Any]] = {
    "attention": lambda row: (not row.needs_attention, SEVERITY.get(row.state, 9), _sort_time(row.not_after), row.name),
    "name": lambda row: row.name,
    "state": lambda row: (SEVERITY.get(row.state, 9), row.name),
    "expires": lambda row: (_sort_time(row.not_after), row.name),
    "renew": lambda row: (_sort_time(row.renew_at), row.name),
    "attempts": lambda row: (row.attempts, row.name),
    "next": lambda row: (_sort_time(row.next_attempt_at), row.name),
}
SORT_LABELS = {
    "attention": "needs attention",
    "name": "name",
    "state": "state",
    "expires": "expiry",
    "renew": "renewal",
    "attempts": "attempts",
    "next": "next attempt",
}
DEFAULT_SORT = "attention"


def _when(value: datetime | None, now: datetime) -> str:
    """A short relative time ("in 3 d", "5 min ago") that reads at a glance."""
    if value is None:
        return ""
    seconds = (value - now).total_seconds()
    size = abs(seconds)
    if size < 60:
        text = f"{size:.0f} s"
    elif size < 3600:
        text = f"{size / 60:.0f} min"
    elif size < 172800:
        text = f"{size / 3600:.0f} h"
    else:
        text = f"{size / 86400:.0f} d"
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def _utc(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if value else ""


def _iso(value: datetime | None) -> str:
    return isoformat(value) or ""


def _days(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}" if abs(value) < 10 else f"{value:.0f}"


@functools.cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("autocert", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(when=_when, utc=_utc, iso=_iso, days=_days)
    environment.globals.update(states=STATES)
    return environment


def render(template: str, **context: Any) -> str:
    return _environment().get_template(template).render(**context)
