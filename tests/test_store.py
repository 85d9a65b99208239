"""The store on SQLite and PostgreSQL: every method, migrations, and cross-process safety.

PostgreSQL runs when AUTOCERT_TEST_POSTGRES_URL names a server (see tests/conftest.py);
each test gets an empty database.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from autocert._errors import ConfigError, InvalidName, StoreError
from autocert._models import Base
from autocert._policy import is_allowed
from autocert._store import engine as store_engine
from autocert._store import (
    Account,
    AllowedEntry,
    Store,
    StoredCertificate,
    async_url,
    head_revision,
    migrations_path,
)

REPO = Path(__file__).resolve().parent.parent
DIRECTORY = "https://acme.example/directory"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def other_store(database_url: str, store: Store) -> AsyncIterator[Store]:
    """A second Store on the same database: its own engine and pool, like another process."""
    opened = await Store.open(database_url)
    try:
        yield opened
    finally:
        await opened.close()


def _certificate_fields(name: str, *, days: int = 90, issued: datetime | None = None, **extra: object) -> dict:
    start = issued or datetime(2026, 1, 1, tzinfo=UTC)
    fields: dict[str, object] = {
        "name": name,
        "names": [name],
        "key_pem": b"-----BEGIN PRIVATE KEY-----\nkey\n-----END PRIVATE KEY-----\n",
        "chain_pem": b"-----BEGIN CERTIFICATE-----\nleaf\n-----END CERTIFICATE-----\n",
        "serial": "0a1b2c",
        "issuer": "CN=Test CA",
        "not_before": start,
        "not_after": start + timedelta(days=days),
        "renew_at": start + timedelta(days=days * 2 / 3),
        "directory": DIRECTORY,
    }
    fields.update(extra)
    return fields


def _run_python(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --------------------------------------------------------------------------------------------
# URLs


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:////var/lib/autocert/a.db", "sqlite+aiosqlite:////var/lib/autocert/a.db"),
        ("sqlite:///relative.db", "sqlite+aiosqlite:///relative.db"),
        ("sqlite+aiosqlite:////tmp/a.db", "sqlite+aiosqlite:////tmp/a.db"),
        ("sqlite://", "sqlite+aiosqlite://"),
        ("sqlite:///:memory:", "sqlite+aiosqlite://"),
        ("postgresql://u:pw@db.internal:5433/certs", "postgresql+asyncpg://u:pw@db.internal:5433/certs"),
        ("postgres://u@localhost/certs", "postgresql+asyncpg://u@localhost/certs"),
        ("postgresql+asyncpg://u@localhost/certs", "postgresql+asyncpg://u@localhost/certs"),
        ("postgresql://u@localhost/certs?ssl=require", "postgresql+asyncpg://u@localhost/certs?ssl=require"),
    ],
)
def test_async_url_translates_what_users_write(given: str, expected: str) -> None:
    assert async_url(given) == expected


def test_async_url_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert async_url("sqlite:///~/a.db") == f"sqlite+aiosqlite:///{tmp_path}/a.db"


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("autocert.db", "not a valid URL"),
        ("mysql://root:hunter2@db/certs", "unsupported database URL scheme 'mysql'"),
        ("postgresql+psycopg2://u:hunter2@db/certs", "unsupported database URL scheme 'postgresql+psycopg2'"),
        ("http://example.com/db", "unsupported database URL scheme 'http'"),
    ],
)
async def test_bad_url_is_a_config_error(given: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        await Store.open(given)
    text_ = str(caught.value)
    assert message in text_
    assert "sqlite:///PATH" in text_
    assert "hunter2" not in text_
    assert "\n" not in text_


async def test_unreachable_database_is_a_store_error() -> None:
    with pytest.raises(StoreError) as caught:
        await Store.open("postgresql://postgres:hunter2@127.0.0.1:9/nothing")
    assert "127.0.0.1" in str(caught.value)
    assert "hunter2" not in str(caught.value)


# --------------------------------------------------------------------------------------------
# SQLite file handling


async def test_sqlite_file_is_created_owner_only_with_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "autocert.db"
    opened = await Store.open(f"sqlite:///{path}")
    try:
        await opened.allow(["example.com"])  # make SQLite create its WAL files too
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        for sidecar in path.parent.iterdir():
            assert stat.S_IMODE(sidecar.stat().st_mode) & 0o077 == 0, sidecar
        async with opened._engine.connect() as connection:
            mode = (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
            timeout = (await connection.exec_driver_sql("PRAGMA busy_timeout")).scalar_one()
        assert mode == "wal"
        assert timeout >= 5000
    finally:
        await opened.close()


async def test_sqlite_existing_file_mode_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "autocert.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    opened = await Store.open(f"sqlite:///{path}")
    await opened.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_sqlite_unwritable_location_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create database file"):
        await Store.open(f"sqlite:///{blocker}/autocert.db")


async def test_sqlite_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("certainly not SQLite " * 100)
    with pytest.raises(StoreError, match="cannot open database file"):
        await Store.open(f"sqlite:///{path}")


async def test_sqlite_memory_database_works() -> None:
    opened = await Store.open("sqlite://")
    try:
        assert await opened.allow(["example.com"]) == ["example.com"]
        assert await opened.allowed_entries() == frozenset({"example.com"})
    finally:
        await opened.close()


# --------------------------------------------------------------------------------------------
# Migrations


def test_migrations_are_found_in_the_source_tree() -> None:
    assert migrations_path() == REPO / "migrations"
    assert head_revision() == "0012"
    assert store_engine._script_directory().get_heads() == [head_revision()], "the light reading agrees with Alembic's"


def test_opening_a_current_database_does_not_load_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'current.db'}"
    code = textwrap.dedent(f"""
        import asyncio, sys
        from autocert._store import Store
        async def main():
            await (await Store.open({url!r})).close()  # creates and migrates: Alembic loads
            loaded = "alembic" in sys.modules
            for name in [m for m in sys.modules if m == "alembic" or m.startswith("alembic.")]:
                del sys.modules[name]
            await (await Store.open({url!r})).close()  # already current
            print(loaded, "alembic" in sys.modules)
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.split() == ["True", "False"]


