"""The allowlist: exact names and ``*.pattern`` entries (with an optional cap on the names
ordered under a pattern), and the version number servers poll to notice changes."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from .._errors import StoreError
from .._names import is_pattern, normalize_entry, pattern_for
from .._policy import within_cap
from .._timefmt import utcnow
from .._schema import chunked
from .engine import _short_error
from .names import NamesMixin
from .records import AllowedEntry, ChangeMarks, _allowed, _allowlist_version, _attempts, _cap_claims, _certificates

#: See :meth:`Store.change_marks`; built once, as it runs every second.
_CHANGE_MARKS = select(
    select(_allowlist_version.c.version).where(_allowlist_version.c.id == 1).scalar_subquery(),
    select(func.coalesce(func.max(_certificates.c.id), 0)).scalar_subquery(),
    select(func.count()).select_from(_certificates).where(_certificates.c.revoked_at.is_not(None)).scalar_subquery(),
)


class AllowlistMixin(NamesMixin):
    """Which names may get certificates; every change moves the version in the same transaction."""

    async def allow(self, entries: Iterable[str], *, cap: int | None = None, wildcard: bool = False) -> list[str]:
        """Add entries; returns those that were not there yet, in the order given.

        Entries are passed through :func:`autocert._names.normalize_entry` again (it is
        idempotent) so that a caller's mistake cannot store a name the SNI check never matches.
        ``cap`` sets (or, for entries already present, replaces) the patterns' name limit.
        ``wildcard`` makes patterns (new or present) served from one wildcard certificate,
        which is then a name of its own in the status index; it never turns that off.
        """
        wanted = list(dict.fromkeys(normalize_entry(entry) for entry in entries))
        if not wanted:
            return []
        if (cap is not None or wildcard) and not all(is_pattern(entry) for entry in wanted):
            raise ValueError("a cap or a wildcard applies to *.patterns only")
        if cap is not None and wildcard:
            raise ValueError("a wildcard pattern has one certificate: a cap does not apply")
        now = utcnow()
        added: set[str] = set()
        async with self._writing() as session:
            await self._lock_names(session, exclusive=True)
            for chunk in chunked(wanted):
                rows = [{"entry": entry, "added_at": now, "cap": cap, "wildcard": wildcard} for entry in chunk]
                stmt = self._insert(_allowed).values(rows).on_conflict_do_nothing(index_elements=["entry"]).returning(_allowed.c.entry)
                added.update((await session.execute(stmt)).scalars())
                if cap is not None or wildcard:
                    changes = {"cap": cap} if cap is not None else {"wildcard": True}
                    await session.execute(update(_allowed).where(_allowed.c.entry.in_(chunk)).values(**changes))
            await self._allowlist_added(session, wanted if wildcard else [entry for entry in wanted if entry in added], wildcard=wildcard)
            if added or cap is not None or wildcard:
                await self._bump_allowlist_version(session)
        return [entry for entry in wanted if entry in added]

    async def wildcard_patterns(self) -> frozenset[str]:
        """The patterns served from a wildcard certificate, read with the allowlist."""
        async with self._reading() as session:
            return frozenset((await session.execute(select(_allowed.c.entry).where(_allowed.c.wildcard))).scalars())

    async def pattern_cap(self, pattern: str) -> int | None:
        async with self._reading() as session:
            return (await session.execute(select(_allowed.c.cap).where(_allowed.c.entry == pattern))).scalar_one_or_none()

    async def names_under(self, pattern: str) -> set[str]:
        """Distinct names one label under ``pattern`` that were ever ordered or hold a place
        under its cap (its cap's usage)."""
        async with self._reading() as session:
            return await self._names_under(session, pattern)

    async def _names_under(self, session: AsyncSession, pattern: str) -> set[str]:
        base = pattern.removeprefix("*.")
        like = "%." + base.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        ordered = select(_attempts.c.name).where(_attempts.c.name.like(like, escape="\\"))
        claimed = select(_cap_claims.c.name).where(_cap_claims.c.pattern == pattern)
        found = (await session.execute(ordered.union(claimed))).scalars()
        return {name for name in found if pattern_for(name) == pattern}

    async def claim_under_cap(self, name: str, pattern: str) -> bool:
        """Take a place for ``name`` under ``pattern``'s cap if one is free (or it has one);
        False when the cap is reached. True too when the pattern has no cap.

        Checking the cap and taking the place are one transaction, serialised with every other
        claim under the pattern (a lock on its row on PostgreSQL; SQLite's write lock), so
        servers sharing the database never pass the cap between them, however many first
        contacts race for the last place.
        """
        cap_of = select(_allowed.c.cap).where(_allowed.c.entry == pattern)
        if self.dialect == "postgresql":
            cap_of = cap_of.with_for_update()
        async with self._writing() as session:
            cap = (await session.execute(cap_of)).scalar_one_or_none()
            if cap is None:
                return True
            if not within_cap(name, cap, await self._names_under(session, pattern), ()):
                return False
            claim = self._insert(_cap_claims).values(name=name, pattern=pattern, claimed_at=utcnow())
            await session.execute(claim.on_conflict_do_nothing(index_elements=["name"]))
            return True

    async def disallow(self, entries: Iterable[str]) -> list[str]:
        """Remove entries; returns those that were present, in the order given."""
        wanted = list(dict.fromkeys(normalize_entry(entry) for entry in entries))
        removed: set[str] = set()
        async with self._writing() as session:
            await self._lock_names(session, exclusive=True)
            for chunk in chunked(wanted):
                stmt = delete(_allowed).where(_allowed.c.entry.in_(chunk)).returning(_allowed.c.entry)
                removed.update((await session.execute(stmt)).scalars())
            await self._allowlist_removed(session, [entry for entry in wanted if entry in removed])
            if removed:
                await self._bump_allowlist_version(session)
        return [entry for entry in wanted if entry in removed]

    async def _bump_allowlist_version(self, session: AsyncSession) -> None:
        bumped = await session.execute(update(_allowlist_version).where(_allowlist_version.c.id == 1).values(version=_allowlist_version.c.version + 1))
        if bumped.rowcount == 0:  # a database created from the models rather than the migrations
            await session.execute(self._insert(_allowlist_version).values(id=1, version=1).on_conflict_do_nothing(index_elements=["id"]))
        await self._announce_change(session)

    async def allowed(self) -> list[AllowedEntry]:
        """The whole allowlist, sorted by entry (in Python: database collations differ)."""
        async with self._reading() as session:
            rows = (await session.execute(select(_allowed.c.entry, _allowed.c.added_at, _allowed.c.cap, _allowed.c.wildcard))).all()
        return sorted((AllowedEntry(row.entry, row.added_at, row.cap, bool(row.wildcard)) for row in rows), key=lambda item: item.entry)

    async def allowed_entries(self) -> frozenset[str]:
        """Every entry as a set, for the in-memory SNI check that must never wait on the database."""
        async with self._reading() as session:
            return frozenset((await session.execute(select(_allowed.c.entry))).scalars())

    async def change_marks(self) -> ChangeMarks:
        """What running servers poll every second, in one cheap statement whatever the size:
        the allowlist's version, the newest certificate id, and how many were ever revoked.

        It runs on a connection kept for it, not a pooled session: a session's checkout,
        liveness ping and reset cost about three times the query (several thread hand-offs
        with SQLite), and under load that overhead showed in every handshake.
        """
        try:
            if self._poll_connection is None:
                self._poll_connection = await self._engine.connect()
            connection = self._poll_connection
            try:
                version, latest, revoked = (await connection.execute(_CHANGE_MARKS)).one()
            finally:
                await connection.rollback()  # end the read: a held snapshot would stall SQLite's checkpoints
        except (SQLAlchemyError, OSError) as exc:
            await self._drop_poll_connection()  # reconnect on the next poll
            raise StoreError(f"database {self.url}: {_short_error(exc)}") from exc
        return ChangeMarks(allowlist_version=int(version or 0), latest_certificate_id=int(latest), revocations=int(revoked))
