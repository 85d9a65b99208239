"""The status rules as SQL over the status index, for any query builder: the store's
SQLAlchemy one and the plain-SQL one behind ``autocert status`` (:mod:`autocert._listing`),
which must not pay for importing SQLAlchemy.

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

A sort is a sequence of parts: groups of state classes in rank order, each in the order of one
column (rows without a value last) and then of name.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

from ._policy import SEVERITY, STATES, expires_soon, expires_soon_from, is_allowed, name_status, needs_attention
from ._timefmt import isoformat

# --------------------------------------------------------------------------------------------
# Facts, and the state classes the rules make of them

#: allowed, certificate, ordering, failing
Facts = tuple[bool, str, bool, bool]
CERTIFICATE = ("none", "expired", "soon", "live")
DOMAINS: tuple[tuple[Any, ...], ...] = ((True, False), CERTIFICATE, (True, False), (True, False))
ALLOWED, CERT, ORDERING, FAILING = range(4)

#: A certificate in each standing, as (not_before, not_after, renew_at) offsets from now.
_WITNESSSORTED_TIMES: dict[str, tuple[timedelta, timedelta, timedelta] | None] = {
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
        offsets = _WITNESSSORTED_TIMES[certificate]
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


class Columns(Protocol):
    """How a query builder writes the status index's columns (``c("name")``, compared with
    Python's operators, ``is_``/``is_not``/``in_``/``not_in``, ``~``) and joins terms. A builder
    is made for a set of indexable columns (:func:`driver`); it keeps SQLite's planner off
    the others."""

    zero: Any  # the integer 0, written literally

    def __call__(self, name: str) -> Any: ...
    def and_(self, *terms: Any) -> Any: ...
    def or_(self, *terms: Any) -> Any: ...
    def true(self) -> Any: ...


#: The status index's columns a report row is made of, in :class:`NameStatus` order.
ROW_COLUMNS = ("name", "allowed", "not_before", "not_after", "renew_at", "serial", "issuer", "directory", "attempts", "failures",
               "last_error", "next_attempt_at")
#: Of those, the times: read as the driver hands them over (SQLite's text, asyncpg's
#: datetime), which :func:`status_record` turns into the report's form.
TIME_COLUMNS = ("not_before", "not_after", "renew_at", "next_attempt_at")


# --------------------------------------------------------------------------------------------
# SQL


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
        single = {"expired": lambda: c("not_after") <= now, "soon": lambda: c.and_(c("soon_at") <= now, c("not_after") > now),
                  "live": lambda: c("soon_at") > now}
        parts.extend(single[value]() for value in CERTIFICATE if value in timed)
    if "none" in values:
        parts.append(c("not_after").is_(None))
    return c.or_(*parts)


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
        # c.zero is written as a literal 0, so that the partial index on failures > 0 applies.
        terms.append(c("failures") > c.zero if True in box[FAILING] else c("failures") == c.zero)
    return c.and_(c.true(), *terms)


def driver(selected: Sequence[Box], column: str | None, *, prefix: bool, issuer: bool) -> set[str]:
    """The columns a :class:`Columns` builder leaves indexable: those of the one index a query
    for the ``selected`` boxes ordered by ``column`` (None: not ordered) should read."""
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
    return c.and_(c("name") >= prefix, c("name") < prefix + "\U0010ffff")


# --------------------------------------------------------------------------------------------
# Queries, sorts and plans


@dataclass(frozen=True)
class StatusQuery:
    """Which names to show and in what order. Empty ``states``: every state."""

    states: frozenset[str] = frozenset()
    failing: bool = False  # consecutive failures since the last success, whatever the state
    expiring: bool = False  # flagged as expiring soon (policy.expires_soon), not disallowed
    expired: bool = False  # the current certificate has expired, whatever the state
    prefix: str | None = None
    issuer: str | None = None
    sort: str = "name"  # a key of SORTS; a leading "-" reverses the order

    def __post_init__(self) -> None:
        unknown = set(self.states) - set(STATES)
        if unknown:
            raise ValueError(f"unknown state {sorted(unknown)[0]!r}")
        if self.sort.removeprefix("-") not in SORTS:
            raise ValueError(f"unknown sort {self.sort!r}")


@dataclass(frozen=True)
class Sort:
    """Rows in groups ranked by their class, then by ``column`` (missing values last), then name."""

    rank: Callable[[str, bool], tuple[int, ...]] | None
    column: str


SORTS: dict[str, Sort] = {
    "attention": Sort(lambda state, soon: (int(not needs_attention(state, soon)), SEVERITY[state]), "not_after"),
    "name": Sort(None, "name"),
    "state": Sort(lambda state, soon: (SEVERITY[state],), "name"),
    "expires": Sort(None, "not_after"),
    "renew": Sort(None, "renew_at"),
    "attempts": Sort(None, "attempts"),
    "next": Sort(None, "next_attempt_at"),
}
#: Sort columns that are times, and of those the ones missing exactly when there is no certificate.
SORTED_TIMES = ("not_after", "renew_at", "next_attempt_at")
NULL_WITHOUT_CERTIFICATE = ("not_after", "renew_at")


@dataclass(frozen=True)
class Part:
    rank: tuple[int, ...]
    null: bool
    boxes: tuple[Box, ...]


class Plan:
    """One query's parts in reading order, with what rendering them needs."""

    def __init__(self, query: StatusQuery, ordering: Sequence[str], now: datetime) -> None:
        self.query, self.ordering, self.now = query, ordering, now
        # The values each fact can take in the database now: with nobody ordering, the
        # ordering fact needs no SQL. Filters only narrow the combinations wanted.
        domains = list(DOMAINS)
        if not ordering:
            domains[ORDERING] = (False,)
        self.domains = domains
        table = classes()
        self.combos = {
            facts for facts in itertools.product(*domains)
            if (not query.states or table[facts][0] in query.states) and (not query.expiring or table[facts][1])
            and (not query.failing or facts[FAILING]) and (not query.expired or facts[CERT] == "expired")
        }

    def where(self, selected: Sequence[Box], c: Columns) -> Any:
        terms = [c.or_(*(box_sql(box, self.domains, c, self.now, self.ordering) for box in selected))]
        if self.query.prefix:
            terms.append(prefix_range(self.query.prefix, c))
        if self.query.issuer:
            terms.append(c("issuer") == self.query.issuer)
        return c.and_(*terms)

    def parts(self, sort: Sort) -> list[Part]:
        """Parts in ascending order: by group rank, then values before missing values."""
        table = classes()
        groups: dict[tuple[int, ...], set[Facts]] = {}
        for facts in self.combos:
            rank = sort.rank(*table[facts]) if sort.rank else ()
            groups.setdefault(rank, set()).add(facts)
        parts = []
        for rank in sorted(groups):
            found = boxes(groups[rank], self.domains)
            if sort.column not in SORTED_TIMES:
                parts.append(Part(rank, False, tuple(found)))
                continue
            for null in (False, True):
                fitting = found
                if sort.column in NULL_WITHOUT_CERTIFICATE:  # missing exactly when there is no certificate
                    fitting = [box[:CERT] + (box[CERT] & ({"none"} if null else set(CERTIFICATE) - {"none"}),) + box[CERT + 1 :] for box in found]
                    fitting = [box for box in fitting if box[CERT]]
                if fitting:
                    parts.append(Part(rank, null, tuple(fitting)))
        return parts


