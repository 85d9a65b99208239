"""``autocert status`` read straight through the database driver (``sqlite3``, asyncpg), without
SQLAlchemy: importing SQLAlchemy's async ORM takes about half a second by itself, more than the
whole command may take on a small machine.

The listing is the store's (:meth:`autocert._store.Store.status_rows` in name order) with the
same rules (:mod:`autocert._status_rules`) written as SQL text by :class:`TextColumns`; a test
holds the two to the same output on both backends. It reads only a database already at the
schema this autocert knows; for anything else (no file yet, a schema to migrate, a URL form it
does not read, a database it cannot reach) :func:`open_listing` returns None and the caller
opens the store, which migrates, creates or explains.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import AsyncGenerator, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

from ._policy import allowlist_candidates
from ._schema import POSTGRES_SCHEMES, SQLITE_BUSY_TIMEOUT, SQLITE_SCHEMES, chunked, head_revision
from ._status_rules import (
    ROW_COLUMNS,
    SORTS,
    NameStatus,
    Plan,
    StatusQuery,
    driver,
    named_rows,
    status_item,
    status_record,
)
from ._timefmt import utcnow

__all__ = ["Listing", "TextColumns", "open_listing"]


class _Sql:
    """A fragment of SQL and its parameters, ``?`` marking each in order."""

    __slots__ = ("params", "text")

    def __init__(self, text: str, params: tuple[Any, ...] = ()) -> None:
        self.text, self.params = text, params

    def term(self) -> _Sql:
        return self


class _Column(_Sql):
    """A column of the status index, compared as SQLAlchemy's columns are in the rules."""

    __slots__ = ("builder",)
    __hash__ = None  # type: ignore[assignment]  # == builds SQL, as in SQLAlchemy

    def __init__(self, text: str, builder: TextColumns) -> None:
        super().__init__(text)
        self.builder = builder

    def _compare(self, operator: str, other: Any) -> _Sql:
        if isinstance(other, _Sql):
            return _Sql(f"{self.text} {operator} {other.text}", other.params)
        return _Sql(f"{self.text} {operator} ?", (self.builder.bind(other),))

    def __gt__(self, other: Any) -> _Sql:
        return self._compare(">", other)

    def __ge__(self, other: Any) -> _Sql:
        return self._compare(">=", other)

    def __lt__(self, other: Any) -> _Sql:
        return self._compare("<", other)

    def __le__(self, other: Any) -> _Sql:
        return self._compare("<=", other)

    def __eq__(self, other: Any) -> _Sql:  # type: ignore[override]
        return self._compare("=", other)

    def is_(self, _none: None) -> _Sql:
        return _Sql(f"{self.text} IS NULL")

    def is_not(self, _none: None) -> _Sql:
        return _Sql(f"{self.text} IS NOT NULL")

    def in_(self, values: Collection[str]) -> _Sql:
        return self._among("IN", values, "1 != 1")

    def not_in(self, values: Collection[str]) -> _Sql:
        return self._among("NOT IN", values, "1 = 1")

    def _among(self, operator: str, values: Collection[str], empty: str) -> _Sql:
        if not values:
            return _Sql(empty)
        return _Sql(f"{self.text} {operator} ({', '.join('?' * len(values))})", tuple(values))

    # A boolean column (``allowed``) standing as a term, or negated: SQLite stores 0 and 1,
    # and its partial index on disallowed names matches ``allowed = 0`` as written.
    def term(self) -> _Sql:
        return _Sql(f"{self.text} = 1") if self.builder.sqlite else self

    def __invert__(self) -> _Sql:
        return _Sql(f"{self.text} = 0" if self.builder.sqlite else f"NOT {self.text}")


