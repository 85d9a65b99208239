"""The per-name status report behind ``autocert status`` and the admin listener's ``/`` and
``/status.json``: one function makes a STATUS object (see the contract) of a stored row for all
of them, so the CLI, the page and the JSON can never disagree.

The database filters, sorts and counts (:mod:`autocert._store.status`); this module reads a
page or a chunk of rows at a time and applies the state rule to each row it returns, with
the same ``now`` and the same set of names being ordered that the query used.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ._errors import InvalidName
from ._names import normalize_name
from ._policy import STATES
from ._status_rules import status_item
from ._store import SORTS, NameStatus, Position, StatusBatch, StatusCounts, StatusQuery, Store
from ._timefmt import utcnow

__all__ = [
    "CHUNK",
    "QueryError",
    "ReportPage",
    "StatusQuery",
    "parse_limit",
    "parse_query",
    "status_chunks",
    "status_counts",
    "status_item",
    "status_page",
    "status_report",
]

#: Rows read per query when a whole listing is streamed: small enough that turning them into
#: STATUS objects holds the event loop for a few milliseconds at most.
CHUNK = 200
class QueryError(ValueError):
    """A filter, sort, limit or cursor that cannot be used; ``parameter`` names it."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def parse_query(
    *,
    states: Iterable[str] = (),
    sort: str = "name",
    prefix: str | None = None,
    issuer: str | None = None,
    failing: bool = False,
    expiring: bool = False,
    expired: bool = False,
) -> StatusQuery:
    """A :class:`StatusQuery` from what a user typed; :class:`QueryError` names what is wrong.

    ``prefix`` is lowered and stripped of a trailing dot, like names are stored; a Unicode
    one is taken in its IDNA form when it is a whole name (part of a label has none).
    """
    wanted = frozenset(states)
    for state in sorted(wanted):
        if state not in STATES:
            raise QueryError("state", f"unknown state {state!r}; use one of {', '.join(STATES)}")
    if sort.removeprefix("-") not in SORTS:
        raise QueryError("sort", f"unknown sort {sort!r}; use one of {', '.join(SORTS)} (prefix - to reverse)")
    if prefix is not None:
        prefix = prefix.strip().lower().rstrip(".") or None
        if prefix is not None and not prefix.isascii():
            try:
                prefix = normalize_name(prefix)
            except InvalidName:
                raise QueryError("q", f"{prefix!r}: give a whole name, or the start of its xn-- form") from None
    return StatusQuery(states=wanted, sort=sort, prefix=prefix, issuer=issuer or None, failing=failing, expiring=expiring, expired=expired)


def parse_limit(value: str | None, parameter: str = "limit") -> int | None:
    if value is None or value == "":
        return None
    try:
        limit = int(value)
    except ValueError:
        raise QueryError(parameter, f"{value!r} is not a whole number") from None
    if limit < 1:
        raise QueryError(parameter, f"{limit} is not a count of names (1 or more)")
    return limit


async def _ordering(store: Store, in_flight: Collection[str], now: datetime) -> frozenset[str]:
    """Names being ordered: a lease held in the database, or in flight in this process."""
    return frozenset(await store.ordering_names(now) | set(in_flight))


def _items(rows: Iterable[NameStatus], ordering: frozenset[str], directory: str, now: datetime) -> list[dict[str, Any]]:
    return [status_item(row, ordering=row.name in ordering, directory=directory, now=now) for row in rows]


async def status_report(
    store: Store,
    *,
    directory: str,
    names: Sequence[str] | None = None,
    in_flight: Collection[str] = (),
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """STATUS objects for ``names`` (in the order given, unknown ones too), or for every known
    name sorted by name. For many names, :func:`status_chunks` holds less at once."""
    now = now or utcnow()
    if names is None:
        return [item async for chunk in status_chunks(store, StatusQuery(), directory=directory, in_flight=in_flight, now=now)
                for item in chunk]
    ordering = await _ordering(store, in_flight, now)
    return _items(await store.name_statuses(names), ordering, directory, now)


async def status_chunks(
    store: Store,
    query: StatusQuery,
    *,
    directory: str,
    in_flight: Collection[str] = (),
    now: datetime | None = None,
    chunk: int = CHUNK,
    limit: int | None = None,
    cursor: str | None = None,
    where: list[str | None] | None = None,
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """Every row ``query`` selects (at most ``limit``, from ``cursor``), in its order, as
    STATUS objects ``chunk`` at a time, from one snapshot of the database read in batches.

    With a ``limit``, ``where`` (a list) receives the cursor of what comes next, or None.
    """
    now = now or utcnow()
    after, forward = _decode(cursor, query)
    if not forward:
        raise QueryError("cursor", "this cursor leads backwards, to a previous page: a listing reads forwards")
    ordering = await _ordering(store, in_flight, now)
    shown, more = 0, False
    last: tuple[NameStatus, StatusBatch] | None = None
    rows = store.status_rows(query, ordering=ordering, now=now, after=after, limit=None if limit is None else limit + 1, batch=chunk)
    async with contextlib.aclosing(rows):
        async for batch in rows:
            for start in range(0, len(batch.rows), chunk):
                piece = batch.rows[start : start + chunk]
                if limit is not None and shown + len(piece) > limit:
                    more, piece = True, piece[: limit - shown]
                if piece:
                    shown += len(piece)
                    last = (piece[-1], batch)
                    yield _items(piece, ordering, directory, now)
    if where is not None:
        where.append(last[1].position(last[0]).encode(query.sort, True) if more and last is not None else None)


def _decode(cursor: str | None, query: StatusQuery) -> tuple[Position | None, bool]:
    if not cursor:
        return None, True
    try:
        return Position.decode(cursor, query.sort)
    except ValueError as exc:
        raise QueryError("cursor", str(exc)) from None


@dataclass(frozen=True)
class ReportPage:
    items: list[dict[str, Any]]
    next: str | None  # cursor of the page after this one
    previous: str | None  # cursor of the page before this one
    now: datetime


async def status_page(
    store: Store,
    query: StatusQuery,
    *,
    directory: str,
    limit: int,
    cursor: str | None = None,
    in_flight: Collection[str] = (),
    now: datetime | None = None,
) -> ReportPage:
    """One page of ``query`` with the cursors of its neighbours (keyset pagination: the
    thousandth page costs what the first does). :class:`QueryError` for a bad cursor."""
    now = now or utcnow()
    after, forward = _decode(cursor, query)
    ordering = await _ordering(store, in_flight, now)
    page = await store.status_page(query, ordering=ordering, now=now, limit=limit, after=after, forward=forward)
    first = page.first or after
    last = page.last or after
    if forward:
        more_after, more_before = page.more, after is not None
    else:
        more_after, more_before = True, page.more
    return ReportPage(
        items=_items(page.rows, ordering, directory, now),
        next=last.encode(query.sort, True) if more_after and last is not None else None,
        previous=first.encode(query.sort, False) if more_before and first is not None else None,
        now=now,
    )


async def status_counts(store: Store, *, in_flight: Collection[str] = (), now: datetime | None = None) -> StatusCounts:
    """How many names are in each state, expiring soon and needing attention."""
    now = now or utcnow()
    return await store.status_counts(await _ordering(store, in_flight, now), now)
