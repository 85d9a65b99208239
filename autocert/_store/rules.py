"""The status rules as SQL over the status index (:mod:`.names`).

A name's state (:func:`autocert._policy.name_status`) and its "expiring soon" flag
(:func:`~autocert._policy.expires_soon`) depend on four facts, each a column or two of the index:
whether the name is allowed; where its current certificate stands (none, expired, valid inside
its expiring-soon window (``soon_at``), valid); whether an order is under way (callers pass the
names being ordered); whether it is failing. The predicates are not written from those rules by
hand: :func:`classes` runs the rules themselves on a witness of every combination of facts, and
a state (or a sort group, or a filter) becomes the predicate that picks its combinations
(:func:`boxes`, :func:`box_sql`). So the SQL says what the rules say; the tests check it against
the rules applied in Python to the same rows.

Plans. Each query reads one chosen index (:func:`driver`): the order's own when it scans in
order, or the index of a small set (names being ordered, a prefix, the expiring-soon window,
expired, failing, disallowed or uncertified names) that is then sorted. SQLite's planner, which
keeps no statistics here, is told which by a unary ``+`` on every other column (it then cannot
use them); PostgreSQL's planner has statistics and chooses for itself.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, literal_column, or_, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from .._policy import expires_soon, expires_soon_from, name_status
from .records import _names

# --------------------------------------------------------------------------------------------
# Facts, and the state classes the rules make of them

#: allowed, certificate, ordering, failing
Facts = tuple[bool, str, bool, bool]
CERTIFICATE = ("none", "expired", "soon", "live")
DOMAINS: tuple[tuple[Any, ...], ...] = ((True, False), CERTIFICATE, (True, False), (True, False))
ALLOWED, CERT, ORDERING, FAILING = range(4)

#: A certificate in each standing, as (not_before, not_after, renew_at) offsets from now.
_WITNESS_TIMES: dict[str, tuple[timedelta, timedelta, timedelta] | None] = {
    "none": None,
    "expired": (timedelta(days=-91), timedelta(days=-1), timedelta(days=-31)),
    "soon": (timedelta(days=-89), timedelta(days=1), timedelta(days=-29)),
    "live": (timedelta(days=-10), timedelta(days=80), timedelta(days=50)),
}
_WITNESS_NOW = datetime(2000, 1, 1, tzinfo=UTC)

#: (state, expiring soon): what the page shows of a name, and what sorts group by.
Class = tuple[str, bool]
#: A set of combinations of facts written as one set of values per fact (their product).
Box = tuple[frozenset[Any], ...]


def _standing(not_before: datetime, not_after: datetime, renew_at: datetime, now: datetime) -> str:
    """The certificate fact as the index's columns answer it."""
    if not_after <= now:
        return "expired"
    return "soon" if expires_soon_from(not_before, not_after, renew_at) <= now else "live"


@functools.cache
def classes() -> dict[Facts, Class]:
    """What the rules say for a witness of every combination of facts."""
    now = _WITNESS_NOW
    table: dict[Facts, Class] = {}
    for facts in itertools.product(*DOMAINS):
        allowed, certificate, ordering, failing = facts
        offsets = _WITNESS_TIMES[certificate]
        not_before = not_after = renew_at = None
        if offsets is not None:
            not_before, not_after, renew_at = (now + offset for offset in offsets)
            if _standing(not_before, not_after, renew_at, now) != certificate:
                raise AssertionError(f"the witness of a {certificate!r} certificate no longer is one under the policy")
        state = name_status(allowed=allowed, not_after=not_after, ordering=ordering, failures=1 if failing else 0, now=now)
        soon = bool(state != "disallowed" and not_before and not_after and expires_soon(not_before, not_after, renew_at, now))
        table[facts] = (state, soon)
    return table


def boxes(combos: set[Facts], domains: Sequence[tuple[Any, ...]]) -> list[Box]:
    """``combos`` as few products of per-fact value sets as a simple split finds."""
    if not combos:
        return []
    projections = tuple(frozenset(facts[i] for facts in combos) for i in range(len(DOMAINS)))
    if math.prod(len(values) for values in projections) == len(combos):
        return [projections]
    split = next(i for i, values in enumerate(projections) if len(values) > 1)
    return [box for value in domains[split] if value in projections[split] for box in boxes({f for f in combos if f[split] == value}, domains)]