class TextColumns:
    """:class:`autocert._status_rules.Columns` as SQL text for SQLite or PostgreSQL: columns
    not in ``indexed`` are kept from SQLite's planner with a unary ``+``, as the store does."""

    zero = _Sql("0")

    def __init__(self, indexed: Collection[str], *, sqlite: bool) -> None:
        self.indexed, self.sqlite = indexed, sqlite

    def __call__(self, name: str) -> _Column:
        return _Column(name if name in self.indexed or not self.sqlite else f"+{name}", self)

    def bind(self, value: Any) -> Any:
        """A parameter as the column stores it: SQLite keeps times as naive UTC text."""
        if isinstance(value, datetime) and self.sqlite:
            return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return value

    @staticmethod
    def _join(operator: str, terms: Sequence[_Sql], empty: str) -> _Sql:
        if not terms:
            return _Sql(empty)
        parts = [term.term() for term in terms]
        return _Sql("(" + f" {operator} ".join(part.text for part in parts) + ")", tuple(p for part in parts for p in part.params))

    def and_(self, *terms: _Sql) -> _Sql:
        return self._join("AND", terms, "1 = 1")

    def or_(self, *terms: _Sql) -> _Sql:
        return self._join("OR", terms, "1 != 1")

    def true(self) -> _Sql:
        return _Sql("1 = 1")


_SELECT_ROW = f"SELECT {', '.join(ROW_COLUMNS)} FROM names"
_WIDTHS = "SELECT coalesce(max(length(name)), 0), coalesce(max(attempts), 0) FROM names"
_ORDERING = "SELECT name FROM name_states WHERE lease_owner IS NOT NULL AND lease_until > ?"
_REVISION = "SELECT version_num FROM alembic_version"


