"""Certificates: issued ones with their keys, which one is current per name, renewal and
revocation; and the pending order a certificate comes from, kept until it is stored."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from datetime import datetime

from sqlalchemy import and_, func, select, text, update

from .._timefmt import utcnow
from .._schema import PARAMETERS_PER_QUERY, chunked
from .engine import _CERTIFICATE_LOCK_KEY, _as_bytes, _aware
from .names import NamesMixin
from .records import (
    CertificateTimes,
    ExpiryOverview,
    PendingOrder,
    StoredCertificate,
    _allowed,
    _certificate,
    _certificates,
    _is_current,
    _name_states,
)


class CertificatesMixin(NamesMixin):
    """Issued certificates (rows only ever gain a revocation or a new renewal time) and
    pending orders."""

    async def save_certificate(
        self,
        *,
        name: str,
        names: Sequence[str],
        key_pem: bytes,
        chain_pem: bytes,
        serial: str,
        issuer: str,
        not_before: datetime,
        not_after: datetime,
        renew_at: datetime,
        directory: str,
        order_url: str | None = None,
        profile: str | None = None,
    ) -> StoredCertificate:
        """Store a newly issued certificate; ``names`` is saved with ``name`` first.

        On PostgreSQL the insert holds an advisory lock until commit so that ids become
        visible in increasing order, which :meth:`certificates_since` relies on.
        """
        all_names = [name, *(other for other in dict.fromkeys(names) if other != name)]
        values = {
            "name": name,
            "names": all_names,
            "key_pem": self._sealer.seal(_as_bytes(key_pem)),
            "chain_pem": _as_bytes(chain_pem),
            "serial": serial,
            "issuer": issuer,
            "not_before": _aware(not_before, "not_before"),
            "not_after": _aware(not_after, "not_after"),
            "renew_at": _aware(renew_at, "renew_at"),
            "directory": directory,
            "order_url": order_url,
            "profile": profile,
            "created_at": utcnow(),
        }
        async with self._writing() as session:
            if self.dialect == "postgresql":
                await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CERTIFICATE_LOCK_KEY})
            stmt = self._insert(_certificates).values(**values).returning(*_certificates.c)
            row = (await session.execute(stmt)).one()
            # The order is done: forget it in the same transaction, so a crash right after
            # cannot make a restart download and store the same certificate twice.
            await session.execute(
                update(_name_states).where(_name_states.c.name == name).values(order_url=None, order_directory=None, order_key_pem=None)
            )
            await self._know(session, [name])
            await self._refresh_certificates(session, [name])
            await self._announce_change(session)
        return self._unsealed(_certificate(row))

    async def save_pending_order(self, name: str, directory: str, order_url: str, key_pem: bytes) -> None:
        """Remember the order placed for ``name`` and its certificate key, before finalising."""
        values = {"order_url": order_url, "order_directory": directory, "order_key_pem": self._sealer.seal(_as_bytes(key_pem))}
        stmt = self._insert(_name_states).values(name=name, failures=0, **values)
        stmt = stmt.on_conflict_do_update(index_elements=["name"], set_=values)
        async with self._writing() as session:
            await session.execute(stmt)
            await self._know(session, [name])

    async def pending_order(self, name: str, directory: str) -> PendingOrder | None:
        """The order a previous process left unfinished for ``name`` at ``directory``."""
        stmt = select(_name_states.c.order_url, _name_states.c.order_key_pem).where(
            _name_states.c.name == name, _name_states.c.order_directory == directory, _name_states.c.order_url.is_not(None)
        )
        async with self._reading() as session:
            row = (await session.execute(stmt)).first()
        if row is None or row.order_key_pem is None:
            return None
        return PendingOrder(order_url=row.order_url, key_pem=self._sealer.unseal(bytes(row.order_key_pem)))

    async def current_certificate(self, name: str) -> StoredCertificate | None:
        """The unrevoked certificate for ``name`` that lasts longest (it may have expired)."""
        stmt = select(_certificates).where(_is_current(), _certificates.c.name == name)
        async with self._reading() as session:
            row = (await session.execute(stmt)).first()
        return self._unsealed(_certificate(row)) if row is not None else None

    async def current_certificates(self, names: Sequence[str] | None = None) -> list[StoredCertificate]:
        """:meth:`current_certificate` for every name (or the given ones), in one query per chunk."""
        chunks: list[list[str]] | list[None] = list(chunked(names)) if names is not None else [None]
        if not chunks:
            return []
        found: list[StoredCertificate] = []
        async with self._reading() as session:
            for chunk in chunks:
                current = select(_certificates).where(_is_current())
                if chunk is not None:
                    current = current.where(_certificates.c.name.in_(chunk))
                found.extend(self._unsealed(_certificate(row)) for row in (await session.execute(current)).all())
        found.sort(key=lambda cert: cert.name)
        return found

    async def expiry_overview(self, now: datetime, is_allowed: Callable[[str], bool]) -> ExpiryOverview:
        """How many allowed names have a certificate, the soonest expiry among them, and the
        current certificates already past their renewal time (the only ones that can be expiring).

        The database does the counting: only names that the allowlist does not list exactly
        (those allowed by a pattern, or no longer allowed) come back one by one, so that
        ``is_allowed`` can judge them; the common case of exact entries holds nothing in memory.
        """
        latest = (
            select(_certificates.c.name, func.max(_certificates.c.not_after).label("not_after"))
            .where(_certificates.c.revoked_at.is_(None))
            .group_by(_certificates.c.name)
            .subquery()
        )
        listed = select(func.count(), func.min(latest.c.not_after)).join_from(latest, _allowed, _allowed.c.entry == latest.c.name)
        unlisted = select(latest.c.name, latest.c.not_after).where(latest.c.name.not_in(select(_allowed.c.entry)))
        due = select(
            _certificates.c.id, _certificates.c.name, _certificates.c.not_before, _certificates.c.not_after, _certificates.c.renew_at
        ).where(_is_current(), _certificates.c.renew_at <= _aware(now, "now"))
        async with self._reading() as session:
            certified, soonest = (await session.execute(listed)).one()
            certified = int(certified)
            async for name, not_after in await session.stream(unlisted.execution_options(yield_per=PARAMETERS_PER_QUERY)):
                if is_allowed(name):
                    certified += 1
                    soonest = not_after if soonest is None else min(soonest, not_after)
            rows = (await session.execute(due)).all()
        return ExpiryOverview(
            certified=certified,
            soonest=soonest,
            due=[CertificateTimes(row.id, row.name, row.not_before, row.not_after, row.renew_at) for row in rows if is_allowed(row.name)],
        )

    async def renewals_due(self, before: datetime, limit: int = 100) -> list[StoredCertificate]:
        """Current certificates whose ``renew_at`` is not after ``before``, soonest first."""
        stmt = (
            select(_certificates)
            .where(_is_current(), _certificates.c.renew_at <= _aware(before, "before"))
            .order_by(_certificates.c.renew_at, _certificates.c.id)
            .limit(limit)
        )
        async with self._reading() as session:
            rows = (await session.execute(stmt)).all()
        return [self._unsealed(_certificate(row)) for row in rows]

    async def count_renewals_due(self, before: datetime) -> int:
        """How many current certificates are due for renewal by ``before``."""
        stmt = select(func.count()).select_from(_certificates).where(_is_current(), _certificates.c.renew_at <= _aware(before, "before"))
        async with self._reading() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def certificates_since(self, last_id: int, limit: int | None = None) -> list[StoredCertificate]:
        """Certificates with an id above ``last_id``, oldest first.

        Running servers poll this with the highest id they have seen to pick up certificates
        another process issued. Revocations change existing rows, so they do not show here.
        """
        stmt = select(_certificates).where(_certificates.c.id > last_id).order_by(_certificates.c.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        async with self._reading() as session:
            rows = (await session.execute(stmt)).all()
        return [self._unsealed(_certificate(row)) for row in rows]

    async def set_renewal(self, cert_id: int, *, renew_at: datetime, ari_next_check_at: datetime | None) -> None:
        """Move a certificate's renewal time (into the CA's window) and its next ARI fetch."""
        stmt = (
            update(_certificates)
            .where(_certificates.c.id == cert_id)
            .values(renew_at=_aware(renew_at, "renew_at"),
                    ari_next_check_at=_aware(ari_next_check_at, "ari_next_check_at") if ari_next_check_at else None)
            .returning(_certificates.c.name)
        )
        async with self._writing() as session:
            await self._refresh_certificates(session, (await session.execute(stmt)).scalars().all())

    async def renewal_info_due(self, before: datetime, limit: int = 100, *, skip: Collection[str] = ()) -> list[StoredCertificate]:
        """Current certificates whose renewal information should be fetched by ``before``:
        never fetched first, then the longest due; those issued by a directory in ``skip``
        (CAs that publish none) are left out. Two index range reads, not one sorted scan."""
        checked = _certificates.c.ari_next_check_at
        current = and_(_is_current(), _certificates.c.directory.not_in(skip)) if skip else _is_current()
        never = select(_certificates).where(current, checked.is_(None)).order_by(_certificates.c.id).limit(limit)
        async with self._reading() as session:
            rows = (await session.execute(never)).all()
            if len(rows) < limit:
                due = (
                    select(_certificates)
                    .where(current, checked <= _aware(before, "before"))
                    .order_by(checked, _certificates.c.id)
                    .limit(limit - len(rows))
                )
                rows += (await session.execute(due)).all()
        return [self._unsealed(_certificate(row)) for row in rows]

    async def revoked_since(self, when: datetime) -> list[StoredCertificate]:
        """Certificates revoked after ``when``, so running servers stop serving them."""
        stmt = select(_certificates).where(_certificates.c.revoked_at > _aware(when, "when")).order_by(_certificates.c.revoked_at)
        async with self._reading() as session:
            rows = (await session.execute(stmt)).all()
        return [self._unsealed(_certificate(row)) for row in rows]

    async def mark_revoked(self, cert_id: int, when: datetime | None = None) -> bool:
        """Record that a certificate was revoked; False if it was unknown or already revoked."""
        at = _aware(when, "when") if when is not None else utcnow()
        stmt = (
            update(_certificates)
            .where(_certificates.c.id == cert_id, _certificates.c.revoked_at.is_(None))
            .values(revoked_at=at)
            .returning(_certificates.c.name)
        )
        async with self._writing() as session:
            revoked = (await session.execute(stmt)).scalars().all()
            await self._refresh_certificates(session, revoked)
            if revoked:
                await self._announce_change(session)
            return bool(revoked)
