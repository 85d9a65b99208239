"""Shared pytest fixtures.

Sections are owned by different parts of the test suite; add new fixtures in a new section.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Test the working tree when the package is not installed.
if importlib.util.find_spec("autocert") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pebble import Pebble  # noqa: E402

# ---------------------------------------------------------------------------------------------
# ACME test CA: Pebble + challtestsrv on loopback (logic in tests/pebble.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    """One Pebble shared by the whole session (its issuing root is new at each start)."""
    with Pebble(workdir=tmp_path_factory.mktemp("pebble")) as instance:
        yield instance


@pytest.fixture
def pebble_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Pebble]]:
    """Start extra Pebbles with their own environment, e.g. ``pebble_factory(PEBBLE_WFE_NONCEREJECT="50")``,
    and extra config keys (``pebble_factory(config={"externalAccountBindingRequired": True})``)
    and optionally their own DNS server (``dns_server="127.0.0.1:PORT"``)."""
    started: list[Pebble] = []

    def start(config: dict[str, object] | None = None, dns_server: str | None = None, **env: str) -> Pebble:
        instance = Pebble(env, workdir=tmp_path_factory.mktemp("pebble"), config=config, dns_server=dns_server)
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in reversed(started):
        instance.stop()


# --- end of the ACME test CA section ---


# ---------------------------------------------------------------------------------------------
# Databases: SQLite files and a scratch PostgreSQL database (used by tests/test_store.py)
# ---------------------------------------------------------------------------------------------

POSTGRES_URL_ENV = "AUTOCERT_TEST_POSTGRES_URL"
POSTGRES_SKIP_REASON = f"{POSTGRES_URL_ENV} is not set: PostgreSQL store tests skipped"


def _plain_postgres_dsn(url: str, database: str | None = None) -> str:
    """The libpq-style DSN asyncpg accepts, from any spelling of a PostgreSQL URL."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def _postgres_execute(dsn: str, *statements: str) -> None:
    import asyncpg  # imported here: only the PostgreSQL tests need it

    connection = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


async def _drop_autocert_tables(dsn: str) -> None:
    from autocert._models import Base

    tables = ", ".join(f'"{name}"' for name in [*Base.metadata.tables, "alembic_version"])
    await _postgres_execute(dsn, f"DROP TABLE IF EXISTS {tables} CASCADE")


@pytest.fixture(scope="session")
def postgres_database_url() -> Iterator[str]:
    """A database of its own on the server named by AUTOCERT_TEST_POSTGRES_URL, for this session.

    A scratch database keeps concurrent test runs (and anyone else using the named database)
    apart. When the role may not create databases, the named database itself is used and only
    autocert's tables are ever dropped in it.
    """
    import asyncio
    import os
    import secrets

    base = os.environ.get(POSTGRES_URL_ENV)
    if not base:
        pytest.skip(POSTGRES_SKIP_REASON)
    scratch = f"autocert_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin_dsn = _plain_postgres_dsn(base)
    try:
        asyncio.run(_postgres_execute(admin_dsn, f'CREATE DATABASE "{scratch}"'))
    except Exception as exc:  # no CREATEDB privilege: fall back to the named database
        if "permission denied" not in str(exc).lower():
            raise
        yield _plain_postgres_dsn(base)
        return
    try:
        yield _plain_postgres_dsn(base, scratch)
    finally:
        asyncio.run(_postgres_execute(admin_dsn, f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))


@pytest.fixture
def postgres_url(postgres_database_url: str) -> Iterator[str]:
    """An empty PostgreSQL database (no autocert tables, no alembic_version) for one test."""
    import asyncio

    asyncio.run(_drop_autocert_tables(postgres_database_url))
    yield postgres_database_url
    asyncio.run(_drop_autocert_tables(postgres_database_url))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database URL as users write it: an SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'autocert.db'}"
    return request.getfixturevalue("postgres_url")


# --- end of the databases section ---


# ---------------------------------------------------------------------------------------------
# A client's trust in Pebble, and a fresh SQLite database per test
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def root_ca(pebble: Pebble, tmp_path: Path) -> str:
    """Pebble's root as a PEM file, for clients that verify what autocert serves."""
    path = tmp_path / "pebble-root.pem"
    path.write_bytes(pebble.root_pem())
    return str(path)


@pytest.fixture()
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'autocert.db'}"