async def test_open_migrates_and_upgrade_is_idempotent(database_url: str) -> None:
    opened = await Store.open(database_url, migrate=False)
    try:
        assert await opened.revision() is None
        assert await opened.upgrade() == head_revision()
        assert await opened.revision() == head_revision()
        assert await opened.upgrade() == head_revision()
        await opened.allow(["example.com"])
        assert await opened.upgrade() == head_revision()
        assert await opened.allowed_entries() == frozenset({"example.com"})
    finally:
        await opened.close()
    reopened = await Store.open(database_url)
    try:
        assert await reopened.revision() == head_revision()
        assert await reopened.allowed_entries() == frozenset({"example.com"})
    finally:
        await reopened.close()


async def test_second_open_skips_alembic_and_is_fast(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = await Store.open(database_url)
    await first.close()

    def fail(_connection: object) -> None:
        raise AssertionError("an up-to-date database must not run the migration scripts")

    monkeypatch.setattr(store_engine, "_upgrade_to_head", fail)
    started = time.perf_counter()
    second = await Store.open(database_url)
    elapsed = time.perf_counter() - started
    await second.close()
    # Skipping the scripts is what keeps it fast (about 10 ms idle); the bound only catches a
    # pathological open, with room for a machine busy with other work.
    assert elapsed < 5, f"second open took {elapsed:.3f} s"


async def test_schema_matches_models(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    opened = await Store.open(database_url)
    await opened.close()
    engine = create_async_engine(async_url(database_url))
    try:
        async with engine.connect() as connection:

            def diff(sync_connection: object) -> list:
                context = MigrationContext.configure(sync_connection, opts={"compare_type": True})
                return compare_metadata(context, Base.metadata)

            differences = await connection.run_sync(diff)
            tables = set(await connection.run_sync(lambda c: __import__("sqlalchemy").inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    assert differences == []
    assert tables == {*Base.metadata.tables, "alembic_version"}


async def test_concurrent_opens_in_one_process_migrate_once(database_url: str) -> None:
    stores = await asyncio.gather(*(Store.open(database_url) for _ in range(4)))
    try:
        assert {await s.revision() for s in stores} == {head_revision()}
    finally:
        for s in stores:
            await s.close()


async def test_concurrent_opens_in_several_processes_migrate_once(database_url: str) -> None:
    code = """
        import asyncio, sys
        from autocert._store import Store
        async def main():
            store = await Store.open(sys.argv[1])
            print(await store.revision())
            await store.close()
        asyncio.run(main())
    """
    processes = [_run_python(code, database_url) for _ in range(4)]
    outputs = [await asyncio.to_thread(p.communicate, timeout=60) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert out.strip() == head_revision()


async def test_database_from_a_newer_autocert_is_refused(database_url: str) -> None:
    opened = await Store.open(database_url)
    async with opened._engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    await opened.close()
    with pytest.raises(StoreError, match="ffff9999.*upgrade autocert"):
        await Store.open(database_url)


async def test_ping_and_dialect(store: Store, database_url: str) -> None:
    await store.ping()
    assert store.dialect == ("sqlite" if database_url.startswith("sqlite") else "postgresql")


# --------------------------------------------------------------------------------------------
# Allowlist


async def test_allow_is_idempotent_and_reports_new_entries(store: Store) -> None:
    assert await store.allow(["b.example", "*.example.com", "b.example"]) == ["b.example", "*.example.com"]
    assert await store.allow(["b.example", "a.example"]) == ["a.example"]
    assert await store.allow([]) == []
    listed = await store.allowed()
    assert [item.entry for item in listed] == ["*.example.com", "a.example", "b.example"]
    assert all(isinstance(item, AllowedEntry) and item.added_at.tzinfo is not None for item in listed)
    assert await store.allowed_entries() == frozenset({"*.example.com", "a.example", "b.example"})


async def test_allowlist_version_moves_with_every_change_and_only_then(store: Store, other_store: Store) -> None:
    start = (await other_store.change_marks()).allowlist_version
    await store.allow(["a.example", "*.b.example"])
    after_allow = (await other_store.change_marks()).allowlist_version
    assert after_allow > start
    await store.allow(["a.example"])
    await store.disallow(["absent.example"])
    assert (await other_store.change_marks()).allowlist_version == after_allow, "nothing changed"
    await store.allow(["*.b.example"], cap=3)
    after_cap = (await other_store.change_marks()).allowlist_version
    assert after_cap > after_allow
    await store.disallow(["a.example"])
    assert (await other_store.change_marks()).allowlist_version > after_cap


async def test_the_poll_connection_is_replaced_after_it_is_lost(store: Store) -> None:
    await store.change_marks()
    connection = store._poll_connection
    assert connection is not None
    if store.dialect == "postgresql":  # the server drops this one client, as on a restart
        pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await connection.rollback()
        async with store._engine.connect() as admin:
            await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(StoreError):  # this poll fails, once
            await store.change_marks()
        assert store._poll_connection is None
    else:  # SQLite cannot lose a connection from outside: mark it lost the way the pool would
        await connection.invalidate()
    await store.allow(["after.example"])  # the pool recovers too
    assert (await store.change_marks()).allowlist_version >= 1, "the next poll reconnects"


async def test_allow_normalises_again_and_refuses_bad_entries(store: Store) -> None:
    assert await store.allow(["Bücher.Example."]) == ["xn--bcher-kva.example"]
    with pytest.raises(InvalidName):
        await store.allow(["ok.example", "1.2.3.4.5"])
    assert await store.allowed_entries() == frozenset({"xn--bcher-kva.example"})  # nothing half-written


async def test_allow_many_entries_in_one_call(store: Store) -> None:
    names = [f"host{i}.example" for i in range(1234)]
    assert await store.allow(names) == names
    assert len(await store.allowed_entries()) == 1234
    assert await store.disallow(names[:700]) == names[:700]
    assert len(await store.allowed_entries()) == 534


async def test_disallow_reports_removed_entries(store: Store) -> None:
    await store.allow(["a.example", "*.example.com"])
    assert await store.disallow(["*.example.com", "missing.example", "a.example"]) == ["*.example.com", "a.example"]
    assert await store.disallow(["a.example"]) == []
    assert await store.allowed() == []


async def test_is_allowed_exact_or_one_label_pattern(store: Store) -> None:
    await store.allow(["exact.example", "*.wild.example"])
    entries = await store.allowed_entries()
    assert entries == frozenset({"exact.example", "*.wild.example"})
    assert is_allowed("exact.example", entries)
    assert is_allowed("www.wild.example", entries)
    assert not is_allowed("wild.example", entries)
    assert not is_allowed("a.b.wild.example", entries)
    assert not is_allowed("www.exact.example", entries)
    assert not is_allowed("localhost", entries)


# --------------------------------------------------------------------------------------------
# Accounts


async def test_accounts_insert_update_and_never_replace_a_key(store: Store) -> None:
    assert await store.get_account(DIRECTORY) is None
    created = await store.save_account(DIRECTORY, b"key-one", None, "mailto:a@example.com")
    assert created == Account(DIRECTORY, b"key-one", None, "mailto:a@example.com")
    registered = await store.save_account(DIRECTORY, b"key-one", "https://acme.example/acct/1", "mailto:a@example.com")
    assert registered.url == "https://acme.example/acct/1"
    # A racing process with another key gets the stored account back, untouched.
    assert await store.save_account(DIRECTORY, b"key-two", "https://acme.example/acct/2", None) == registered
    # A None url keeps the registered one; contact follows the caller.
    updated = await store.save_account(DIRECTORY, b"key-one", None, "mailto:b@example.com")
    assert updated == Account(DIRECTORY, b"key-one", "https://acme.example/acct/1", "mailto:b@example.com")
    assert await store.get_account(DIRECTORY) == updated
    other = await store.save_account("https://other.example/dir", b"key-three", "u", None)
    assert other.key_pem == b"key-three"
    assert (await store.get_account(DIRECTORY)).key_pem == b"key-one"


async def test_concurrent_account_creation_keeps_one_key(store: Store, other_store: Store) -> None:
    first, second = await asyncio.gather(
        store.save_account(DIRECTORY, b"key-a", None, None),
        other_store.save_account(DIRECTORY, b"key-b", None, None),
    )
    assert first == second
    assert first.key_pem in (b"key-a", b"key-b")


# --------------------------------------------------------------------------------------------
# Certificates


async def test_save_and_read_certificate(store: Store) -> None:
    saved = await store.save_certificate(
        **_certificate_fields("a.example", names=["www.a.example", "a.example"], order_url="https://o/1", profile="tlsserver")
    )
    assert isinstance(saved, StoredCertificate)
    assert saved.names == ("a.example", "www.a.example")  # primary name first
    assert saved.order_url == "https://o/1"
    assert saved.profile == "tlsserver"
    assert saved.revoked_at is None
    for moment in (saved.not_before, saved.not_after, saved.renew_at, saved.created_at):
        assert moment.tzinfo is not None and moment.utcoffset() == timedelta(0)
    assert saved.not_after == datetime(2026, 4, 1, tzinfo=UTC)
    assert await store.current_certificate("a.example") == saved
    assert await store.current_certificate("www.a.example") is None


async def test_certificate_times_in_other_zones_come_back_in_utc(store: Store) -> None:
    plus_two = timezone(timedelta(hours=2))
    issued = datetime(2026, 3, 1, 12, 0, tzinfo=plus_two)
    saved = await store.save_certificate(**_certificate_fields("zone.example", issued=issued))
    loaded = await store.current_certificate("zone.example")
    assert loaded is not None
    assert loaded.not_before == issued
    assert loaded.not_before.tzinfo == UTC
    assert loaded.not_before.hour == 10
    assert saved == loaded


async def test_naive_datetimes_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="aware"):
        await store.save_certificate(**_certificate_fields("naive.example", issued=datetime(2026, 1, 1)))
    with pytest.raises(ValueError, match="aware"):
        await store.set_next_attempt("naive.example", datetime(2026, 1, 1))
    assert await store.current_certificates() == []


async def test_current_certificate_prefers_latest_expiry_and_skips_revoked(store: Store) -> None:
    old = await store.save_certificate(**_certificate_fields("a.example", days=90))
    longest = await store.save_certificate(**_certificate_fields("a.example", days=120))
    newer_shorter = await store.save_certificate(**_certificate_fields("a.example", days=30))
    assert await store.current_certificate("a.example") == longest
    assert await store.mark_revoked(longest.id)
    assert not await store.mark_revoked(longest.id)  # already revoked
    assert not await store.mark_revoked(999_999)
    current = await store.current_certificate("a.example")
    assert current == old
    assert newer_shorter.id > old.id
    for cert in (old, newer_shorter):
        assert await store.mark_revoked(cert.id)
    assert await store.current_certificate("a.example") is None


async def test_mark_revoked_records_the_time(store: Store) -> None:
    saved = await store.save_certificate(**_certificate_fields("r.example"))
    when = datetime(2026, 2, 2, tzinfo=UTC)
    assert await store.mark_revoked(saved.id, when)
    (revoked,) = await store.certificates_since(saved.id - 1)
    assert revoked.revoked_at == when


async def test_current_certificates_one_per_name(store: Store) -> None:
    await store.save_certificate(**_certificate_fields("b.example", days=10))
    b_best = await store.save_certificate(**_certificate_fields("b.example", days=20))
    a_only = await store.save_certificate(**_certificate_fields("a.example"))
    c_revoked = await store.save_certificate(**_certificate_fields("c.example"))
    await store.mark_revoked(c_revoked.id)
    assert await store.current_certificates() == [a_only, b_best]
    assert await store.current_certificates(["b.example", "c.example", "missing.example"]) == [b_best]
    assert await store.current_certificates([]) == []


async def test_expiry_overview_counts_allowed_names_and_lists_only_overdue_current_certificates(store: Store) -> None:
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    now = issued + timedelta(days=70)  # past the renewal time (day 60) of a 90-day certificate
    await store.allow(["exact.example", "*.tenants.example", "revoked.example", "renewed.example"])
    await store.save_certificate(**_certificate_fields("exact.example", issued=issued))  # overdue
    await store.save_certificate(**_certificate_fields("a.tenants.example", issued=issued, days=200))  # by the pattern
    await store.save_certificate(**_certificate_fields("b.c.tenants.example", issued=issued, days=1))  # two labels: not allowed
    await store.save_certificate(**_certificate_fields("gone.example", issued=issued, days=1))  # not allowed
    revoked = await store.save_certificate(**_certificate_fields("revoked.example", issued=issued, days=2))
    await store.mark_revoked(revoked.id)
    await store.save_certificate(**_certificate_fields("renewed.example", issued=issued))  # superseded below
    renewed = await store.save_certificate(**_certificate_fields("renewed.example", issued=now, days=90))

    def allowed(name: str) -> bool:
        return name in {"exact.example", "revoked.example", "renewed.example"} or name.split(".", 1)[1] == "tenants.example"

    overview = await store.expiry_overview(now, allowed)
    assert overview.certified == 3, "exact.example, a.tenants.example and renewed.example"
    assert overview.soonest == issued + timedelta(days=90), "exact.example; never a disallowed or revoked certificate"
    assert [(item.name, item.not_after) for item in overview.due] == [("exact.example", issued + timedelta(days=90))]
    assert renewed.not_after > now

    later = await store.expiry_overview(issued + timedelta(days=150), allowed)
    assert sorted(item.name for item in later.due) == ["a.tenants.example", "exact.example", "renewed.example"]
    assert (await store.expiry_overview(now, lambda name: False)) == type(overview)(certified=2, soonest=issued + timedelta(days=90), due=[]), (
        "exact entries are counted in the database, whatever the callback says"
    )


async def test_renewal_info_due_puts_never_fetched_first_then_the_longest_due(store: Store) -> None:
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    never = await store.save_certificate(**_certificate_fields("never.example", issued=issued))
    late = await store.save_certificate(**_certificate_fields("late.example", issued=issued))
    early = await store.save_certificate(**_certificate_fields("early.example", issued=issued))
    future = await store.save_certificate(**_certificate_fields("future.example", issued=issued))
    old = await store.save_certificate(**_certificate_fields("renewed.example", issued=issued))
    await store.save_certificate(**_certificate_fields("renewed.example", issued=issued, days=120))  # supersedes old
    for certificate, when in ((late, issued + timedelta(days=2)), (early, issued + timedelta(days=1)),
                              (future, issued + timedelta(days=30)), (old, issued)):
        await store.set_renewal(certificate.id, renew_at=certificate.renew_at, ari_next_check_at=when)
    before = issued + timedelta(days=3)
    due = await store.renewal_info_due(before)
    assert [item.name for item in due][:1] == ["never.example"]
    assert [item.name for item in due if item.ari_next_check_at is not None] == ["early.example", "late.example"]
    assert never.id in {item.id for item in due} and old.id not in {item.id for item in due}
    assert [item.name for item in await store.renewal_info_due(before, limit=2)] == ["never.example", "renewed.example"]


async def test_current_certificates_for_many_names(store: Store) -> None:
    names = [f"n{i:04d}.example" for i in range(600)]
    for name in names:
        await store.save_certificate(**_certificate_fields(name))
    found = await store.current_certificates(names)
    assert [cert.name for cert in found] == names


async def test_certificates_since_and_latest_id(store: Store, other_store: Store) -> None:
    assert (await store.change_marks()).latest_certificate_id == 0
    assert await store.certificates_since(0) == []
    first = await store.save_certificate(**_certificate_fields("a.example"))
    second = await other_store.save_certificate(**_certificate_fields("b.example"))
    third = await other_store.save_certificate(**_certificate_fields("a.example", days=100))
    assert first.id < second.id < third.id
    assert (await store.change_marks()).latest_certificate_id == third.id
    assert await store.certificates_since(0) == [first, second, third]
    assert await store.certificates_since(first.id) == [second, third]
    assert await store.certificates_since(first.id, limit=1) == [second]
    assert await store.certificates_since(third.id) == []


async def test_pem_text_is_accepted_and_returned_as_bytes(store: Store) -> None:
    saved = await store.save_certificate(**_certificate_fields("t.example", key_pem="KEY", chain_pem="CHAIN"))
    assert (saved.key_pem, saved.chain_pem) == (b"KEY", b"CHAIN")


# --------------------------------------------------------------------------------------------
# Attempts and backoff


async def test_attempts_failures_and_reset(store: Store) -> None:
    assert await store.name_state("a.example") is None
    first = await store.start_attempt("a.example", DIRECTORY)
    (running,) = await store.attempts("a.example")
    assert (running.id, running.result, running.finished_at) == (first, "running", None)
    await store.finish_attempt(first, "failed", "urn:ietf:params:acme:error:dns", "NXDOMAIN looking up A")
    state = await store.name_state("a.example")
    assert state is not None
    assert (state.failures, state.last_error) == (1, "urn:ietf:params:acme:error:dns: NXDOMAIN looking up A")

    second = await store.start_attempt("a.example", DIRECTORY)
    await store.finish_attempt(second, "failed", None, "connection refused")
    await store.set_next_attempt("a.example", datetime(2030, 1, 1, tzinfo=UTC))
    state = await store.name_state("a.example")
    assert (state.failures, state.last_error) == (2, "connection refused")
    assert state.next_attempt_at == datetime(2030, 1, 1, tzinfo=UTC)

    third = await store.start_attempt("a.example", DIRECTORY)
    await store.finish_attempt(third, "failed", "urn:x:only-type")
    assert (await store.name_state("a.example")).last_error == "urn:x:only-type"

    fourth = await store.start_attempt("a.example", DIRECTORY)
    await store.finish_attempt(fourth, "valid")
    state = await store.name_state("a.example")
    assert (state.failures, state.last_error, state.next_attempt_at) == (0, None, None)

    history = await store.attempts("a.example")
    assert [a.id for a in history] == [fourth, third, second, first]
    assert [a.result for a in history] == ["valid", "failed", "failed", "failed"]
    assert history[-1].problem_type == "urn:ietf:params:acme:error:dns"
    assert history[-1].detail == "NXDOMAIN looking up A"
    assert all(a.finished_at is not None and a.finished_at >= a.started_at for a in history)
    assert [a.id for a in await store.attempts("a.example", limit=2)] == [fourth, third]
    assert await store.attempt_count("a.example") == 4
    assert await store.attempt_count("b.example") == 0


async def test_finish_attempt_guards(store: Store) -> None:
    attempt = await store.start_attempt("a.example", DIRECTORY)
    with pytest.raises(ValueError):
        await store.finish_attempt(attempt, "running")  # type: ignore[arg-type]
    await store.finish_attempt(attempt, "failed", None, "boom")
    with pytest.raises(StoreError, match="already finished"):
        await store.finish_attempt(attempt, "failed", None, "boom")
    with pytest.raises(StoreError, match="unknown"):
        await store.finish_attempt(987_654, "valid")
    assert (await store.name_state("a.example")).failures == 1  # the refused finishes counted nothing


async def test_set_next_attempt_creates_and_clears(store: Store) -> None:
    when = datetime(2026, 5, 5, 5, 5, tzinfo=UTC)
    await store.set_next_attempt("n.example", when)
    state = await store.name_state("n.example")
    assert (state.failures, state.next_attempt_at) == (0, when)
    await store.set_next_attempt("n.example", None)
    assert (await store.name_state("n.example")).next_attempt_at is None


# --------------------------------------------------------------------------------------------
# Leases


async def test_lease_lifecycle(store: Store) -> None:
    assert await store.try_lease("a.example", "one", 30)
    assert await store.try_lease("a.example", "one", 30)  # ours: extended
    assert not await store.try_lease("a.example", "two", 30)
    state = await store.name_state("a.example")
    assert state.lease_owner == "one"
    assert state.lease_until > datetime.now(UTC) + timedelta(seconds=20)
    assert not await store.release_lease("a.example", "two")
    assert await store.release_lease("a.example", "one")
    assert not await store.release_lease("a.example", "one")
    assert await store.try_lease("a.example", "two", 30)
    with pytest.raises(ValueError):
        await store.try_lease("a.example", "two", 0)


async def until_taken(take: Callable[[], Awaitable[bool]]) -> None:
    """Try ``take`` until it succeeds (a lease running out), within a bound a busy machine keeps."""
    deadline = asyncio.get_running_loop().time() + 30
    while not await take():
        assert asyncio.get_running_loop().time() < deadline, "the lease never ran out"
        await asyncio.sleep(0.05)


async def test_expired_lease_can_be_taken(store: Store) -> None:
    # Held for long enough that a busy machine cannot let it run out between the first checks;
    # then the holder shortens it to nothing (taking it again sets the new end).
    assert await store.try_lease("a.example", "one", 30)
    assert not await store.try_lease("a.example", "two", 30)
    assert await store.try_lease("a.example", "one", 0.05)
    await until_taken(lambda: store.try_lease("a.example", "two", 30))
    assert (await store.name_state("a.example")).lease_owner == "two"


async def test_job_leases_are_held_by_one_owner_and_leave_the_names_alone(store: Store, other_store: Store) -> None:
    """A job done once per database (renewals, the expiry watch) is leased like a name's
    order, on a row of its own: no name appears in the status index."""
    assert await store.try_job_lease("duties", "one", 30)
    assert await store.try_job_lease("duties", "one", 30)  # ours: extended
    assert not await other_store.try_job_lease("duties", "two", 30)
    holder = await other_store.job_lease("duties")
    assert holder is not None and holder[0] == "one"
    assert await store.try_job_lease("duties", "one", 0.05)  # ours: shortened to nothing
    await until_taken(lambda: other_store.try_job_lease("duties", "two", 30))  # an expired lease can be taken
    assert not await store.release_job_lease("duties", "one")
    assert await other_store.release_job_lease("duties", "two")
    assert await store.job_lease("duties") is None
    assert (await store.status_counts([], datetime.now(UTC))).total == 0
    with pytest.raises(ValueError):
        await store.try_job_lease("duties", "two", 0)


async def test_lease_keeps_backoff_state(store: Store) -> None:
    attempt = await store.start_attempt("a.example", DIRECTORY)
    await store.finish_attempt(attempt, "failed", None, "boom")
    assert await store.try_lease("a.example", "one", 30)
    state = await store.name_state("a.example")
    assert (state.failures, state.last_error, state.lease_owner) == (1, "boom", "one")


async def test_concurrent_leases_from_two_stores_have_one_winner(store: Store, other_store: Store) -> None:
    for round_ in range(25):
        name = f"race{round_}.example"
        results = await asyncio.gather(
            store.try_lease(name, "store-a", 30),
            other_store.try_lease(name, "store-b", 30),
            store.try_lease(name, "store-c", 30),
            other_store.try_lease(name, "store-d", 30),
        )
        assert sum(results) == 1, (name, results)
        winner = ["store-a", "store-b", "store-c", "store-d"][results.index(True)]
        assert (await store.name_state(name)).lease_owner == winner


async def test_concurrent_leases_from_several_processes_have_one_winner(store: Store, database_url: str) -> None:
    code = """
        import asyncio, sys
        from autocert._store import Store
        async def main():
            store = await Store.open(sys.argv[1])
            owner = sys.argv[2]
            won = [n for n in range(30) if await store.try_lease(f"p{n}.example", owner, 60)]
            print(" ".join(map(str, won)))
            await store.close()
        asyncio.run(main())
    """
    processes = [_run_python(code, database_url, f"proc-{i}") for i in range(4)]
    outputs = [await asyncio.to_thread(p.communicate, timeout=120) for p in processes]
    wins: list[int] = []
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        wins.extend(int(n) for n in out.split())
    assert sorted(wins) == list(range(30))  # every name leased exactly once


# --------------------------------------------------------------------------------------------
# http-01 challenges


async def test_challenges_are_shared_between_stores(store: Store, other_store: Store) -> None:
    assert await store.get_challenge("tok") is None
    await store.put_challenge("tok", "a.example", "tok.thumb1")
    assert await other_store.get_challenge("tok") == "tok.thumb1"
    await store.put_challenge("tok", "a.example", "tok.thumb2")
    assert await other_store.get_challenge("tok") == "tok.thumb2"
    await other_store.delete_challenge("tok")
    assert await store.get_challenge("tok") is None
    await store.delete_challenge("tok")  # deleting twice is fine


async def test_purge_challenges(store: Store) -> None:
    await store.put_challenge("old", "a.example", "old.k")
    assert await store.purge_challenges(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert await store.purge_challenges(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await store.get_challenge("old") is None


# --------------------------------------------------------------------------------------------
# Status


async def test_status_names(store: Store) -> None:
    assert await store.status_names() == []
    await store.allow(["allowed.example", "*.pattern.example"])
    await store.save_certificate(**_certificate_fields("cert.example"))
    await store.start_attempt("attempt.example", DIRECTORY)
    await store.set_next_attempt("state.example", None)
    await store.try_lease("lease.example", "me", 30)
    await store.save_certificate(**_certificate_fields("allowed.example"))
    assert await store.status_names() == [
        "allowed.example",
        "attempt.example",
        "cert.example",
        "lease.example",
        "state.example",
    ]
    assert await store.status_names(["z.example", "a.example", "z.example"]) == ["z.example", "a.example"]
    assert await store.status_names([]) == []
    await store.disallow(["allowed.example"])
    assert "allowed.example" in await store.status_names()  # its certificate keeps it known



async def test_attempts_a_killed_process_left_running_are_closed_as_interrupted(store: Store) -> None:
    killed = await store.start_attempt("killed.example", "https://ca.example/dir")
    live = await store.start_attempt("live.example", "https://ca.example/dir")
    assert await store.try_lease("live.example", "host:1:live", 300)  # a live order holds its lease
    lapsed = await store.start_attempt("lapsed.example", "https://ca.example/dir")
    assert await store.try_lease("lapsed.example", "host:2:gone", 0.001)
    await asyncio.sleep(0.01)
    assert await store.close_abandoned_attempts() == 2
    results = {attempt.id: (attempt.result, attempt.detail) for name in ("killed.example", "live.example", "lapsed.example")
               for attempt in await store.attempts(name)}
    assert results == {killed: ("failed", "interrupted"), live: ("running", None), lapsed: ("failed", "interrupted")}
    assert (await store.name_state("killed.example")) is None, "a kill is not a CA failure: no backoff"
    assert await store.close_abandoned_attempts() == 0
