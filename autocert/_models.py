"""Database schema as SQLAlchemy 2 declarative models.

These classes are the schema's single source of truth: Alembic migrations are checked against
them in the tests, and :mod:`autocert._store` is the only module that queries them. Nothing
outside the store sees a model instance; the store hands out frozen dataclasses instead, so
that no caller can trigger lazy SQL from the event loop or hold a session open by accident.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, DateTime, Index, Integer, LargeBinary, MetaData, String, Text, text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from ._timefmt import utcnow

__all__ = [
    "NAME_LENGTH",
    "AccountRow",
    "AllowedRow",
    "AttemptRow",
    "Base",
    "CapClaimRow",
    "CertificateRow",
    "ChallengeRow",
    "DnsRecordRow",
    "LeaseRow",
    "NameRow",
    "NameStateRow",
    "UTCDateTime",
]

# Deterministic constraint names let later migrations drop or alter constraints by name on
# every backend (SQLite batch mode needs them to rebuild tables).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: A DNS name is at most 253 octets; 255 leaves room for a ``*.`` pattern prefix.
NAME_LENGTH = 255
URL_LENGTH = 1024


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always an aware UTC datetime in Python, on every backend.

    PostgreSQL keeps time zones (``timestamptz``); SQLite stores text and would hand back
    naive datetimes, which then compare wrongly or raise against aware ones. Values are
    stored as naive UTC text on SQLite so that string order equals time order in SQL, and
    naive datetimes are refused on the way in because guessing their zone hides bugs.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given: pass an aware UTC datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base carrying the shared naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class AccountRow(Base):
    """One ACME account per directory URL; the key is the account's identity at the CA."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    directory: Mapped[str] = mapped_column(String(URL_LENGTH), unique=True)
    key_pem: Mapped[bytes] = mapped_column(LargeBinary)
    url: Mapped[str | None] = mapped_column(Text)
    contact: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AllowedRow(Base):
    """An allowlist entry: a normalised host name, or a ``*.base`` pattern."""

    __tablename__ = "allowed"

    entry: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(default=utcnow)
    # For a pattern: how many distinct names under it may be ordered (None: no limit).
    cap: Mapped[int | None] = mapped_column(Integer)
    # For a pattern: served from one wildcard certificate (dns-01) instead of one per name.
    wildcard: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class AllowlistVersionRow(Base):
    """One row whose ``version`` goes up with every change to ``allowed``, in the same
    transaction: running servers poll this row every second instead of the whole list."""

    __tablename__ = "allowlist_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class CertificateRow(Base):
    """An issued certificate; rows are never rewritten except to mark revocation and to move
    ``renew_at`` into the CA's suggested renewal window.

    Ids only grow (AUTOINCREMENT on SQLite, a sequence on PostgreSQL) so that running servers
    can pick up certificates written by other processes by remembering the last id they saw.
    """

    __tablename__ = "certificates"
    __table_args__ = (
        # Unrevoked rows only: which certificate is current per name, and what is due for renewal.
        Index("ix_certificates_current", "name", "not_after", "id", sqlite_where=text("revoked_at IS NULL"),
              postgresql_where=text("revoked_at IS NULL")),
        Index("ix_certificates_renew_at", "renew_at", sqlite_where=text("revoked_at IS NULL"), postgresql_where=text("revoked_at IS NULL")),
        Index("ix_certificates_ari_next_check_at", "ari_next_check_at", sqlite_where=text("revoked_at IS NULL"),
              postgresql_where=text("revoked_at IS NULL")),
        # Revoked rows only (servers ask every second what was revoked lately); a full index on
        # revoked_at would tempt SQLite's planner into using it for ``revoked_at IS NULL``.
        Index("ix_certificates_revoked_at", "revoked_at", sqlite_where=text("revoked_at IS NOT NULL"),
              postgresql_where=text("revoked_at IS NOT NULL")),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    names: Mapped[list[str]] = mapped_column(JSON)
    key_pem: Mapped[bytes] = mapped_column(LargeBinary)
    chain_pem: Mapped[bytes] = mapped_column(LargeBinary)
    serial: Mapped[str] = mapped_column(String(128))
    issuer: Mapped[str] = mapped_column(Text)
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    renew_at: Mapped[datetime]
    directory: Mapped[str] = mapped_column(String(URL_LENGTH))
    order_url: Mapped[str | None] = mapped_column(Text)
    profile: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    # When the CA's renewal information (RFC 9773) should next be fetched; None: never yet.
    ari_next_check_at: Mapped[datetime | None]


class AttemptRow(Base):
    """One issuance attempt, kept as history for the status page and for rate budgets."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    directory: Mapped[str] = mapped_column(String(URL_LENGTH))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    result: Mapped[str] = mapped_column(String(16), default="running")
    problem_type: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str | None] = mapped_column(Text)


class NameStateRow(Base):
    """Per-name scheduling state: backoff after failures, and the lease guarding orders.

    The lease lives in the database rather than in a process so that two processes (or two
    servers sharing PostgreSQL) never order the same name at once.
    """

    __tablename__ = "name_states"
    __table_args__ = (
        # Leases held (or left to expire): which names are being ordered, for the status queries.
        Index("ix_name_states_lease_until", "lease_until", sqlite_where=text("lease_owner IS NOT NULL"),
              postgresql_where=text("lease_owner IS NOT NULL")),
    )

    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    lease_until: Mapped[datetime | None]
    # The order in progress and its certificate key, stored before the order is finalised so
    # that a process killed mid-order resumes it after a restart instead of ordering again.
    order_url: Mapped[str | None] = mapped_column(Text)
    order_directory: Mapped[str | None] = mapped_column(Text)
    order_key_pem: Mapped[bytes | None] = mapped_column(LargeBinary)


#: Names compare byte by byte on every backend, so that pages sorted by name (and ranges over a
#: prefix) come out in the same order on SQLite and on a PostgreSQL with a language collation.
SORTED_NAME = String(NAME_LENGTH).with_variant(String(NAME_LENGTH, collation="C"), "postgresql")


class NameRow(Base):
    """The status index: one row per name the database knows (an exact allowlist entry, a name
    the ask endpoint allowed, or any certificate, attempt or scheduling state for it) with
    what the status queries filter, sort and count on, so that a page of 100 names out of
    100,000 is a few index reads.

    Derived data: every write to the tables it summarises updates it in the same transaction
    (:mod:`autocert._store.names`), and ``Store.rebuild_names`` recomputes it from them.
    """

    __tablename__ = "names"
    __table_args__ = (
        Index("ix_names_not_after", "not_after", "name"),
        Index("ix_names_renew_at", "renew_at", "name"),
        Index("ix_names_next_attempt_at", "next_attempt_at", "name"),
        Index("ix_names_attempts", "attempts", "name"),
        Index("ix_names_issuer", "issuer", "name"),
        Index("ix_names_soon_at", "soon_at"),
        # Small sets looked up by themselves: names without a certificate (pending, failed,
        # issuing), names failing now, names no longer allowed.
        Index("ix_names_uncertified", "failures", "name", sqlite_where=text("not_after IS NULL"),
              postgresql_where=text("not_after IS NULL")),
        Index("ix_names_failing", "name", sqlite_where=text("failures > 0"), postgresql_where=text("failures > 0")),
        # As each backend writes "not allowed" (SQLite's partial indexes match terms as written).
        Index("ix_names_disallowed", "name", sqlite_where=text("allowed = 0"), postgresql_where=text("NOT allowed")),
    )

    name: Mapped[str] = mapped_column(SORTED_NAME, primary_key=True)
    # An exact allowlist entry; allowed: that, or covered by the one pattern that can cover it.
    listed: Mapped[bool] = mapped_column(Boolean)
    allowed: Mapped[bool] = mapped_column(Boolean)
    # The current certificate (see the store's contract) and what the report shows of it; all
    # None without one. Copied, so that a page reads this table alone.
    certificate_id: Mapped[int | None] = mapped_column(Integer)
    not_before: Mapped[datetime | None]
    not_after: Mapped[datetime | None]
    renew_at: Mapped[datetime | None]
    issuer: Mapped[str | None] = mapped_column(Text)
    serial: Mapped[str | None] = mapped_column(String(128))
    directory: Mapped[str | None] = mapped_column(String(URL_LENGTH))
    # When the status page starts flagging it as expiring soon (policy.expires_soon_from).
    soon_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Copied from name_states: consecutive failures, the last error and the time of the next try.
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None]


class ChallengeRow(Base):
    """A pending challenge answer (http-01 by token, tls-alpn-01 by name), shared so that any
    instance the CA reaches can serve it."""

    __tablename__ = "challenges"

    token: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    key_authorization: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    challenge_type: Mapped[str] = mapped_column(String(16), default="http-01", server_default="http-01")


class CapClaimRow(Base):
    """A place under a capped pattern, taken by a name in the same transaction that checked
    the cap: servers racing for the last place cannot both get it."""

    __tablename__ = "cap_claims"

    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    pattern: Mapped[str] = mapped_column(String(NAME_LENGTH), index=True)
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)


class DnsRecordRow(Base):
    """A dns-01 TXT record published and not yet cleared, so that a process killed mid-order
    leaves no record behind: the next start clears what its dead owner published."""

    __tablename__ = "dns_records"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    fqdn: Mapped[str] = mapped_column(String(NAME_LENGTH))
    value: Mapped[str] = mapped_column(String(NAME_LENGTH))
    owner: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LeaseRow(Base):
    """A lease on a job that one process at a time does for the whole database, such as the
    renewal schedule and the expiry watch, so that several workers or instances sharing it
    neither renew nor notify twice. Taken and renewed like the per-name order leases."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    lease_owner: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    lease_until: Mapped[datetime | None]


class AskedNameRow(Base):
    """A name off the allowlist that the ask endpoint (``--ask``) allowed and that was ordered.
    It makes the name allowed in the status index, as an allowlist entry would; it goes when
    the endpoint refuses the name again (asked before each renewal)."""

    __tablename__ = "asked_names"

    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    allowed_at: Mapped[datetime] = mapped_column(default=utcnow)
