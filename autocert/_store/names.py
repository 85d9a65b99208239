"""The status index (table ``names``): one row per known name with what the status queries
filter, sort and count on. Derived data, kept in step by every write that changes what it
summarises, in the same transaction; :meth:`NamesMixin.rebuild_names` recomputes it whole.

Known means what it always meant for the status report: an exact allowlist entry, or any
certificate, attempt or scheduling state for the name; and a name the ask endpoint allowed
(``asked_names``), which is allowed as if it were listed until the endpoint refuses it. Rows
come into being when a name becomes known (:meth:`~NamesMixin._know`) and leave when nothing
makes the name known any more (``disallow`` of an entry without history, a refusal by the ask
endpoint).

Concurrency: on SQLite every write transaction holds the write lock. On PostgreSQL the rows
summarising one name are serialised by the row locks of the writes themselves; and because a
new row reads the allowlist to set ``allowed`` while a pattern added at the same time updates
only the rows it can see, writers that may create rows hold an advisory lock shared, and
allowlist changes hold it exclusively.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, bindparam, delete, exists, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from .._names import PATTERN_PREFIX, pattern_for
from .._policy import allowlist_candidates, expires_soon_from, is_allowed
from .._schema import chunked
from .engine import _MIGRATION_LOCK_KEY, StoreBase, _includes_revision
from .._timefmt import utcnow
from .records import _allowed, _asked_names, _attempts, _certificates, _is_current, _name_states, _names

#: The migration that created the index: a database migrated from before it gets it filled.
_INDEX_REVISION = "0008"

#: Advisory lock (PostgreSQL) between allowlist changes and writes that may add rows.
_NAMES_LOCK_KEY = _MIGRATION_LOCK_KEY + 2

Executor = AsyncSession | AsyncConnection


def _like_escaped(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _under(pattern: str) -> Any:
    """SQL for the known names ``pattern`` covers: exactly one label in front of its base,
    what :func:`autocert._names.pattern_for` says (None when no name can match)."""
    base = pattern.removeprefix(PATTERN_PREFIX)
    if "." not in base:  # pattern_for never yields a pattern over a single label
        return None
    tail = _like_escaped("." + base)
    return and_(_names.c.name.like("_%" + tail, escape="\\"), _names.c.name.not_like("%.%" + tail, escape="\\"))


def _soon_from(row: Any) -> Any:
    return expires_soon_from(row.not_before, row.not_after, row.renew_at)


class NamesMixin(StoreBase):
    """Keeps the status index in step; every method runs inside the caller's write transaction."""

    async def _lock_names(self, session: Executor, *, exclusive: bool) -> None:
        if self.dialect == "postgresql":
            function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            await session.execute(text(f"SELECT {function}(:key)"), {"key": _NAMES_LOCK_KEY})

    async def _listed_and_patterns(self, session: Executor, names: Sequence[str]) -> set[str]:
        """Which of ``names`` and of the patterns that could cover them are on the allowlist."""
        found: set[str] = set()
        for chunk in chunked(allowlist_candidates(names)):
            found.update((await session.execute(select(_allowed.c.entry).where(_allowed.c.entry.in_(chunk)))).scalars())
        return found

    async def _know(self, session: Executor, names: Iterable[str]) -> None:
        """Give each of ``names`` its row if it has none yet (it has just become known)."""
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return
        await self._lock_names(session, exclusive=False)
        present: set[str] = set()
        for chunk in chunked(wanted):
            present.update((await session.execute(select(_names.c.name).where(_names.c.name.in_(chunk)))).scalars())
        new = [name for name in wanted if name not in present]
        if not new:
            return
        entries = await self._listed_and_patterns(session, new)
        rows = [
            {"name": name, "listed": name in entries, "allowed": is_allowed(name, entries), "attempts": 0, "failures": 0}
            for name in new
        ]
        for start in range(0, len(rows), 500):
            stmt = self._insert(_names).values(rows[start : start + 500]).on_conflict_do_nothing(index_elements=["name"])
            await session.execute(stmt)

    async def _refresh_certificates(self, session: Executor, names: Iterable[str]) -> None:
        """Copy each name's current certificate (or none) into its row."""
        for chunk in chunked(names):
            stmt = _current_certificates().where(_certificates.c.name.in_(chunk))
            current = {row.name: row for row in (await session.execute(stmt)).all()}
            await session.execute(_SET_CERTIFICATE, [_certificate_values(name, current.get(name)) for name in chunk])

    async def _refresh_states(self, session: Executor, names: Iterable[str]) -> None:
        """Copy each name's failures, last error and next attempt from ``name_states`` into its row."""
        state = _name_states.alias("state")

        def copied(column: str) -> Any:
            return select(state.c[column]).where(state.c.name == _names.c.name).scalar_subquery()

        for chunk in chunked(names):
            await session.execute(
                update(_names).where(_names.c.name.in_(chunk)).values(
                    failures=func.coalesce(copied("failures"), 0), last_error=copied("last_error"), next_attempt_at=copied("next_attempt_at"),
                )
            )

    async def _count_attempt(self, session: Executor, name: str) -> None:
        await session.execute(update(_names).where(_names.c.name == name).values(attempts=_names.c.attempts + 1))

    async def _allowlist_added(self, session: Executor, entries: Sequence[str], *, wildcard: bool = False) -> None:
        """Entries were added: exact names become listed (and known), names under a pattern
        allowed; a wildcard pattern is known itself, as its certificate's name."""
        exact = [entry for entry in entries if wildcard or not entry.startswith(PATTERN_PREFIX)]
        for chunk in chunked(exact):
            rows = [{"name": name, "listed": True, "allowed": True, "attempts": 0, "failures": 0} for name in chunk]
            stmt = self._insert(_names).values(rows)
            await session.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"listed": True, "allowed": True}))
        for pattern in entries:
            under = _under(pattern) if pattern.startswith(PATTERN_PREFIX) else None
            if under is not None:
                await session.execute(update(_names).where(under, ~_names.c.allowed).values(allowed=True))

    async def _allowlist_removed(self, session: Executor, entries: Sequence[str]) -> None:
        """Entries were removed: names lose them, and a name left with no reason to be known goes.
        Patterns are removed as names as well: a wildcard pattern has a row of its own."""
        exact = list(entries)
        for pattern in entries:
            under = _under(pattern) if pattern.startswith(PATTERN_PREFIX) else None
            if under is not None:
                await session.execute(update(_names).where(under).values(allowed=_names.c.listed))
        if exact:
            patterns = await self._listed_and_patterns(session, exact)
            for allowed in (True, False):
                group = [name for name in exact if (pattern_for(name) in patterns) == allowed]
                for chunk in chunked(group):
                    await session.execute(update(_names).where(_names.c.name.in_(chunk)).values(listed=False, allowed=allowed))
        await self._allow_asked(session)
        await self._forget_unknown(session, exact)

    async def _forget_unknown(self, session: Executor, names: Sequence[str]) -> None:
        """Drop the rows of ``names`` that nothing makes known any more."""
        for chunk in chunked(names):
            await session.execute(
                delete(_names).where(
                    _names.c.name.in_(chunk),
                    ~_names.c.listed,
                    ~exists().where(_asked_names.c.name == _names.c.name),
                    ~exists().where(_certificates.c.name == _names.c.name),
                    ~exists().where(_attempts.c.name == _names.c.name),
                    ~exists().where(_name_states.c.name == _names.c.name),
                )
            )

    async def _allow_asked(self, session: Executor) -> None:
        """Names the ask endpoint allowed are allowed, whatever the allowlist says."""
        await session.execute(update(_names).where(_names.c.name.in_(select(_asked_names.c.name))).values(allowed=True))

    async def record_asked(self, name: str) -> None:
        """The ask endpoint allowed ``name``, which is off the allowlist, and it is being
        ordered: it is known, and allowed in the status index, until :meth:`forget_asked`."""
        now = utcnow()
        async with self._writing() as session:
            stmt = self._insert(_asked_names).values(name=name, allowed_at=now)
            await session.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"allowed_at": now}))
            await self._know(session, [name])
            await session.execute(update(_names).where(_names.c.name == name).values(allowed=True))

    async def forget_asked(self, name: str) -> bool:
        """The ask endpoint refused ``name``: from now on it is allowed only if the allowlist
        says so. False if it was not recorded as asked."""
        async with self._writing() as session:
            gone = (await session.execute(delete(_asked_names).where(_asked_names.c.name == name).returning(_asked_names.c.name))).first()
            if gone is None:
                return False
            entries = await self._listed_and_patterns(session, [name])
            await session.execute(update(_names).where(_names.c.name == name).values(allowed=is_allowed(name, entries)))
            await self._forget_unknown(session, [name])
            return True

    async def asked_names(self) -> list[str]:
        """The names recorded by :meth:`record_asked`, sorted."""
        async with self._reading() as session:
            return list((await session.execute(select(_asked_names.c.name).order_by(_asked_names.c.name))).scalars())

    async def _after_migration(self, connection: AsyncConnection, previous: str | None) -> None:
        await super()._after_migration(connection, previous)
        if previous is not None and not await asyncio.to_thread(_includes_revision, previous, _INDEX_REVISION):
            await self._rebuild_names(connection)

    async def rebuild_names(self) -> int:
        """Recompute the status index from the tables it summarises; returns its row count.

        Runs after migrating a database that predates the index; safe to run at any time (it
        takes the write lock, and on PostgreSQL the allowlist lock, for its transaction).
        """
        async with self._writing() as session:
            return await self._rebuild_names(session)

    async def _rebuild_names(self, session: Executor) -> int:
        await self._lock_names(session, exclusive=True)
        await session.execute(delete(_names))
        known = (
            select(_allowed.c.entry.label("name")).where(~_allowed.c.entry.startswith(PATTERN_PREFIX, autoescape=True) | _allowed.c.wildcard)
            .union(select(_certificates.c.name), select(_attempts.c.name), select(_name_states.c.name), select(_asked_names.c.name))
            .subquery()
        )
        def listed() -> Any:
            return exists().where(_allowed.c.entry == known.c.name)

        def state(column: str) -> Any:
            return select(_name_states.c[column]).where(_name_states.c.name == known.c.name).scalar_subquery()

        tries = select(func.count()).where(_attempts.c.name == known.c.name).scalar_subquery()
        columns = ["name", "listed", "allowed", "attempts", "failures", "last_error", "next_attempt_at"]
        rows = select(known.c.name, listed(), listed(), tries, func.coalesce(state("failures"), 0), state("last_error"), state("next_attempt_at"))
        await session.execute(insert(_names).from_select(columns, rows))
        for pattern in (await session.execute(select(_allowed.c.entry).where(_allowed.c.entry.startswith(PATTERN_PREFIX, autoescape=True)))).scalars():
            under = _under(pattern)
            if under is not None:
                await session.execute(update(_names).where(under).values(allowed=True))
        await self._allow_asked(session)
        batch: list[dict[str, Any]] = []
        for row in (await session.execute(_current_certificates())).all():
            batch.append(_certificate_values(row.name, row))
            if len(batch) >= 1000:
                await session.execute(_SET_CERTIFICATE, batch)
                batch = []
        if batch:
            await session.execute(_SET_CERTIFICATE, batch)
        return int((await session.execute(select(func.count()).select_from(_names))).scalar_one())


_SET_CERTIFICATE = (
    update(_names)
    .where(_names.c.name == bindparam("b_name"))
    .values(
        certificate_id=bindparam("b_id"), not_before=bindparam("b_not_before"), not_after=bindparam("b_not_after"),
        renew_at=bindparam("b_renew_at"), issuer=bindparam("b_issuer"), serial=bindparam("b_serial"),
        directory=bindparam("b_directory"), soon_at=bindparam("b_soon_at"),
    )
)
_CERTIFICATE_FIELDS = ("id", "not_before", "not_after", "renew_at", "issuer", "serial", "directory")


def _current_certificates() -> Any:
    """Each name's current certificate, with what the index copies of it."""
    return select(_certificates.c.name, *(_certificates.c[field] for field in _CERTIFICATE_FIELDS)).where(_is_current())


def _certificate_values(name: str, row: Any) -> dict[str, Any]:
    """The parameters of :data:`_SET_CERTIFICATE` for ``name``'s current certificate (None: none)."""
    values = {f"b_{field}": getattr(row, field) if row is not None else None for field in _CERTIFICATE_FIELDS}
    values.update(b_name=name, b_soon_at=_soon_from(row) if row is not None else None)
    return values

