"""Issuance attempts and each name's state: failures and backoff, the lease that lets one
process at a time order a name, and the history that rate budgets and status pages read."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Select, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from .._errors import StoreError
from .._timefmt import utcnow
from .._schema import chunked
from .engine import _BUDGET_LOCK_KEY, _aware
from .leases import lease_until, lease_upsert
from .names import NamesMixin
from .records import Attempt, NameState, _attempt, _attempts, _certificates, _is_current, _name_state, _name_states

#: ``failover``: the order could not be completed at this attempt's CA for the CA's reasons and
#: moved on to the next CA at once; it is no failure of the name's (see ``finish_attempt``).
AttemptResult = Literal["running", "valid", "failed", "failover"]


class AttemptsMixin(NamesMixin):
    """Attempts, backoff and leases, per name."""

    # -- attempts and backoff ----------------------------------------------------------------

    async def start_attempt(self, name: str, directory: str) -> int:
        """Record that an order for ``name`` is starting; returns the attempt id."""
        async with self._writing() as session:
            return await self._start_attempt(session, name, directory)

    async def start_attempt_within(
        self, name: str, directory: str, *, since: datetime, new_names_only: bool, room: Callable[[int], bool]
    ) -> int | None:
        """:meth:`start_attempt` only if ``room`` says the account's order budget has room
        for it, given the orders counted as :meth:`orders_since` counts them; None (and
        nothing written) when it has none.

        The count and the insert are one transaction, serialised with every other budgeted
        start (an advisory lock on PostgreSQL, SQLite's write lock), so servers sharing the
        database keep one budget between them instead of each passing it by a few orders.
        """
        async with self._writing() as session:
            if self.dialect == "postgresql":
                await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _BUDGET_LOCK_KEY})
            counted = int((await session.execute(self._orders_since(directory, since, new_names_only))).scalar_one())
            if not room(counted):
                return None
            return await self._start_attempt(session, name, directory)

    async def _start_attempt(self, session: AsyncSession, name: str, directory: str) -> int:
        stmt = (
            self._insert(_attempts)
            .values(name=name, directory=directory, started_at=utcnow(), result="running")
            .returning(_attempts.c.id)
        )
        attempt_id = int((await session.execute(stmt)).scalar_one())
        await self._know(session, [name])
        await self._count_attempt(session, name)
        return attempt_id

    async def finish_attempt(
        self,
        attempt_id: int,
        result: AttemptResult,
        problem_type: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Close an attempt and update the name's failure count in the same transaction.

        ``valid`` resets the backoff (failures, last error, next attempt); ``failed`` adds one
        failure and records ``"<problem_type>: <detail>"`` as the last error; ``failover``
        leaves the name's state alone: the order goes on at the next CA, and only how that
        ends counts. Finishing an attempt twice raises :class:`StoreError` rather than
        counting a failure twice.
        """
        if result not in ("valid", "failed", "failover"):
            raise ValueError(f"an attempt finishes as 'valid', 'failed' or 'failover', not {result!r}")
        finish = (
            update(_attempts)
            .where(_attempts.c.id == attempt_id, _attempts.c.result == "running")
            .values(finished_at=utcnow(), result=result, problem_type=problem_type, detail=detail)
            .returning(_attempts.c.name)
        )
        async with self._writing() as session:
            name = (await session.execute(finish)).scalar_one_or_none()
            if name is None:
                exists = (await session.execute(select(_attempts.c.id).where(_attempts.c.id == attempt_id))).first()
                state = "already finished" if exists else "unknown"
                raise StoreError(f"attempt {attempt_id} is {state}")
            if result == "failover":
                return
            upsert = self._insert(_name_states)
            if result == "valid":
                upsert = upsert.values(name=name, failures=0).on_conflict_do_update(
                    index_elements=["name"],
                    set_={"failures": 0, "last_error": None, "next_attempt_at": None},
                )
            else:
                error = _error_text(problem_type, detail)
                upsert = upsert.values(name=name, failures=1, last_error=error)
                upsert = upsert.on_conflict_do_update(
                    index_elements=["name"],
                    set_={"failures": _name_states.c.failures + 1, "last_error": upsert.excluded.last_error},
                )
            await session.execute(upsert)
            await self._know(session, [name])
            await self._refresh_states(session, [name])

    async def close_abandoned_attempts(self, now: datetime | None = None) -> int:
        """Close as ``interrupted`` the attempts still ``running`` whose name no process holds a
        lease on: their process was killed mid-order (a live order always holds the lease).
        The name's failure count is left alone: a killed process says nothing about the CA.
        Returns how many were closed."""
        at = _aware(now, "now") if now is not None else utcnow()
        leased = (
            select(_name_states.c.name)
            .where(
                _name_states.c.name == _attempts.c.name,
                _name_states.c.lease_owner.is_not(None),
                _name_states.c.lease_until > at,
            )
            .exists()
        )
        stmt = (
            update(_attempts)
            .where(_attempts.c.result == "running", ~leased)
            .values(finished_at=at, result="failed", detail="interrupted")
            .returning(_attempts.c.id)
        )
        async with self._writing() as session:
            return len((await session.execute(stmt)).all())

    async def attempts(self, name: str, limit: int = 20) -> list[Attempt]:
        """The latest attempts for ``name``, newest first."""
        stmt = (
            select(_attempts)
            .where(_attempts.c.name == name)
            .order_by(_attempts.c.started_at.desc(), _attempts.c.id.desc())
            .limit(limit)
        )
        async with self._reading() as session:
            rows = (await session.execute(stmt)).all()
        return [_attempt(row) for row in rows]

    async def attempt_count(self, name: str) -> int:
        """How many attempts were ever recorded for ``name``."""
        return (await self.attempt_counts([name])).get(name, 0)

    async def attempt_counts(self, names: Sequence[str]) -> dict[str, int]:
        """:meth:`attempt_count` for many names, one query per chunk; names never tried are absent."""
        counts: dict[str, int] = {}
        async with self._reading() as session:
            for chunk in chunked(names):
                stmt = select(_attempts.c.name, func.count()).where(_attempts.c.name.in_(chunk)).group_by(_attempts.c.name)
                counts.update((name, int(count)) for name, count in (await session.execute(stmt)).all())
        return counts

    async def orders_since(self, directory: str, since: datetime, *, new_names_only: bool = False) -> int:
        """Orders started against ``directory`` since ``since``: the account's rate budget.

        ``new_names_only`` leaves out renewals (orders for a name that already had a
        certificate when they started), which a CA with renewal information exempts.
        """
        async with self._reading() as session:
            return int((await session.execute(self._orders_since(directory, since, new_names_only))).scalar_one())

    @staticmethod
    def _orders_since(directory: str, since: datetime, new_names_only: bool) -> Select[Any]:
        stmt = (
            select(func.count())
            .select_from(_attempts)
            .where(_attempts.c.directory == directory, _attempts.c.started_at >= _aware(since, "since"))
        )
        if new_names_only:
            earlier = (
                select(_certificates.c.id)
                .where(_certificates.c.name == _attempts.c.name, _certificates.c.created_at < _attempts.c.started_at)
                .exists()
            )
            stmt = stmt.where(~earlier)
        return stmt

    async def failures_since(self, name: str, since: datetime, *, directory: str | None = None) -> list[datetime]:
        """Start times of ``name``'s failed attempts since ``since`` (at ``directory`` only,
        when given), oldest first."""
        stmt = (
            select(_attempts.c.started_at)
            .where(_attempts.c.name == name, _attempts.c.result == "failed", _attempts.c.started_at >= _aware(since, "since"))
            .order_by(_attempts.c.started_at)
        )
        if directory is not None:
            stmt = stmt.where(_attempts.c.directory == directory)
        async with self._reading() as session:
            return list((await session.execute(stmt)).scalars())

    async def name_state(self, name: str) -> NameState | None:
        """Backoff and lease state of ``name``, if it ever had any."""
        return (await self.name_states([name])).get(name)

    async def name_states(self, names: Sequence[str]) -> dict[str, NameState]:
        """:meth:`name_state` for many names, one query per chunk; names without state are absent."""
        found: dict[str, NameState] = {}
        async with self._reading() as session:
            for chunk in chunked(names):
                rows = (await session.execute(select(_name_states).where(_name_states.c.name.in_(chunk)))).all()
                found.update((row.name, _name_state(row)) for row in rows)
        return found

    async def set_next_attempt(self, name: str, when: datetime | None, *, reason: str | None = None) -> None:
        """Schedule (or with None, clear) the earliest time the next order for ``name`` may start;
        ``reason``, when given, is recorded as the name's last error (why it waits)."""
        at = _aware(when, "when") if when is not None else None
        stmt = self._insert(_name_states).values(name=name, failures=0, next_attempt_at=at, last_error=reason)
        changes = {"next_attempt_at": stmt.excluded.next_attempt_at}
        if reason is not None:
            changes["last_error"] = stmt.excluded.last_error
        stmt = stmt.on_conflict_do_update(index_elements=["name"], set_=changes)
        async with self._writing() as session:
            await session.execute(stmt)
            await self._know(session, [name])
            await self._refresh_states(session, [name])

    async def retries_due(self, before: datetime, limit: int = 100) -> list[NameState]:
        """Names whose last attempt failed and whose backoff ends by ``before``, soonest first."""
        stmt = (
            select(_name_states)
            .where(_name_states.c.failures > 0, _name_states.c.next_attempt_at <= _aware(before, "before"))
            .order_by(_name_states.c.next_attempt_at)
            .limit(limit)
        )
        async with self._reading() as session:
            rows = (await session.execute(stmt)).all()
        return [_name_state(row) for row in rows]

    async def next_due(self) -> datetime | None:
        """The earliest renewal or retry time: when the scheduler next has work."""
        async with self._reading() as session:
            renew = (await session.execute(select(func.min(_certificates.c.renew_at)).where(_is_current()))).scalar_one()
            retry = (
                await session.execute(select(func.min(_name_states.c.next_attempt_at)).where(_name_states.c.failures > 0))
            ).scalar_one()
        times = [value for value in (renew, retry) if value is not None]
        return min(times) if times else None

    # -- leases ------------------------------------------------------------------------------

    async def try_lease(self, name: str, owner: str, seconds: float) -> bool:
        """Take (or extend) the lease on ordering ``name`` for ``seconds``; True if we hold it.

        One statement decides (:func:`.leases.lease_upsert`).
        """
        now, until = lease_until(seconds)
        values = {"name": name, "failures": 0, "lease_owner": owner, "lease_until": until}
        stmt = lease_upsert(self._insert, _name_states, "name", values, owner, now)
        async with self._writing() as session:
            taken = (await session.execute(stmt)).first() is not None
            await self._know(session, [name])  # the upsert may have made it known
            return taken

    async def release_lease(self, name: str, owner: str) -> bool:
        """Give up our lease on ``name``; False if we did not hold it (it expired and moved on)."""
        stmt = (
            update(_name_states)
            .where(_name_states.c.name == name, _name_states.c.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
            .returning(_name_states.c.name)
        )
        async with self._writing() as session:
            return (await session.execute(stmt)).first() is not None


def _error_text(problem_type: str | None, detail: str | None) -> str:
    if problem_type and detail:
        return f"{problem_type}: {detail}"
    return detail or problem_type or "failed without detail"
