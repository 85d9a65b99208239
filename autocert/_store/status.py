"""Status queries: names filtered, counted and sorted in the database over the status index
(:mod:`.names`), a page or a batch at a time, so that 100,000 names cost what 100 do. The
predicates and sorts come from the state rules themselves (:mod:`autocert._status_rules`).

A page reads the parts of a sort from where its cursor (:class:`Position`) points, each with
one query on one index, until it has enough rows.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import AsyncGenerator, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, func, select, tuple_, type_coerce

from .._policy import STATES, allowlist_candidates, needs_attention
from .._status_rules import (
    NULL_WITHOUT_CERTIFICATE,
    ROW_COLUMNS,
    SORTED_TIMES,
    SORTS,
    TIME_COLUMNS,
    Class,
    Facts,
    NameStatus,
    Part,
    Plan,
    StatusQuery,
    boxes,
    classes,
    driver,
    named_rows,
    status_record,
)
from .._schema import chunked
from .engine import StoreBase, _aware
from .records import _allowed, _name_states, _names
from .rules import AlchemyColumns, unindexed


@dataclass(frozen=True)
class Position:
    """Where a row sits in a sort: its group's rank, whether it is in the group's tail of
    missing values, its value of the sort column, and its name. Cursors carry one."""

    rank: tuple[int, ...]
    null: bool
    value: Any
    name: str

    def key(self) -> tuple[Any, ...]:
        return (self.rank, self.null)

    def encode(self, sort: str, forward: bool) -> str:
        value = self.value.isoformat() if isinstance(self.value, datetime) else self.value
        raw = json.dumps([sort, int(forward), list(self.rank), int(self.null), value, self.name], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, sort: str) -> tuple[Position, bool]:
        """(position, forward) from a cursor made for ``sort``; ValueError if it is not one."""
        try:
            raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            made_for, forward, rank, null, value, name = raw
            column = SORTS[sort.removeprefix("-")].column
            if made_for != sort or not isinstance(name, str) or not all(isinstance(part, int) for part in rank):
                raise ValueError
            if null or column == "name":
                value = None
            elif column in SORTED_TIMES:
                value = _aware(datetime.fromisoformat(value), "cursor")
            elif not isinstance(value, int):
                raise ValueError
            return cls(tuple(rank), bool(null), value, name), bool(forward)
        except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError):
            raise ValueError("not a cursor of this listing (it belongs to another sort, or was cut short)") from None


@dataclass(frozen=True)
class StatusBatch:
    """Rows read together, all from one part of the sort."""

    rows: list[NameStatus]
    column: str
    part: Part

    def position(self, row: NameStatus) -> Position:
        value: Any = None
        if self.column == "attempts":
            value = row.attempts
        elif self.column != "name" and not self.part.null:
            value = datetime.fromisoformat(getattr(row, self.column))
        return Position(self.part.rank, self.part.null, value, row.name)


@dataclass(frozen=True)
class StatusPage:
    rows: list[NameStatus]
    first: Position | None
    last: Position | None
    more: bool  # rows remain beyond the last one, in the direction read


@dataclass(frozen=True)
class StatusCounts:
    total: int
    states: dict[str, int]
    soon: int
    attention: int
    soonest: tuple[str, datetime] | None  # name and not_after of the earliest expiry among allowed names


def _raw(column: Any) -> Any:
    """A time column as the driver returns it: SQLite's stored text, asyncpg's datetime."""
    return type_coerce(column, String()).label(column.name)


_ROW_COLUMNS = tuple(_raw(_names.c[name]) if name in TIME_COLUMNS else _names.c[name] for name in ROW_COLUMNS)


class StatusMixin(StoreBase):
    """Status pages, counts and single names, read from the status index."""

    async def status_names(self, names: Sequence[str] | None = None) -> list[str]:
        """Every name the database knows about, sorted; or ``names`` themselves, deduplicated.

        Known means: an exact allowlist entry, or any certificate, attempt or backoff state
        for it (so disallowed names with history still show up).
        """
        if names is not None:
            return list(dict.fromkeys(names))
        async with self._reading() as session:
            return list((await session.execute(select(_names.c.name).order_by(_names.c.name))).scalars())

    async def status_widths(self) -> tuple[int, int]:
        """The longest name and the most attempts of any name: what a table of a listing too
        long to hold needs to align its columns before it has seen every row."""
        stmt = select(func.coalesce(func.max(func.length(_names.c.name)), 0), func.coalesce(func.max(_names.c.attempts), 0))
        async with self._reading() as session:
            longest, most = (await session.execute(stmt)).one()
        return int(longest), int(most)

    async def ordering_names(self, now: datetime) -> set[str]:
        """Names whose order lease some process holds at ``now``."""
        stmt = select(_name_states.c.name).where(_name_states.c.lease_owner.is_not(None), _name_states.c.lease_until > _aware(now, "now"))
        async with self._reading() as session:
            return set((await session.execute(stmt)).scalars())

    async def name_statuses(self, names: Sequence[str]) -> list[NameStatus]:
        """The rows of ``names``, in the order given; a name the database does not know gets a
        row of its own (nothing stored, allowed as the allowlist says)."""
        wanted = list(dict.fromkeys(names))
        found: dict[str, NameStatus] = {}
        async with self._reading() as session:
            for chunk in chunked(wanted):
                rows = (await session.execute(select(*_ROW_COLUMNS).where(_names.c.name.in_(chunk)))).all()
                found.update((row.name, status_record(row)) for row in rows)
            entries: set[str] = set()
            for chunk in chunked(allowlist_candidates([name for name in wanted if name not in found])):
                entries.update((await session.execute(select(_allowed.c.entry).where(_allowed.c.entry.in_(chunk)))).scalars())
        return named_rows(wanted, found, entries)

    async def status_counts(self, ordering: Collection[str], now: datetime) -> StatusCounts:
        """How many names are in each state, expiring soon and needing attention, in one
        snapshot, each from an index range: the largest class (valid, not expiring soon) is
        the total less the others, so no query reads every name."""
        now = _aware(now, "now")
        plan = Plan(StatusQuery(), sorted(ordering), now)
        table = classes()
        by_class: dict[Class, set[Facts]] = {}
        for facts in plan.combos:
            by_class.setdefault(table[facts], set()).add(facts)
        rest: Class = ("valid", False)
        counts: dict[Class, int] = {}
        soonest_query = (
            select(_names.c.name, _names.c.not_after)
            .where(unindexed(_names.c.allowed), _names.c.not_after.is_not(None))
            .order_by(_names.c.not_after, _names.c.name)
            .limit(1)
        )
        async with self._snapshot() as session:
            total = int((await session.execute(select(func.count()).select_from(_names))).scalar_one())
            for klass, combos in sorted(by_class.items()):
                if klass == rest:
                    continue
                found = boxes(combos, plan.domains)
                c = AlchemyColumns(driver(found, None, prefix=bool(plan.query.prefix), issuer=bool(plan.query.issuer)))
                stmt = select(func.count()).select_from(_names).where(plan.where(found, c))
                counts[klass] = int((await session.execute(stmt)).scalar_one())
            soonest = (await session.execute(soonest_query)).first()
        counts[rest] = total - sum(counts.values())
        states = dict.fromkeys(STATES, 0)
        for (state, _soon), count in counts.items():
            states[state] += count
        return StatusCounts(
            total=total,
            states=states,
            soon=sum(count for (_state, soon), count in counts.items() if soon),
            attention=sum(count for klass, count in counts.items() if needs_attention(*klass)),
            soonest=(soonest.name, soonest.not_after) if soonest else None,
        )

    async def status_rows(
        self, query: StatusQuery, *, ordering: Collection[str], now: datetime, after: Position | None = None,
        forward: bool = True, limit: int | None = None, batch: int = 500,
    ) -> AsyncGenerator[StatusBatch, None]:
        """The rows ``query`` selects in ``query.sort`` order from ``after`` (None: the start),
        or with ``forward`` False backwards from it, at most ``limit``, ``batch`` at a time.

        One snapshot for the whole listing, each part read by one streaming query: the
        caller turns a batch into output while the next is fetched for it. Close the iterator
        (``contextlib.aclosing``) when stopping early.
        """
        now = _aware(now, "now")
        plan = Plan(query, sorted(ordering), now)
        sort = SORTS[query.sort.removeprefix("-")]
        ascending = not query.sort.startswith("-")
        parts = plan.parts(sort)
        if ascending != forward:
            parts.reverse()
        up = ascending == forward  # the direction in which rows are read
        left = limit
        async with self._snapshot() as session:
            for part in parts:
                key = (part.rank, part.null)
                if after is not None and key != after.key() and (key < after.key()) == up:
                    continue  # wholly before the cursor, in the direction read
                stmt = self._part_query(plan, part, sort.column, up, after, left)
                result = await session.stream(stmt.execution_options(yield_per=batch))
                try:
                    async for rows in result.partitions():
                        taken = rows if left is None else rows[:left]
                        yield StatusBatch([status_record(row) for row in taken], sort.column, part)
                        if left is not None:
                            left -= len(taken)
                            if left <= 0:
                                return
                finally:
                    await result.close()

    async def status_page(
        self, query: StatusQuery, *, ordering: Collection[str], now: datetime, limit: int,
        after: Position | None = None, forward: bool = True,
    ) -> StatusPage:
        """Up to ``limit`` rows in ``query.sort`` order after ``after`` (None: from the start),
        or, with ``forward`` False, the ``limit`` rows before it, still in sort order."""
        found: list[tuple[NameStatus, StatusBatch]] = []
        rows = self.status_rows(query, ordering=ordering, now=now, after=after, forward=forward, limit=limit + 1, batch=limit + 1)
        async with contextlib.aclosing(rows):
            async for batch in rows:
                found.extend((row, batch) for row in batch.rows)
        more = len(found) > limit
        found = found[:limit]
        if not forward:
            found.reverse()
        return StatusPage(
            rows=[row for row, _ in found],
            first=found[0][1].position(found[0][0]) if found else None,
            last=found[-1][1].position(found[-1][0]) if found else None,
            more=more,
        )

    def _part_query(self, plan: Plan, part: Part, column: str, up: bool, after: Position | None, limit: int | None) -> Any:
        ordered = column if not part.null and column != "name" else None
        indexed = driver(part.boxes, ordered, prefix=bool(plan.query.prefix), issuer=bool(plan.query.issuer))
        c = AlchemyColumns(indexed)
        terms = [plan.where(part.boxes, c)]
        if column in SORTED_TIMES and column not in NULL_WITHOUT_CERTIFICATE:  # else the boxes say it already
            terms.append(c(column).is_(None) if part.null else c(column).is_not(None))
        if after is not None and (part.rank, part.null) == after.key():
            if ordered:
                bound = tuple_(c(ordered), c("name"))
                terms.append(bound > tuple_(after.value, after.name) if up else bound < tuple_(after.value, after.name))
            else:
                terms.append(c("name") > after.name if up else c("name") < after.name)
        keys = [ordered, "name"] if ordered else ["name"]
        order = [c(key) for key in keys]
        stmt = select(*_ROW_COLUMNS).where(*terms)
        stmt = stmt.order_by(*(key.asc() if up else key.desc() for key in order))
        return stmt.limit(limit) if limit is not None else stmt