# --------------------------------------------------------------------------------------------
# SQL


class unindexed(FunctionElement[Any]):
    """A column SQLite may not use an index for (``+column``); as it is elsewhere."""

    inherit_cache = True
    name = "unindexed"

    def __init__(self, column: Any) -> None:
        super().__init__(column)
        self.type = column.type


@compiles(unindexed)
def _plain(element: unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(unindexed, "sqlite")
def _plus(element: unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return "+" + compiler.process(element.clauses, **kw)


Columns = Callable[[str], Any]


def columns(indexed: Collection[str]) -> Columns:
    """Columns of the status index by name, those not in ``indexed`` kept from SQLite's planner."""
    return lambda name: _names.c[name] if name in indexed else unindexed(_names.c[name])


def certificate_sql(values: frozenset[str], c: Columns, now: datetime) -> Any:
    """SQL true for the rows whose certificate stands as one of ``values`` at ``now``: ranges of
    ``not_after`` and ``soon_at`` (``soon_at`` < ``not_after`` always; both None without one)."""
    timed = values - {"none"}
    parts: list[Any] = []
    if timed == {"expired", "soon", "live"}:
        parts.append(c("not_after").is_not(None))
    elif timed == {"soon", "live"}:
        parts.append(c("not_after") > now)
    elif timed == {"expired", "soon"}:
        parts.append(c("soon_at") <= now)
    else:
        single = {"expired": lambda: c("not_after") <= now, "soon": lambda: and_(c("soon_at") <= now, c("not_after") > now),
                  "live": lambda: c("soon_at") > now}
        parts.extend(single[value]() for value in CERTIFICATE if value in timed)
    if "none" in values:
        parts.append(c("not_after").is_(None))
    return or_(*parts)


def box_sql(box: Box, domains: Sequence[tuple[Any, ...]], c: Columns, now: datetime, ordering: Sequence[str]) -> Any:
    """SQL true for the rows whose facts lie in ``box``; a fact left free (every value it can
    take, ``domains``) needs none. ``ordering``: the names being ordered."""
    terms: list[Any] = []
    if box[ALLOWED] != frozenset(domains[ALLOWED]):
        terms.append(c("allowed") if True in box[ALLOWED] else ~c("allowed"))
    if box[CERT] != frozenset(domains[CERT]):
        terms.append(certificate_sql(box[CERT], c, now))
    if box[ORDERING] != frozenset(domains[ORDERING]):
        terms.append(c("name").in_(ordering) if True in box[ORDERING] else c("name").not_in(ordering))
    if box[FAILING] != frozenset(domains[FAILING]):
        zero = literal_column("0")  # as written, so that the partial index on failures > 0 applies
        terms.append(c("failures") > zero if True in box[FAILING] else c("failures") == zero)
    return and_(true(), *terms)


def driver(selected: Sequence[Box], column: str | None, *, prefix: bool, issuer: bool) -> set[str]:
    """The columns left indexable (see :func:`columns`): those of the one index a query for
    the ``selected`` boxes ordered by ``column`` (None: not ordered) should read."""
    box = selected[0] if len(selected) == 1 else None
    if box is not None and box[ORDERING] == {True}:
        return {"name"}  # the few names being ordered
    if prefix:
        return {"name"}
    if box is not None:
        if "soon" in box[CERT] and box[CERT] <= {"soon", "expired"}:
            return {"soon_at"}
        if box[CERT] == {"expired"}:
            return {"not_after", "name"} if column == "not_after" else {"not_after"}
        if box[FAILING] == {True}:
            return {"failures", "name"}
        if box[ALLOWED] == {False}:
            return {"allowed", "name"}
        if box[CERT] == {"none"}:
            return {"not_after", "failures", "name"}
    if issuer and column == "name":
        return {"issuer", "name"}
    return {column or "name", "name"}


def prefix_range(prefix: str, c: Columns) -> Any:
    """Names starting with ``prefix`` as a range of the primary key (names are ASCII A-labels)."""
    return and_(c("name") >= prefix, c("name") < prefix + "\U0010ffff")