# --------------------------------------------------------------------------------------------
# Rows


class NameStatus(NamedTuple):
    """One name's row of the status index as the report shows it: times already in the
    contract's ISO 8601 form (a stream turns 100,000 of them into JSON, and parsing each time
    to print it again was most of the cost), and ``expires``, the certificate's ``not_after``
    as a time, for the state rule. Whether an order is under way is the caller's to say."""

    name: str
    allowed: bool
    not_before: str | None
    not_after: str | None
    renew_at: str | None
    serial: str | None
    issuer: str | None
    directory: str | None
    attempts: int
    failures: int
    last_error: str | None
    next_attempt_at: str | None
    expires: datetime | None


def _iso(value: str | datetime | None) -> str | None:
    """:func:`autocert._timefmt.isoformat` of a raw time, without making a datetime of the
    text SQLite stores (``YYYY-MM-DD HH:MM:SS.ffffff``, naive UTC)."""
    if value is None or not isinstance(value, str):
        return isoformat(value)
    text = value.replace(" ", "T", 1)
    return (text[:-7] if text.endswith(".000000") else text) + "Z"


def _time(value: str | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value.astimezone(UTC) if value is not None else None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def status_record(row: Sequence[Any]) -> NameStatus:
    name, allowed, not_before, not_after, renew_at, serial, issuer, directory, attempts, failures, last_error, next_attempt_at = row
    return NameStatus(name, bool(allowed), _iso(not_before), _iso(not_after), _iso(renew_at), serial, issuer, directory, attempts, failures,
                      last_error, _iso(next_attempt_at), _time(not_after))


def named_rows(wanted: Sequence[str], found: dict[str, NameStatus], entries: Collection[str]) -> list[NameStatus]:
    """The rows of ``wanted`` names in the order given, from those ``found`` in the index; a
    name the database does not know gets a row of its own: nothing stored, allowed as the
    allowlist ``entries`` (those of :func:`autocert._policy.allowlist_candidates`) say."""
    for name in wanted:
        if name not in found:
            found[name] = NameStatus(name, is_allowed(name, entries), None, None, None, None, None, None, 0, 0, None, None, None)
    return [found[name] for name in wanted]


def status_item(row: NameStatus, *, ordering: bool, directory: str, now: datetime) -> dict[str, Any]:
    """The STATUS object of one row."""
    return {
        "name": row.name,
        "state": name_status(allowed=row.allowed, not_after=row.expires, ordering=ordering, failures=row.failures, now=now),
        "not_before": row.not_before,
        "not_after": row.not_after,
        "renew_at": row.renew_at,
        "serial": row.serial,
        "issuer": row.issuer,
        "directory": row.directory if row.expires is not None and row.directory else directory,
        # The CA that issued the current certificate, whichever of several it was (None without one).
        "ca": row.directory if row.expires is not None else None,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "next_attempt_at": row.next_attempt_at,
    }
