"""Persistent state behind autocert, on SQLite (one host) or PostgreSQL (several instances).

This is the only module that writes SQL. It hands out frozen dataclasses, never ORM objects,
so nothing above it can run a query by accident, and every write is one short transaction so
that a server and a CLI (or several servers) can share the database safely:

- SQLite runs in WAL mode with a busy timeout, and write transactions start with
  ``BEGIN IMMEDIATE`` so that two processes queue for the write lock instead of failing when
  a read turns into a write.
- Leases, account creation and allowlist changes are single ``INSERT ... ON CONFLICT``
  statements, race-free across processes on both backends without application locks.
- Times are computed on the caller's host. Instances sharing PostgreSQL must keep their
  clocks in sync (they need that for TLS validity checks anyway); lease lengths should be
  far longer than the expected skew.

Names and allowlist entries are expected in the form :mod:`autocert._names` produces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, closing, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from sqlalchemy import ColumnElement, Row, Table, and_, delete, event, func, inspect, or_, select, text, union, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from autocert._errors import ConfigError, StoreError
from autocert._sealing import KeySealer
from autocert._models import (
    AccountRow,
    AllowedRow,
    AllowlistVersionRow,
    AttemptRow,
    CertificateRow,
    ChallengeRow,
    NameStateRow,
    utcnow,
)
from autocert._names import is_pattern, normalize_entry, pattern_for

__all__ = [
    "Account",
    "AllowedEntry",
    "Attempt",
    "CertificateTimes",
    "ChangeMarks",
    "ExpiryOverview",
    "NameState",
    "Store",
    "StoredCertificate",
    "async_url",
    "head_revision",
    "migrations_path",
]

log = logging.getLogger("autocert.store")

_accounts: Table = AccountRow.__table__  # type: ignore[assignment]
_allowed: Table = AllowedRow.__table__  # type: ignore[assignment]
_allowlist_version: Table = AllowlistVersionRow.__table__  # type: ignore[assignment]
_certificates: Table = CertificateRow.__table__  # type: ignore[assignment]
_attempts: Table = AttemptRow.__table__  # type: ignore[assignment]
_name_states: Table = NameStateRow.__table__  # type: ignore[assignment]
_challenges: Table = ChallengeRow.__table__  # type: ignore[assignment]

#: How long a SQLite writer waits for another process's write lock before giving up.
#: Writes take milliseconds; the margin covers a migration running in another process.
SQLITE_BUSY_TIMEOUT = 30.0

# Advisory lock keys (PostgreSQL): fixed numbers, so every instance contends for the same lock.
_MIGRATION_LOCK_KEY = 0x6175746F63657274  # "autocert"
_CERTIFICATE_LOCK_KEY = _MIGRATION_LOCK_KEY + 1

# Keep statements well under the bound-parameter limits of SQLite (32766) and asyncpg (32767).
_CHUNK = 500

_BEGIN_MODE = "autocert_sqlite_begin"

AttemptResult = Literal["running", "valid", "failed"]
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Values handed to callers


@dataclass(frozen=True, slots=True)
class AllowedEntry:
    """An allowlist entry (a name or ``*.pattern``) and when it was added."""

    entry: str
    added_at: datetime
    cap: int | None = None


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
# URLs and migrations


def async_url(url: str) -> str:
    """Translate the database URL a user wrote into one naming an async driver.

    Users write ``sqlite:///path`` and ``postgresql://...`` (or ``postgres://``, as many
    hosting providers print it); autocert only ships async drivers, so those are chosen here.
    Raises :class:`ConfigError` for anything else, without echoing a password.
    """
    return _parse_url(url).render_as_string(hide_password=False)


def _parse_url(url: str) -> URL:
    hint = "use sqlite:///PATH or postgresql://USER@HOST/DBNAME"
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"database URL is empty: {hint}")
    try:
        parsed = make_url(url.strip())
    except (ArgumentError, ValueError):
        raise ConfigError(f"database URL is not a valid URL: {hint}") from None
    driver = parsed.drivername
    if driver in ("sqlite", "sqlite+aiosqlite"):
        database = parsed.database
        if not database or database == ":memory:":
            return URL.create("sqlite+aiosqlite", query=parsed.query)  # in-memory
        if not database.startswith("file:"):
            database = os.path.expanduser(database)
        return parsed.set(drivername="sqlite+aiosqlite", database=database)
    if driver in ("postgresql", "postgres", "postgresql+asyncpg", "postgres+asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg")
    raise ConfigError(f"unsupported database URL scheme {driver!r}: {hint}")


def migrations_path() -> Path:
    """Where the Alembic scripts are: packaged in the wheel, or the top-level source folder."""
    package_dir = Path(__file__).resolve().parent
    packaged = package_dir / "_migrations"
    if packaged.is_dir():
        return packaged
    return package_dir.parent / "migrations"


def _alembic_config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_path()).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def _script_directory() -> Any:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config())


_REVISION_LINE = re.compile(r"""^(down_revision|revision)\s*(?::[^=]*)?=\s*(?:["']([^"']+)["']|None)""", re.MULTILINE)


@functools.cache
def head_revision() -> str:
    """The newest schema revision this version of autocert knows.

    Read from the migration scripts' ``revision``/``down_revision`` lines rather than through
    Alembic: every start checks the schema, and Alembic (with Mako) is ~0.1 s of imports that
    are needed only when there is something to migrate. A test holds this to Alembic's answer.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in sorted((migrations_path() / "versions").glob("*.py")):
        found = dict((key, value) for key, value in _REVISION_LINE.findall(script.read_text(encoding="utf-8")))
        if found.get("revision"):
            revisions.add(found["revision"])
        if found.get("down_revision"):
            parents.add(found["down_revision"])
    heads = sorted(revisions - parents)
    if len(heads) != 1:
        raise StoreError(f"migrations in {migrations_path()} have {len(heads)} heads; expected exactly one")
    return heads[0]


