"""aiohttp integration: the http-01 middleware, ``setup(app, manager)`` and the status sub-app.

``serve`` builds its own listeners from these same pieces, so an embedded autocert and the
standalone server answer challenges and report status identically.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import jinja2
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST

from ._errors import InvalidName, StoreError
from ._issuers import ca_label
from ._http.hosts import MISDIRECTED_PAGE, misdirected
from ._manager import SERVED_NAME, Manager
from ._metrics import Metrics
from ._monitor import ExpiryMonitor
from ._names import normalize_name
from ._policy import STATES, expires_soon, needs_attention
from ._status import QueryError, StatusQuery, parse_limit, parse_query, status_chunks, status_counts, status_page
from ._timefmt import isoformat

__all__ = ["MANAGER_KEY", "middleware", "refuse_misdirected", "setup", "status_app"]

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


@web.middleware
async def refuse_misdirected(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``421 Misdirected Request`` for a request whose host is not the name its TLS connection
    was served for by :meth:`Manager.ssl_context` (as ``serve`` does); plain HTTP and other
    contexts pass."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
    name = getattr(ssl_object, SERVED_NAME, None)
    if name is not None:
        host = request.headers.get("Host")
        if misdirected(None if host is None else host.encode("latin-1"), request.raw_path.encode("latin-1"), name):
            return web.Response(status=421, body=MISDIRECTED_PAGE, content_type="text/html", charset="utf-8",
                                headers={"Connection": "close"})
    return await handler(request)


def setup(app: web.Application, manager: Manager, *, host_check: bool = True) -> None:
    """Answer http-01 on ``app``, answer 421 to requests for another host than their TLS
    connection's (``host_check=False``: don't), and run the manager for the app's lifetime
    (``cleanup_ctx``)."""
    app[MANAGER_KEY] = manager
    app.middlewares.append(middleware(manager))
    if host_check:
        app.middlewares.append(refuse_misdirected)

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


def _query_from(request: web.Request) -> StatusQuery:
    """The filters and sort of a status request; :class:`QueryError` names a bad parameter."""
    params = request.query
    flags = {}
    for flag in FLAGS:
        value = params.get(flag, "")
        if value not in ("", "0", "1"):
            raise QueryError(flag, f"{value!r}: use {flag}=1")
        flags[flag] = value == "1"
    return parse_query(
        states=[state for state in params.getall("state", []) if state], sort=params.get("sort") or DEFAULT_SORT,
        prefix=params.get("q"), issuer=params.get("issuer"), **flags,
    )


def _bad_request(error: QueryError) -> web.Response:
    return web.Response(status=400, text=f"{error.parameter}: {error}\n")


async def _status_json(request: web.Request) -> web.StreamResponse:
    """The contract's ``{"certificates": [STATUS, ...]}``, streamed a chunk at a time from one
    snapshot; ``limit`` and ``cursor`` page it, and a ``next`` cursor is added then."""
    manager = request.app[MANAGER_KEY]
    try:
        query = _query_from(request)
        if not request.query.get("sort"):
            query = dataclasses.replace(query, sort="name")
        limit = parse_limit(request.query.get("limit"))
    except QueryError as error:
        return _bad_request(error)
    following: list[str | None] = []
    chunks = status_chunks(manager.store, query, directory=manager.directory, in_flight=manager.worker.in_flight,
                           limit=limit, cursor=request.query.get("cursor") or None, where=following)
    async with contextlib.aclosing(chunks):
        try:
            first = await anext(chunks, None)  # a bad cursor shows here, before anything is sent
        except QueryError as error:
            return _bad_request(error)
        response = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        await response.prepare(request)
        await response.write(b'{"certificates": [\n')
        chunk, separator = first, b""
        while chunk is not None:
            await response.write(separator + _json_lines(chunk))
            separator = b",\n"
            await asyncio.sleep(0)  # a write that fits the buffer does not yield: give TLS its turn
            chunk = await anext(chunks, None)
    tail = "\n]"
    if limit is not None:
        tail += ', "next": ' + json.dumps(following[0] if following else None)
    await response.write((tail + "}\n").encode())
    await response.write_eof()
    return response


def _json_lines(items: list[dict[str, Any]]) -> bytes:
    """STATUS objects as JSON, one a line: one ``dumps`` for the chunk (a call per item costs
    three times as much), then a line break at each object's start, which no string can hide
    (a quote inside a string is escaped)."""
    return json.dumps(items)[1:-1].replace('}, {"name": ', '},\n{"name": ').encode()


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
    """The summary (counted in the database), one page of names in the chosen order with
    links to the pages around it, and the recent events."""
    manager = request.app[MANAGER_KEY]
    try:
        query = _query_from(request)
        if len(query.states) > 1:
            raise QueryError("state", "the page shows one state at a time (status.json takes several)")
        now = datetime.now(timezone.utc)
        in_flight = manager.worker.in_flight
        page = await status_page(manager.store, query, directory=manager.directory, limit=PAGE_SIZE,
                                 cursor=request.query.get("cursor") or None, in_flight=in_flight, now=now)
    except QueryError as error:
        return _bad_request(error)
    counts = await status_counts(manager.store, in_flight=in_flight, now=now)
    soonest = None
    if counts.soonest is not None:
        name, not_after = counts.soonest
        soonest = {"name": name, "days_left": (not_after - now).total_seconds() / 86400}
    state = next(iter(query.states), None)
    matching = counts.states[state] if state else counts.total
    if query.prefix or query.issuer or query.failing or query.expired or (query.expiring and state):
        matching = None  # not counted: only the states and the whole list are
    elif query.expiring:
        matching = counts.soon
    filters = {"state": state, "sort": query.sort if query.sort != DEFAULT_SORT else None, "q": query.prefix, "issuer": query.issuer,
               **{flag: "1" if getattr(query, flag) else None for flag in FLAGS}}
    text = await render_in_turns(
        "status.html",
        rows=[StatusRow.from_status(item, now) for item in page.items],
        page=page,
        filters=filters,
        matching=matching,
        counts=counts.states,
        summary={"total": counts.total, "attention": counts.attention, "soon": counts.soon, "soonest": soonest},
        state=state,
        sort=query.sort,
        sorts=SORT_LABELS,
        flags=FLAGS,
        events=manager.events.recent(EVENTS_SHOWN),
        now=now,
        directories=[issuer.directory for issuer in manager.issuers],
    )
    return web.Response(text=text, content_type="text/html")


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

#: Rows on one page of the overview; the links below it lead to the pages around it.
PAGE_SIZE = 100
EVENTS_SHOWN = 50
ATTEMPTS_SHOWN = 50

#: Filters that are on or off (``?failing=1``), with what the page calls them.
FLAGS = {"failing": "failing", "expiring": "expiring soon", "expired": "expired certificate"}


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
    ca: str | None
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
        soon = bool(not_before and not_after and item["state"] != "disallowed" and expires_soon(not_before, not_after, renew_at, now))
        error_type, error_detail = split_problem(item["last_error"])
        return cls(
            name=item["name"],
            state=item["state"],
            not_before=not_before,
            not_after=not_after,
            renew_at=renew_at,
            issuer=item["issuer"],
            ca=item["ca"],
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
        return needs_attention(self.state, self.soon)

    @property
    def css_classes(self) -> str:
        classes = [f"state-{self.state}"]
        if self.soon:
            classes.append("soon")
        if self.needs_attention:
            classes.append("attention")
        return " ".join(classes)

    @property
    def ca_label(self) -> str | None:
        """The host of the CA that issued the certificate: with several CAs, which one it was."""
        return ca_label(self.ca) if self.ca else None

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


#: The sorts the page offers (the database sorts: see ``autocert._store.status.SORTS``).
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


def _link(filters: dict[str, str | None], **changes: str | None) -> str:
    """This page's query string with ``changes`` (None drops a parameter): filters kept, the
    default sort and empty values left out, no cursor unless one is given."""
    merged = {**filters, **changes}
    if merged.get("sort") == DEFAULT_SORT:
        merged["sort"] = None
    return "?" + urllib.parse.urlencode(sorted((key, value) for key, value in merged.items() if value))


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
    environment.filters.update(when=_when, utc=_utc, iso=_iso, days=_days, ca=ca_label)
    environment.globals.update(states=STATES, link=_link)
    return environment


def render(template: str, **context: Any) -> str:
    return _environment().get_template(template).render(**context)


#: How long rendering may hold the event loop (which also serves TLS) before giving it a turn.
RENDER_SLICE = 0.002


async def render_in_turns(template: str, **context: Any) -> str:
    """:func:`render` for a page of many rows: piece by piece, letting the event loop run
    other callbacks every :data:`RENDER_SLICE` seconds (a page of 100 names takes tens of
    milliseconds to render on a small machine)."""
    loop = asyncio.get_running_loop()
    pieces: list[str] = []
    deadline = loop.time() + RENDER_SLICE
    for piece in _environment().get_template(template).generate(**context):
        pieces.append(piece)
        if loop.time() > deadline:
            await asyncio.sleep(0)
            deadline = loop.time() + RENDER_SLICE
    return "".join(pieces)
