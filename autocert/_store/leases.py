"""Leases: which process does a piece of work that must not run twice at once.

Two kinds share one rule. A name's order lease lives on its ``name_states`` row
(:mod:`.attempts`); a job done once for the whole database (the renewal schedule, the expiry
watch) has a row of its own in ``leases``. Either is taken by one upsert that succeeds only
when the lease is free, expired or already the caller's (:func:`lease_upsert`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, or_, select, update

from .._timefmt import utcnow
from .engine import StoreBase
from .records import _leases


def lease_until(seconds: float) -> tuple[datetime, datetime]:
    """(now, when a lease taken now for ``seconds`` ends); refuses a lease of no length."""
    if seconds <= 0:
        raise ValueError(f"lease length must be positive, got {seconds!r}")
    now = utcnow()
    return now, now + timedelta(seconds=seconds)


def lease_upsert(insert: Any, table: Table, key: str, values: dict[str, Any], owner: str, now: datetime) -> Any:
    """Insert ``values`` (which hold ``lease_owner`` and ``lease_until``), or on a conflict on
    ``key`` overwrite the lease only when it is free, expired or ``owner``'s already. Returns a
    row exactly when the caller holds the lease: both databases serialise conflicting upserts
    on the row, so of two processes racing one gets it."""
    stmt = insert(table).values(**values)
    return stmt.on_conflict_do_update(
        index_elements=[key],
        set_={"lease_owner": stmt.excluded.lease_owner, "lease_until": stmt.excluded.lease_until},
        where=or_(
            table.c.lease_owner.is_(None),
            table.c.lease_until.is_(None),
            table.c.lease_until <= now,
            table.c.lease_owner == owner,
        ),
    ).returning(table.c[key])


class LeasesMixin(StoreBase):
    """Leases on jobs done once per database."""

    async def try_job_lease(self, job: str, owner: str, seconds: float) -> bool:
        """Take (or extend) the lease on ``job`` for ``seconds``; True if we hold it."""
        now, until = lease_until(seconds)
        stmt = lease_upsert(self._insert, _leases, "name", {"name": job, "lease_owner": owner, "lease_until": until}, owner, now)
        async with self._writing() as session:
            return (await session.execute(stmt)).first() is not None

    async def release_job_lease(self, job: str, owner: str) -> bool:
        """Give up ``owner``'s lease on ``job``; False if it did not hold it."""
        stmt = (
            update(_leases)
            .where(_leases.c.name == job, _leases.c.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
            .returning(_leases.c.name)
        )
        async with self._writing() as session:
            return (await session.execute(stmt)).first() is not None

    async def job_lease(self, job: str) -> tuple[str, datetime] | None:
        """Who holds the lease on ``job`` and until when, if anyone took it and did not release it."""
        stmt = select(_leases.c.lease_owner, _leases.c.lease_until).where(_leases.c.name == job, _leases.c.lease_owner.is_not(None))
        async with self._reading() as session:
            row = (await session.execute(stmt)).first()
        return None if row is None else (row.lease_owner, row.lease_until)
