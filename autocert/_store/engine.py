"""The store's engine: database URLs, migrations, SQLite set-up, and the base class that owns
the engine, its sessions and the key sealer, which every part of :class:`Store` builds on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing, suppress
from datetime import datetime
from pathlib import Path
from typing import Any, Self, TypeVar

from sqlalchemy import Table, event, inspect, select, text
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from .._errors import ConfigError, StoreError
from .._schema import POSTGRES_SCHEMES, SQLITE_BUSY_TIMEOUT, SQLITE_SCHEMES, head_revision, migrations_path
from .._sealing import KeySealer
from .listener import CHANNEL, ChangeListener
from .records import Account, StoredCertificate, _accounts, _certificates

log = logging.getLogger("autocert.store")


class _CancelledResetFilter(logging.Filter):
    """A task cancelled while its connection was being reset (a shutdown cancelling a scan
    halfway) leaves SQLAlchemy's pool to discard that connection, which is all there is to
    do; the pool reports it as an ERROR with a traceback. That report is dropped here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


# The pool logs through a logger named after its class; filters do not reach child loggers.
logging.getLogger(f"{AsyncAdaptedQueuePool.__module__}.{AsyncAdaptedQueuePool.__name__}").addFilter(_CancelledResetFilter())

# Advisory lock keys (PostgreSQL): fixed numbers, so every instance contends for the same lock.
_MIGRATION_LOCK_KEY = 0x6175746F63657274  # "autocert"
_CERTIFICATE_LOCK_KEY = _MIGRATION_LOCK_KEY + 1
_BUDGET_LOCK_KEY = _MIGRATION_LOCK_KEY + 3

_BEGIN_MODE = "autocert_sqlite_begin"

_Keyed = TypeVar("_Keyed", Account, StoredCertificate)


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
    if driver in SQLITE_SCHEMES:
        database = parsed.database
        if not database or database == ":memory:":
            return URL.create("sqlite+aiosqlite", query=parsed.query)  # in-memory
        if not database.startswith("file:"):
            database = os.path.expanduser(database)
        return parsed.set(drivername="sqlite+aiosqlite", database=database)
    if driver in POSTGRES_SCHEMES:
        return parsed.set(drivername="postgresql+asyncpg")
    raise ConfigError(f"unsupported database URL scheme {driver!r}: {hint}")


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


def _current_revision(connection: Connection) -> str | None:
    """What Alembic's version table says, without importing Alembic (None: never migrated)."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _upgrade_to_head(connection: Connection) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), "head")


def _includes_revision(current: str, revision: str) -> bool:
    """Whether the schema at ``current`` has had ``revision`` applied (it is ``current`` or older)."""
    return any(script.revision == revision for script in _script_directory().iterate_revisions(current, "base"))


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


def _aware(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be an aware datetime (UTC), got {value!r}")
    return value


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("ascii") if isinstance(value, str) else bytes(value)


# --------------------------------------------------------------------------------------------
# The base every part of the store builds on


class StoreBase:
    """What every part of :class:`Store` shares: the engine and its read and write sessions,
    the key sealer, the connection kept for polling, and the store's lifecycle."""

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
        # SQLite's read transactions see one state of the file throughout; PostgreSQL's
        # default (READ COMMITTED) gives each statement its own.
        snapshot_engine = engine.execution_options(isolation_level="REPEATABLE READ") if self.dialect == "postgresql" else engine
        self._snapshot_sessions = async_sessionmaker(snapshot_engine, expire_on_commit=False)
        #: Kept open for :meth:`change_marks`, which every server runs once a second.
        self._poll_connection: AsyncConnection | None = None

    def _unsealed(self, record: _Keyed) -> _Keyed:
        """The record with its private key readable (unsealed with AUTOCERT_SECRET if needed)."""
        return dataclasses.replace(record, key_pem=self._sealer.unseal(record.key_pem))

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, *, migrate: bool = True, secret: str | None = None) -> Self:
        """Connect to ``url`` (as users write it) and, unless told not to, migrate to head.

        Migrating on open means no command ever needs ``autocert db upgrade`` first; when the
        schema is already current this costs one query.
        """
        target = _parse_url(url)
        options: dict[str, Any] = {"pool_pre_ping": True}
        if target.drivername.startswith("sqlite"):
            await asyncio.to_thread(_prepare_sqlite_file, target.database or ":memory:")
            options["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT}
            # A file has no connection to lose: the ping before each use (one more trip to
            # aiosqlite's thread) only cost about a tenth of every read.
            options["pool_pre_ping"] = False
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
                await self._after_migration(connection, current)
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"cannot migrate database {self.url}: {_short_error(exc)}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("alembic"):
                raise StoreError(f"cannot migrate database {self.url}: {exc}") from exc
            raise
        return head

    async def _after_migration(self, connection: AsyncConnection, previous: str | None) -> None:
        """Fill what a migration from ``previous`` (None: an empty database) created empty, in
        the migration's own transaction; the parts of the store that need to override this."""

    async def ping(self) -> None:
        """Round-trip to the database; raises :class:`StoreError` when it is unreachable."""
        async with self._reading() as session:
            await session.execute(select(1))

    async def check_keys(self) -> None:
        """Raise :class:`StoreError`, naming ``AUTOCERT_SECRET``, when stored private keys cannot
        be read with this process's secret (missing, or not the one they were sealed with).

        Tries every account key and the newest certificate key: a few rows whatever the size,
        and the newest key is where another instance with another secret would show first.
        """
        newest = select(_certificates.c.key_pem).order_by(_certificates.c.id.desc()).limit(1)
        async with self._reading() as session:
            blobs = [*(await session.execute(select(_accounts.c.key_pem))).scalars(), *(await session.execute(newest)).scalars()]
        for blob in blobs:
            self._sealer.unseal(bytes(blob))

    # -- transactions ------------------------------------------------------------------------

    def _reading(self) -> AbstractAsyncContextManager[AsyncSession]:
        """One read transaction."""
        return self._transaction(self._read_sessions)

    def _snapshot(self) -> AbstractAsyncContextManager[AsyncSession]:
        """One read transaction whose statements all see the same state of the database."""
        return self._transaction(self._snapshot_sessions)

    def _writing(self) -> AbstractAsyncContextManager[AsyncSession]:
        """One write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
        return self._transaction(self._write_sessions)

    @asynccontextmanager
    async def _transaction(self, sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
        try:
            async with sessions() as session, session.begin():
                yield session
        except (SQLAlchemyError, OSError) as exc:
            raise StoreError(f"database {self.url}: {_short_error(exc)}") from exc

    async def _announce_change(self, session: AsyncSession) -> None:
        """Wake every listening server at commit (PostgreSQL; see :mod:`.listener`)."""
        if self.dialect == "postgresql":
            await session.execute(text(f"NOTIFY {CHANNEL}"))

    def change_listener(self, on_change: Callable[[], None]) -> ChangeListener | None:
        """A listener calling ``on_change`` whenever another process (or this one) changes the
        allowlist or stores or revokes a certificate; None on SQLite, which must poll."""
        if self.dialect != "postgresql":
            return None
        dsn = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        return ChangeListener(dsn, on_change, shown_url=self.url)

    def _insert(self, table: Table) -> Any:
        """The dialect's INSERT, which is the one offering ON CONFLICT."""
        if self.dialect == "postgresql":
            return pg_dialect.insert(table)
        return sqlite_dialect.insert(table)