def _current_revision(connection: Connection) -> str | None:
    """What Alembic's version table says, without importing Alembic (None: never migrated)."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _upgrade_to_head(connection: Connection) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), "head")


def _known_revision(revision: str) -> bool:
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    try:
        return _script_directory().get_revision(revision) is not None
    except (RevisionError, CommandError):
        return False


# --------------------------------------------------------------------------------------------
# Engine set-up


def _prepare_sqlite_file(database: str) -> None:
    """Create the database file owner-only before SQLite does, and switch it to WAL once.

    The file holds private keys, so it must never exist with a wider mode, even briefly.
    WAL (readers never block the writer) is a property of the file, set here rather than on
    every connection: switching needs an exclusive lock, for which SQLite does not always
    wait, so processes opening a new file together retry here, in a worker thread.
    """
    if database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot create database file {path}: {exc.strerror or exc}") from None
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
    while True:
        try:
            with closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT)) as connection:
                (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
                if str(mode).lower() != "wal":
                    connection.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise StoreError(f"cannot open database file {path}: {exc}") from None
            time.sleep(0.01)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open database file {path}: {exc}") from None


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    """Busy timeout for sharing the file; our own BEGIN so transactions really isolate.

    Python's sqlite3 module only begins transactions before DML, which makes read-then-write
    sequences racy and DDL non-transactional; taking BEGIN over fixes both, and lets write
    transactions ask for the write lock up front (``BEGIN IMMEDIATE``).
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT * 1000)}")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_BEGIN_MODE, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _short_error(exc: BaseException) -> str:
    """One line from a driver error: SQLAlchemy's own text spans several lines with the SQL."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        exc = exc.orig
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


def _chunks(items: Iterable[_T], size: int = _CHUNK) -> Iterator[list[_T]]:
    """The distinct items, in their first order, a bounded number per ``IN (...)`` query."""
    distinct = list(dict.fromkeys(items))
    for start in range(0, len(distinct), size):
        yield distinct[start : start + size]


def _aware(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime (UTC), got {value!r}")
    return value


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else bytes(value)


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


def _attempt(row: Row[Any]) -> Attempt:
    return Attempt(
        id=row.id,
        name=row.name,
        directory=row.directory,
        started_at=row.started_at,
        finished_at=row.finished_at,
        result=row.result,
        problem_type=row.problem_type,
        detail=row.detail,
    )


def _name_state(row: Row[Any]) -> NameState:
    return NameState(
        name=row.name,
        failures=row.failures,
        next_attempt_at=row.next_attempt_at,
        last_error=row.last_error,
        lease_owner=row.lease_owner,
        lease_until=row.lease_until,
    )


# --------------------------------------------------------------------------------------------
# The store


_Keyed = TypeVar("_Keyed", Account, StoredCertificate)


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


#: See :meth:`Store.change_marks`; built once, as it runs every second.
_CHANGE_MARKS = select(
    select(_allowlist_version.c.version).where(_allowlist_version.c.id == 1).scalar_subquery(),
    select(func.coalesce(func.max(_certificates.c.id), 0)).scalar_subquery(),
    select(func.count()).select_from(_certificates).where(_certificates.c.revoked_at.is_not(None)).scalar_subquery(),
)


class Store:
    """Async access to autocert's database; create it with :meth:`open`, end with :meth:`close`."""

    def __init__(self, engine: AsyncEngine, *, secret: str | None = None) -> None:
        self._engine = engine
        self._sealer = KeySealer(secret)
        self.dialect: str = engine.dialect.name
        """``"sqlite"`` or ``"postgresql"``: lets callers pick polling or LISTEN/NOTIFY."""
        self.url: str = engine.url.render_as_string(hide_password=True)
        """The async URL in use, password hidden, for logs and error messages."""
        write_engine = engine
        if self.dialect == "sqlite":
            write_engine = engine.execution_options(**{_BEGIN_MODE: "IMMEDIATE"})
        self._write_engine = write_engine
        self._read_sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = async_sessionmaker(write_engine, expire_on_commit=False)
        #: Kept open for :meth:`change_marks`, which every server runs once a second.
        self._poll_connection: AsyncConnection | None = None

    def _unsealed(self, record: _Keyed) -> _Keyed:
        """The record with its private key readable (unsealed with AUTOCERT_SECRET if needed)."""
        return dataclasses.replace(record, key_pem=self._sealer.unseal(record.key_pem))

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True, secret: str | None = None) -> Store:
        """Connect to ``url`` (as users write it) and, unless told not to, migrate to head.

        Migrating on open means no command ever needs ``autocert db upgrade`` first; when the
        schema is already current this costs one query.
        """
        target = _parse_url(url)
        options: dict[str, Any] = {"pool_pre_ping": True}
        if target.drivername.startswith("sqlite"):
            await asyncio.to_thread(_prepare_sqlite_file, target.database or ":memory:")
            options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT}
        try:
            engine = create_async_engine(target, **options)
        except (NoSuchModuleError, ImportError) as exc:
            raise ConfigError(f"database driver for {target.drivername} is not installed: {exc}") from None
        if engine.dialect.name == "sqlite":
            _install_sqlite_hooks(engine)
        store = cls(engine, secret=secret if secret is not None else os.environ.get("AUTOCERT_SECRET"))
        if migrate:
            try:
                await store._migrate()
            except BaseException:
                await engine.dispose()
                raise
        return store

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._drop_poll_connection()
        await self._engine.dispose()

    async def _drop_poll_connection(self) -> None:
        connection, self._poll_connection = self._poll_connection, None
        if connection is not None:
            with suppress(Exception):  # it may be the reason we drop it
                await connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def upgrade(self) -> str:
        """Migrate the schema to the newest revision; returns that revision id."""
        return await self._migrate()

    async def revision(self) -> str | None:
        """The schema revision the database is at (None before the first migration)."""
        async with self._reading() as session:
            connection = await session.connection()
            return await connection.run_sync(_current_revision)

    async def _migrate(self) -> str:
        head = await asyncio.to_thread(head_revision)
        current = await self.revision()
        if current == head:
            return head
        if current is not None and not await asyncio.to_thread(_known_revision, current):
            raise StoreError(
                f"database schema is at revision {current}, newer than this autocert knows "
                f"(newest {head}): upgrade autocert"
            )
        log.info("migrating database %s from %s to %s", self.url, current or "empty", head)
        try:
            async with self._write_engine.connect() as connection, connection.begin():
                if self.dialect == "postgresql":
                    # Held until commit: a second process waits here, then finds nothing to do.
                    await connection.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                    )
                await connection.run_sync(_upgrade_to_head)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot migrate database {self.url}: {_short_error(exc)}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("alembic"):
                raise StoreError(f"cannot migrate database {self.url}: {exc}") from exc
            raise
        return head

    async def ping(self) -> None:
        """Round-trip to the database; raises :class:`StoreError` when it is unreachable."""
        async with self._reading() as session:
            await session.execute(select(1))

    # -- transactions ------------------------------------------------------------------------

    @asynccontextmanager
    async def _reading(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self._read_sessions() as session, session.begin():
                yield session
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"database {self.url}: {_short_error(exc)}") from exc

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self._write_sessions() as session, session.begin():
                yield session
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"database {self.url}: {_short_error(exc)}") from exc

    def _insert(self, table: Table) -> Any:
        """The dialect's INSERT, which is the one offering ON CONFLICT."""
        if self.dialect == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)

    # -- allowlist ---------------------------------------------------------------------------

    async def allow(self, entries: Iterable[str], *, cap: int | None = None) -> list[str]:
        """Add entries; returns those that were not there yet, in the order given.

        Entries are passed through :func:`autocert._names.normalize_entry` again (it is
        idempotent) so that a caller's mistake cannot store a name the SNI check never matches.
        ``cap`` sets (or, for entries already present, replaces) the patterns' name limit.
        """
        wanted = list(dict.fromkeys(normalize_entry(entry) for entry in entries))
        if not wanted:
            return []
        if cap is not None and not all(is_pattern(entry) for entry in wanted):
            raise ValueError("a cap applies to *.patterns only")
        now = utcnow()
        added: set[str] = set()
        async with self._writing() as session:
            for chunk in _chunks(wanted):
                stmt = self._insert(_allowed).values([{"entry": entry, "added_at": now, "cap": cap} for entry in chunk])
                stmt = stmt.on_conflict_do_nothing(index_elements=["entry"]).returning(_allowed.c.entry)
                added.update((await session.execute(stmt)).scalars())
                if cap is not None:
                    await session.execute(update(_allowed).where(_allowed.c.entry.in_(chunk)).values(cap=cap))
            if added or cap is not None:
                await self._bump_allowlist_version(session)
        return [entry for entry in wanted if entry in added]

    async def pattern_cap(self, pattern: str) -> int | None:
        async with self._reading() as session:
            return (await session.execute(select(_allowed.c.cap).where(_allowed.c.entry == pattern))).scalar_one_or_none()

    async def names_under(self, pattern: str) -> set[str]:
        """Distinct names one label under ``pattern`` that were ever ordered (its cap's usage)."""
        base = pattern.removeprefix("*.")
        like = "%." + base.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = select(_attempts.c.name).where(_attempts.c.name.like(like, escape="\\")).distinct()
        async with self._reading() as session:
            found = (await session.execute(stmt)).scalars()
            return {name for name in found if pattern_for(name) == pattern}

    async def disallow(self, entries: Iterable[str]) -> list[str]:
        """Remove entries; returns those that were present, in the order given."""
        wanted = list(dict.fromkeys(normalize_entry(entry) for entry in entries))
        removed: set[str] = set()
        async with self._writing() as session:
            for chunk in _chunks(wanted):
                stmt = delete(_allowed).where(_allowed.c.entry.in_(chunk)).returning(_allowed.c.entry)
                removed.update((await session.execute(stmt)).scalars())
            if removed:
                await self._bump_allowlist_version(session)
        return [entry for entry in wanted if entry in removed]

    async def _bump_allowlist_version(self, session: AsyncSession) -> None:
        bumped = await session.execute(update(_allowlist_version).where(_allowlist_version.c.id == 1).values(version=_allowlist_version.c.version + 1))
        if bumped.rowcount == 0:  # a database created from the models rather than the migrations
            await session.execute(self._insert(_allowlist_version).values(id=1, version=1).on_conflict_do_nothing(index_elements=["id"]))

    async def allowed(self) -> list[AllowedEntry]:
        """The whole allowlist, sorted by entry (in Python: database collations differ)."""
        async with self._reading() as session:
            rows = (await session.execute(select(_allowed.c.entry, _allowed.c.added_at, _allowed.c.cap))).all()
        return sorted((AllowedEntry(row.entry, row.added_at, row.cap) for row in rows), key=lambda item: item.entry)

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

    async def is_allowed(self, name: str) -> bool:
        """Whether ``name`` is allowed exactly or by the single-label pattern covering it."""
        candidates = [name]
        pattern = pattern_for(name)
        if pattern is not None:
            candidates.append(pattern)
        async with self._reading() as session:
            stmt = select(_allowed.c.entry).where(_allowed.c.entry.in_(candidates)).limit(1)
            return (await session.execute(stmt)).first() is not None

    # -- accounts ----------------------------------------------------------------------------

    async def get_account(self, directory: str) -> Account | None:
        """The account registered for an ACME directory URL, if any."""
        async with self._reading() as session:
            row = (await session.execute(select(_accounts).where(_accounts.c.directory == directory))).first()
        return self._unsealed(_account(row)) if row is not None else None

    async def save_account(
        self, directory: str, key_pem: bytes, url: str | None = None, contact: str | None = None
    ) -> Account:
        """Insert the account, or update ``url``/``contact`` of the stored one; returns the stored row.

        An existing key is never replaced: an account key is the account, and losing it
        orphans every order made with it. When a row for ``directory`` already holds a
        different key (another process won a race to create it), that row is returned
        unchanged and the caller must use its key. To update an existing account, pass the
        ``key_pem`` exactly as :meth:`get_account` returned it. A ``url`` of None keeps a
        stored URL; ``contact`` is stored as given.
        """
        key = _as_bytes(key_pem)
        # Sealed keys differ byte-wise each time they are sealed, so the stored key is
        # compared after unsealing rather than in SQL.
        async with self._writing() as session:
            existing = (await session.execute(select(_accounts).where(_accounts.c.directory == directory))).first()
            if existing is None:
                stmt = self._insert(_accounts).values(
                    directory=directory, key_pem=self._sealer.seal(key), url=url, contact=contact, created_at=utcnow()
                )
                await session.execute(stmt.on_conflict_do_nothing(index_elements=["directory"]))
            elif self._sealer.unseal(bytes(existing.key_pem)) == key:
                await session.execute(
                    update(_accounts)
                    .where(_accounts.c.directory == directory)
                    .values(url=url if url is not None else existing.url, contact=contact)
                )
            row = (await session.execute(select(_accounts).where(_accounts.c.directory == directory))).one()
        return self._unsealed(_account(row))

    # -- certificates ------------------------------------------------------------------------

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
        return self._unsealed(_certificate(row))

    async def save_pending_order(self, name: str, directory: str, order_url: str, key_pem: bytes) -> None:
        """Remember the order placed for ``name`` and its certificate key, before finalising."""
        values = {"order_url": order_url, "order_directory": directory, "order_key_pem": self._sealer.seal(_as_bytes(key_pem))}
        stmt = self._insert(_name_states).values(name=name, failures=0, **values)
        stmt = stmt.on_conflict_do_update(index_elements=["name"], set_=values)
        async with self._writing() as session:
            await session.execute(stmt)

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

    async def clear_pending_order(self, name: str) -> None:
        stmt = update(_name_states).where(_name_states.c.name == name).values(order_url=None, order_directory=None, order_key_pem=None)
        async with self._writing() as session:
            await session.execute(stmt)

    async def current_certificate(self, name: str) -> StoredCertificate | None:
        """The unrevoked certificate for ``name`` that lasts longest (it may have expired)."""
        stmt = select(_certificates).where(_is_current(), _certificates.c.name == name)
        async with self._reading() as session:
            row = (await session.execute(stmt)).first()
        return self._unsealed(_certificate(row)) if row is not None else None

    async def current_certificates(self, names: Sequence[str] | None = None) -> list[StoredCertificate]:
        """:meth:`current_certificate` for every name (or the given ones), in one query per chunk."""
        chunks: list[list[str]] | list[None] = list(_chunks(names)) if names is not None else [None]
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
            async for name, not_after in await session.stream(unlisted.execution_options(yield_per=_CHUNK)):
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
        )
        async with self._writing() as session:
            await session.execute(stmt)

    async def renewal_info_due(self, before: datetime, limit: int = 100) -> list[StoredCertificate]:
        """Current certificates whose renewal information should be fetched by ``before``:
        never fetched first, then the longest due. Two index range reads, not one sorted scan."""
        checked = _certificates.c.ari_next_check_at
        never = select(_certificates).where(_is_current(), checked.is_(None)).order_by(_certificates.c.id).limit(limit)
        async with self._reading() as session:
            rows = (await session.execute(never)).all()
            if len(rows) < limit:
                due = (
                    select(_certificates)
                    .where(_is_current(), checked <= _aware(before, "before"))
                    .order_by(checked, _certificates.c.id)
                    .limit(limit - len(rows))
                )
                rows += (await session.execute(due)).all()
        return [self._unsealed(_certificate(row)) for row in rows]

    async def orders_since(self, directory: str, since: datetime) -> int:
        """Orders started against ``directory`` since ``since``: the account's rate budget."""
        stmt = (
            select(func.count())
            .select_from(_attempts)
            .where(_attempts.c.directory == directory, _attempts.c.started_at >= _aware(since, "since"))
        )
        async with self._reading() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def failures_since(self, name: str, since: datetime) -> list[datetime]:
        """Start times of ``name``'s failed attempts since ``since``, oldest first."""
        stmt = (
            select(_attempts.c.started_at)
            .where(_attempts.c.name == name, _attempts.c.result == "failed", _attempts.c.started_at >= _aware(since, "since"))
            .order_by(_attempts.c.started_at)
        )
        async with self._reading() as session:
            return list((await session.execute(stmt)).scalars())

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
            .returning(_certificates.c.id)
        )
        async with self._writing() as session:
            return (await session.execute(stmt)).first() is not None

    # -- attempts and backoff ----------------------------------------------------------------

    async def start_attempt(self, name: str, directory: str) -> int:
        """Record that an order for ``name`` is starting; returns the attempt id."""
        stmt = (
            self._insert(_attempts)
            .values(name=name, directory=directory, started_at=utcnow(), result="running")
            .returning(_attempts.c.id)
        )
        async with self._writing() as session:
            return int((await session.execute(stmt)).scalar_one())

    async def finish_attempt(
        self,
        attempt_id: int,
        result: AttemptResult,
        problem_type: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Close an attempt and update the name's failure count in the same transaction.

        ``valid`` resets the backoff (failures, last error, next attempt); ``failed`` adds one
        failure and records ``"<problem_type>: <detail>"`` as the last error. Finishing an
        attempt twice raises :class:`StoreError` rather than counting a failure twice.
        """
        if result not in ("valid", "failed"):
            raise ValueError(f"an attempt finishes as 'valid' or 'failed', not {result!r}")
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
            for chunk in _chunks(names):
                stmt = select(_attempts.c.name, func.count()).where(_attempts.c.name.in_(chunk)).group_by(_attempts.c.name)
                counts.update((name, int(count)) for name, count in (await session.execute(stmt)).all())
        return counts

    async def name_state(self, name: str) -> NameState | None:
        """Backoff and lease state of ``name``, if it ever had any."""
        return (await self.name_states([name])).get(name)

    async def name_states(self, names: Sequence[str]) -> dict[str, NameState]:
        """:meth:`name_state` for many names, one query per chunk; names without state are absent."""
        found: dict[str, NameState] = {}
        async with self._reading() as session:
            for chunk in _chunks(names):
                rows = (await session.execute(select(_name_states).where(_name_states.c.name.in_(chunk)))).all()
                found.update((row.name, _name_state(row)) for row in rows)
        return found

    async def set_next_attempt(self, name: str, when: datetime | None) -> None:
        """Schedule (or with None, clear) the earliest time the next order for ``name`` may start."""
        at = _aware(when, "when") if when is not None else None
        stmt = self._insert(_name_states).values(name=name, failures=0, next_attempt_at=at)
        stmt = stmt.on_conflict_do_update(index_elements=["name"], set_={"next_attempt_at": stmt.excluded.next_attempt_at})
        async with self._writing() as session:
            await session.execute(stmt)

    # -- leases ------------------------------------------------------------------------------

    async def try_lease(self, name: str, owner: str, seconds: float) -> bool:
        """Take (or extend) the lease on ordering ``name`` for ``seconds``; True if we hold it.

        One statement decides: it inserts the lease, or overwrites it only when it is free,
        expired or already ours. Both databases serialise conflicting upserts on the row, so
        of two processes racing exactly one gets a row back.
        """
        if seconds <= 0:
            raise ValueError(f"lease length must be positive, got {seconds!r}")
        now = utcnow()
        stmt = self._insert(_name_states).values(
            name=name, failures=0, lease_owner=owner, lease_until=now + timedelta(seconds=seconds)
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={"lease_owner": stmt.excluded.lease_owner, "lease_until": stmt.excluded.lease_until},
            where=or_(
                _name_states.c.lease_owner.is_(None),
                _name_states.c.lease_until.is_(None),
                _name_states.c.lease_until <= now,
                _name_states.c.lease_owner == owner,
            ),
        ).returning(_name_states.c.name)
        async with self._writing() as session:
            return (await session.execute(stmt)).first() is not None

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

    # -- http-01 -----------------------------------------------------------------------------

    async def put_challenge(self, token: str, name: str, key_authorization: str) -> None:
        """Publish an http-01 answer so that whichever instance the CA reaches can serve it."""
        stmt = self._insert(_challenges).values(
            token=token, name=name, key_authorization=key_authorization, created_at=utcnow()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["token"],
            set_={
                "name": stmt.excluded.name,
                "key_authorization": stmt.excluded.key_authorization,
                "created_at": stmt.excluded.created_at,
            },
        )
        async with self._writing() as session:
            await session.execute(stmt)

    async def get_challenge(self, token: str) -> str | None:
        """The key authorization to answer for ``token``, if one is pending."""
        stmt = select(_challenges.c.key_authorization).where(_challenges.c.token == token)
        async with self._reading() as session:
            return (await session.execute(stmt)).scalar_one_or_none()

    async def delete_challenge(self, token: str) -> None:
        """Withdraw an http-01 answer once its authorization is settled."""
        async with self._writing() as session:
            await session.execute(delete(_challenges).where(_challenges.c.token == token))

    async def purge_challenges(self, older_than: datetime) -> int:
        """Drop answers left behind by a crashed process; returns how many were removed."""
        stmt = (
            delete(_challenges)
            .where(_challenges.c.created_at < _aware(older_than, "older_than"))
            .returning(_challenges.c.token)
        )
        async with self._writing() as session:
            return len((await session.execute(stmt)).all())

    # -- status ------------------------------------------------------------------------------

    async def status_names(self, names: Sequence[str] | None = None) -> list[str]:
        """Every name the database knows about, sorted; or ``names`` themselves, deduplicated.

        Known means: an exact allowlist entry, or any certificate, attempt or backoff state
        for it (so disallowed names with history still show up).
        """
        if names is not None:
            return list(dict.fromkeys(names))
        known = union(
            select(_allowed.c.entry.label("name")).where(_allowed.c.entry.not_like("*.%")),
            select(_certificates.c.name),
            select(_attempts.c.name),
            select(_name_states.c.name),
        ).subquery()
        async with self._reading() as session:
            found = (await session.execute(select(known.c.name))).scalars()
            return sorted(set(found))


def _error_text(problem_type: str | None, detail: str | None) -> str:
    if problem_type and detail:
        return f"{problem_type}: {detail}"
    return detail or problem_type or "failed without detail"