class Listing:
    """One read-only snapshot of a database at the current schema: the names a
    :class:`StatusQuery` selects in name order, and the table widths of the whole listing."""

    sqlite = True

    def _rows(self, sql: str, params: Sequence[Any], batch: int) -> AsyncGenerator[list[Sequence[Any]], None]:
        raise NotImplementedError

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        raise NotImplementedError

    async def _all(self, sql: str, params: Sequence[Any]) -> list[Sequence[Any]]:
        return [row async for rows in self._rows(sql, params, 500) for row in rows]

    async def _column(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return [row[0] for row in await self._all(sql, params)]

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Listing:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def widths(self) -> tuple[int, int]:
        """The longest name and the most attempts of any name (see ``Store.status_widths``)."""
        row = await self._one(_WIDTHS)
        assert row is not None
        return int(row[0]), int(row[1])

    async def _ordering(self, now: datetime) -> frozenset[str]:
        """Names whose order lease some process holds at ``now`` (see ``Store.ordering_names``)."""
        return frozenset(await self._column(_ORDERING, [TextColumns((), sqlite=self.sqlite).bind(now)]))

    async def named(self, names: Sequence[str], *, directory: str, now: datetime | None = None) -> list[dict[str, Any]]:
        """STATUS objects of ``names`` in the order given, unknown ones too: what
        :func:`autocert._status.status_report` gives for them from the store."""
        now = now or utcnow()
        ordering = await self._ordering(now)
        wanted = list(dict.fromkeys(names))
        found: dict[str, NameStatus] = {}
        for chunk in chunked(wanted):
            where = TextColumns(("name",), sqlite=self.sqlite)("name").in_(chunk)
            rows = await self._all(f"{_SELECT_ROW} WHERE {where.text}", where.params)
            found.update((record.name, record) for record in map(status_record, rows))
        entries: set[str] = set()
        for chunk in chunked(allowlist_candidates([name for name in wanted if name not in found])):
            where = TextColumns(("entry",), sqlite=self.sqlite)("entry").in_(chunk)
            entries.update(await self._column(f"SELECT entry FROM allowed WHERE {where.text}", where.params))
        return [status_item(row, ordering=row.name in ordering, directory=directory, now=now) for row in named_rows(wanted, found, entries)]

    async def chunks(
        self, query: StatusQuery, *, directory: str, limit: int | None = None, chunk: int = 200, now: datetime | None = None,
    ) -> AsyncGenerator[list[dict[str, Any]], None]:
        """STATUS objects of the names ``query`` selects (at most ``limit``), ``chunk`` at a
        time: what :func:`autocert._status.status_chunks` gives for it from the store."""
        if query.sort != "name":
            raise ValueError("the listing reads in name order only")
        now = now or utcnow()
        ordering = await self._ordering(now)
        plan = Plan(query, sorted(ordering), now)
        left = limit
        for part in plan.parts(SORTS["name"]):
            c = TextColumns(driver(part.boxes, None, prefix=bool(query.prefix), issuer=bool(query.issuer)), sqlite=self.sqlite)
            where = plan.where(part.boxes, c).term()
            sql, params = f"{_SELECT_ROW} WHERE {where.text} ORDER BY name", list(where.params)
            if left is not None:
                sql, params = sql + " LIMIT ?", [*params, left]
            rows = self._rows(sql, params, chunk)
            async with contextlib.aclosing(rows):
                async for batch in rows:
                    taken = batch if left is None else batch[:left]
                    yield [status_item(record, ordering=record.name in ordering, directory=directory, now=now)
                           for record in map(status_record, taken)]
                    if left is not None:
                        left -= len(taken)
                        if left <= 0:
                            return


class _SqliteListing(Listing):
    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    async def _rows(self, sql: str, params: Sequence[Any], batch: int) -> AsyncGenerator[list[Sequence[Any]], None]:
        cursor = self.connection.execute(sql, params)
        try:
            while rows := cursor.fetchmany(batch):
                yield rows
        finally:
            cursor.close()

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        row: Sequence[Any] | None = self.connection.execute(sql, params).fetchone()
        return row

    async def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.connection.execute("ROLLBACK")
        self.connection.close()


class _PostgresListing(Listing):
    sqlite = False

    def __init__(self, connection: Any, transaction: Any) -> None:
        self.connection, self.transaction = connection, transaction

    @staticmethod
    def _numbered(sql: str) -> str:
        """``?`` placeholders as asyncpg's ``$1``, ``$2``…: none of this module's SQL has a
        ``?`` anywhere else."""
        pieces = sql.split("?")
        return "".join(piece + (f"${index}" if index < len(pieces) else "") for index, piece in enumerate(pieces, 1))

    async def _rows(self, sql: str, params: Sequence[Any], batch: int) -> AsyncGenerator[list[Sequence[Any]], None]:
        rows: list[Sequence[Any]] = []
        async for record in self.connection.cursor(self._numbered(sql), *params, prefetch=batch):
            rows.append(record)
            if len(rows) == batch:
                yield rows
                rows = []
        if rows:
            yield rows

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> Sequence[Any] | None:
        row: Sequence[Any] | None = await self.connection.fetchrow(self._numbered(sql), *params)
        return row

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.transaction.rollback()
        await self.connection.close()


def _sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite:///PATH`` URL in the forms the store reads the same way, else None."""
    scheme, separator, path = url.partition(":///")
    if not separator or scheme not in SQLITE_SCHEMES or not path or path == ":memory:" or path.startswith("file:"):
        return None
    return None if any(char in path for char in "?#%") else os.path.expanduser(path)


def _postgres_dsn(url: str) -> str | None:
    """A ``postgresql://`` DSN for asyncpg from a URL without options, else None."""
    scheme, separator, rest = url.partition("://")
    return f"postgresql://{rest}" if separator and scheme in POSTGRES_SCHEMES and "?" not in rest else None


async def open_listing(url: str) -> Listing | None:
    """A listing of the database at ``url`` (as users write it), or None when the store must
    open it instead (see the module's docstring)."""
    url = url.strip()
    path = _sqlite_path(url)
    if path is not None:
        return _open_sqlite(path)
    dsn = _postgres_dsn(url)
    if dsn is not None:
        return await _open_postgres(dsn)
    return None


def _open_sqlite(path: str) -> Listing | None:
    if not os.path.isfile(path):
        return None  # the store creates it, owner-only
    try:
        connection = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        connection.execute("BEGIN")  # one snapshot for every query of the listing
        row = connection.execute(_REVISION).fetchone()
    except sqlite3.Error:
        connection.close()
        return None
    if row is None or row[0] != head_revision():
        connection.execute("ROLLBACK")
        connection.close()
        return None
    return _SqliteListing(connection)


async def _open_postgres(dsn: str) -> Listing | None:
    try:
        import asyncpg  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        connection = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, ValueError):
        return None
    transaction = connection.transaction(isolation="repeatable_read", readonly=True)
    try:
        await transaction.start()
        revision = await connection.fetchval(_REVISION)
    except asyncpg.PostgresError:
        await connection.close()
        return None
    if revision != head_revision():
        await transaction.rollback()
        await connection.close()
        return None
    return _PostgresListing(connection, transaction)
