"""What the store hands to callers: frozen dataclasses, never ORM objects, so that nothing
above the store can run a query by accident; the tables and row converters behind them; and
the one definition of a name's current certificate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Row, Table, and_, or_, select

from .._models import (
    AccountRow,
    AllowedRow,
    AllowlistVersionRow,
    AskedNameRow,
    AttemptRow,
    CapClaimRow,
    CertificateRow,
    ChallengeRow,
    DnsRecordRow,
    LeaseRow,
    NameRow,
    NameStateRow,
)

_accounts: Table = AccountRow.__table__  # type: ignore[assignment]
_allowed: Table = AllowedRow.__table__  # type: ignore[assignment]
_allowlist_version: Table = AllowlistVersionRow.__table__  # type: ignore[assignment]
_certificates: Table = CertificateRow.__table__  # type: ignore[assignment]
_attempts: Table = AttemptRow.__table__  # type: ignore[assignment]
_name_states: Table = NameStateRow.__table__  # type: ignore[assignment]
_challenges: Table = ChallengeRow.__table__  # type: ignore[assignment]
_names: Table = NameRow.__table__  # type: ignore[assignment]
_cap_claims: Table = CapClaimRow.__table__  # type: ignore[assignment]
_dns_records: Table = DnsRecordRow.__table__  # type: ignore[assignment]
_leases: Table = LeaseRow.__table__  # type: ignore[assignment]
_asked_names: Table = AskedNameRow.__table__  # type: ignore[assignment]


def _is_current() -> ColumnElement[bool]:
    """True for each name's current certificate: unrevoked, and no unrevoked one for the same
    name lasts longer (ties go to the newer id).

    Written as an anti-join rather than a window over the whole table so that the partial
    indexes on unrevoked rows (``ix_certificates_current``, ``ix_certificates_renew_at``) serve
    it: with 100,000 names the scheduler's and the expiry watch's queries stay near 0.1 s.
    """
    newer = _certificates.alias("newer")
    better = (
        select(newer.c.id)
        .where(
            newer.c.name == _certificates.c.name,
            newer.c.revoked_at.is_(None),
            or_(
                newer.c.not_after > _certificates.c.not_after,
                and_(newer.c.not_after == _certificates.c.not_after, newer.c.id > _certificates.c.id),
            ),
        )
        .exists()
    )
    return and_(_certificates.c.revoked_at.is_(None), ~better)


# --------------------------------------------------------------------------------------------
# Values handed to callers


@dataclass(frozen=True, slots=True)
class AllowedEntry:
    """An allowlist entry (a name or ``*.pattern``) and when it was added."""

    entry: str
    added_at: datetime
    cap: int | None = None
    wildcard: bool = False


@dataclass(frozen=True, slots=True)
class DnsRecord:
    """A dns-01 TXT record this or another process published and has not cleared yet."""

    id: int
    fqdn: str
    value: str
    owner: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Account:
    """The ACME account for one directory; ``key_pem`` is stored exactly as it was given."""

    directory: str
    key_pem: bytes
    url: str | None
    contact: str | None


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    """An issued certificate with its private key and the metadata renewal decisions need."""

    id: int
    name: str
    names: tuple[str, ...]
    key_pem: bytes
    chain_pem: bytes
    serial: str
    issuer: str
    not_before: datetime
    not_after: datetime
    renew_at: datetime
    directory: str
    order_url: str | None
    profile: str | None
    created_at: datetime
    revoked_at: datetime | None
    ari_next_check_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One issuance attempt; ``result`` is ``running`` until it is finished."""

    id: int
    name: str
    directory: str
    started_at: datetime
    finished_at: datetime | None
    result: str
    problem_type: str | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class CertificateTimes:
    """A current certificate's validity and renewal time, without its key or chain: what an
    expiry check needs."""

    id: int
    name: str
    not_before: datetime
    not_after: datetime
    renew_at: datetime


@dataclass(frozen=True, slots=True)
class ChangeMarks:
    """See :meth:`Store.change_marks`: each only grows, so a difference means news."""

    allowlist_version: int
    latest_certificate_id: int
    revocations: int


@dataclass(frozen=True, slots=True)
class ExpiryOverview:
    """See :meth:`Store.expiry_overview`."""

    certified: int
    soonest: datetime | None
    due: list[CertificateTimes]


@dataclass(frozen=True, slots=True)
class PendingOrder:
    """An order placed but not finished, with the key its CSR uses."""

    order_url: str
    key_pem: bytes


@dataclass(frozen=True, slots=True)
class NameState:
    """Backoff and lease state of one name (``failures`` counts failures since the last success)."""

    name: str
    failures: int
    next_attempt_at: datetime | None
    last_error: str | None
    lease_owner: str | None
    lease_until: datetime | None


# --------------------------------------------------------------------------------------------
# Row conversion


def _account(row: Row[Any]) -> Account:
    return Account(directory=row.directory, key_pem=bytes(row.key_pem), url=row.url, contact=row.contact)


def _certificate(row: Row[Any]) -> StoredCertificate:
    names = row.names
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    return StoredCertificate(
        id=row.id,
        name=row.name,
        names=tuple(names),
        key_pem=bytes(row.key_pem),
        chain_pem=bytes(row.chain_pem),
        serial=row.serial,
        issuer=row.issuer,
        not_before=row.not_before,
        not_after=row.not_after,
        renew_at=row.renew_at,
        directory=row.directory,
        order_url=row.order_url,
        profile=row.profile,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        ari_next_check_at=row.ari_next_check_at,
    )


_Plain = TypeVar("_Plain", Attempt, NameState)


def _plain(record: type[_Plain], row: Row[Any]) -> _Plain:
    """A record whose fields are columns of the same names, taken as they are."""
    return record(**{field.name: getattr(row, field.name) for field in dataclasses.fields(record)})


def _attempt(row: Row[Any]) -> Attempt:
    return _plain(Attempt, row)


def _name_state(row: Row[Any]) -> NameState:
    return _plain(NameState, row)
