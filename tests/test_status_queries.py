"""The status queries against the rules, on SQLite and PostgreSQL.

A few hundred names are stored through the store's own API, one for every mix of the facts the
state rules read (allowed exactly, by a pattern, or not; no certificate, a valid one, one
expiring soon by either reason, an expired one, a revoked one; failures; a lease held or run
out; an order in flight in this process), then cloned in SQL into a few thousand. The report
is then computed the old way, from every table, with the rules of ``autocert._policy`` applied
in Python, and every filter, sort, count, cursor and stream must give exactly that.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import String, Table, cast, insert, literal, select, text, true, union

from conftest import POSTGRES_SKIP_REASON, POSTGRES_URL_ENV, _plain_postgres_dsn, _postgres_execute
from support import cli_env

from autocert._listing import open_listing
from autocert._models import Base
from autocert._policy import SEVERITY, STATES, expires_soon, is_allowed, lease_held, name_status, needs_attention
from autocert._status import (
    QueryError,
    StatusQuery,
    parse_query,
    status_chunks,
    status_counts,
    status_page,
    status_report,
)
from autocert._store import Store
from autocert._timefmt import isoformat, utcnow

DIRECTORY = "https://acme.example/directory"
OTHER_ISSUER = "CN=Other CA,O=Elsewhere"
CLONES = 16

ALLOW = ("exact", "pattern", "none")
CERTIFICATES = ("none", "live", "week", "overdue", "expired", "revoked", "short")
FAILURES = (0, 1, 3)
LEASES = ("none", "held", "lapsed")


def _base(allow: str) -> str:
    return {"exact": "x.example", "pattern": "p.example", "none": "z.example"}[allow]


async def _store_name(store: Store, name: str, certificate: str, failures: int, lease: str, index: int, now: datetime) -> None:
    day = timedelta(days=1)
    issuer = OTHER_ISSUER if index % 5 == 0 else "CN=Test CA"
    times = {
        "live": (now - 10 * day, now + 80 * day, now + 50 * day),
        "week": (now - 83 * day, now + 3 * day, now + 2 * day),  # under a week left, renewal not yet due
        "overdue": (now - 70 * day, now + 20 * day, now - 2 * day),  # renewal overdue: is_expiring
        "expired": (now - 92 * day, now - 2 * day, now - 32 * day),
        "revoked": (now - 10 * day, now + 80 * day, now + 50 * day),
        "short": (now - 5 * day, now + day + timedelta(microseconds=index), now - timedelta(hours=2)),
    }.get(certificate)
    if times is not None:
        not_before, not_after, renew_at = times
        saved = await store.save_certificate(
            name=name, names=[name], key_pem=b"key", chain_pem=b"chain", serial=f"{index:x}", issuer=issuer,
            not_before=not_before, not_after=not_after, renew_at=renew_at, directory=DIRECTORY,
        )
        if certificate == "revoked":
            await store.mark_revoked(saved.id)
        if index % 4 == 0 and certificate != "revoked":  # an older certificate that is not current
            await store.save_certificate(
                name=name, names=[name], key_pem=b"key", chain_pem=b"chain", serial="old", issuer="CN=Old CA",
                not_before=not_before - 30 * day, not_after=not_after - 30 * day, renew_at=renew_at - 30 * day, directory=DIRECTORY,
            )
    for _ in range(failures):
        attempt = await store.start_attempt(name, DIRECTORY)
        await store.finish_attempt(attempt, "failed", "urn:ietf:params:acme:error:connection", f"no answer from {name}")
    if failures:
        await store.set_next_attempt(name, now + timedelta(minutes=index))
    elif index % 3 == 0:
        attempt = await store.start_attempt(name, DIRECTORY)
        await store.finish_attempt(attempt, "valid")
    if lease == "held":
        assert await store.try_lease(name, "someone", 600)
    elif lease == "lapsed":
        assert await store.try_lease(name, "someone", 0.001)


async def _populate(store: Store, now: datetime) -> set[str]:
    """One name per mix of facts; returns the names said to be in flight in this process."""
    await store.allow(["*.p.example"])
    in_flight: set[str] = set()
    mixes = itertools.product(ALLOW, CERTIFICATES, FAILURES, LEASES)
    for index, (allow, certificate, failures, lease) in enumerate(mixes):
        name = f"n{index}-{certificate}.{_base(allow)}"
        if allow == "exact":
            await store.allow([name])
        if allow != "none" or certificate != "none" or failures or lease != "none":
            await _store_name(store, name, certificate, failures, lease, index, now)
        if index % 7 == 3:
            in_flight.add(name)
    await store.allow(["pending-only.x.example"])
    in_flight.add("never-stored.p.example")  # in flight before anything was written for it
    return in_flight


async def _clone(store: Store, copies: int) -> None:
    """Every stored row again ``copies`` times under new names (``cK-`` before the first
    label, so a pattern still covers what it covered), in a few SQL statements."""
    tables = {table.name: table for table in Base.metadata.sorted_tables}
    seq = select(literal(1).label("k")).cte("seq", recursive=True)
    seq = seq.union_all(select((seq.c.k + 1).label("k")).where(seq.c.k < copies))
    prefix = literal("c") + cast(seq.c.k, String(10)) + literal("-")

    def copy(table: Table, key: str, *, skip: tuple[str, ...] = (), where: Any = None) -> Any:
        columns = [column for column in table.c if column.name not in skip]
        values = [(prefix + column).label(column.name) if column.name == key else column for column in columns]
        source = select(*values).select_from(table.join(seq, true()))
        if where is not None:
            source = source.where(where)
        return insert(table).from_select([column.name for column in columns], source)

    async with store._writing() as session:
        allowed = tables["allowed"]
        await session.execute(copy(allowed, "entry", where=~allowed.c.entry.startswith("*.")))
        await session.execute(copy(tables["certificates"], "name", skip=("id",)))
        await session.execute(copy(tables["attempts"], "name", skip=("id",)))
        await session.execute(copy(tables["name_states"], "name"))
    await store.rebuild_names()


# -- the old report: every table read, the rules applied in Python ---------------------------------


async def _reference(store: Store, in_flight: set[str], now: datetime) -> list[dict[str, Any]]:
    tables = {table.name: table for table in Base.metadata.sorted_tables}
    known = union(
        select(tables["allowed"].c.entry).where(~tables["allowed"].c.entry.startswith("*.")),
        select(tables["certificates"].c.name), select(tables["attempts"].c.name), select(tables["name_states"].c.name),
    )
    async with store._reading() as session:
        names = sorted((await session.execute(known)).scalars())
    entries = await store.allowed_entries()
    certificates = {cert.name: cert for cert in await store.current_certificates()}
    states = await store.name_states(names)
    attempts = await store.attempt_counts(names)
    report = []
    for name in names:
        certificate, state_row = certificates.get(name), states.get(name)
        ordering = name in in_flight or (state_row is not None and lease_held(state_row.lease_owner, state_row.lease_until, now))
        allowed = is_allowed(name, entries)
        state = name_status(allowed=allowed, not_after=certificate.not_after if certificate else None, ordering=ordering,
                            failures=state_row.failures if state_row else 0, now=now)
        soon = bool(certificate and state != "disallowed" and expires_soon(certificate.not_before, certificate.not_after, certificate.renew_at, now))
        report.append({
            "item": {
                "name": name, "state": state,
                "not_before": isoformat(certificate.not_before) if certificate else None,
                "not_after": isoformat(certificate.not_after) if certificate else None,
                "renew_at": isoformat(certificate.renew_at) if certificate else None,
                "serial": certificate.serial if certificate else None, "issuer": certificate.issuer if certificate else None,
                "directory": certificate.directory if certificate else DIRECTORY, "ca": certificate.directory if certificate else None,
                "attempts": attempts.get(name, 0),
                "last_error": state_row.last_error if state_row else None,
                "next_attempt_at": isoformat(state_row.next_attempt_at) if state_row else None,
            },
            "soon": soon,
            "failing": bool(state_row and state_row.failures > 0),
            "expired": bool(certificate and certificate.not_after <= now),
            "not_after": certificate.not_after if certificate else None,
            "renew_at": certificate.renew_at if certificate else None,
            "next_attempt_at": state_row.next_attempt_at if state_row else None,
        })
    return report


_LAST = datetime.max.replace(tzinfo=UTC)


def _time(value: datetime | None) -> tuple[bool, datetime]:
    return (value is None, value or _LAST)


SORT_KEYS = {  # the status page's sorts as they were written over the whole report
    "attention": lambda r: (not needs_attention(r["item"]["state"], r["soon"]), SEVERITY[r["item"]["state"]], _time(r["not_after"]), r["item"]["name"]),
    "name": lambda r: r["item"]["name"],
    "state": lambda r: (SEVERITY[r["item"]["state"]], r["item"]["name"]),
    "expires": lambda r: (_time(r["not_after"]), r["item"]["name"]),
    "renew": lambda r: (_time(r["renew_at"]), r["item"]["name"]),
    "attempts": lambda r: (r["item"]["attempts"], r["item"]["name"]),
    "next": lambda r: (_time(r["next_attempt_at"]), r["item"]["name"]),
}


def _expected(reference: list[dict[str, Any]], query: StatusQuery) -> list[dict[str, Any]]:
    chosen = [
        r for r in reference
        if (not query.states or r["item"]["state"] in query.states) and (not query.failing or r["failing"])
        and (not query.expiring or r["soon"]) and (not query.expired or r["expired"])
        and (query.prefix is None or r["item"]["name"].startswith(query.prefix))
        and (query.issuer is None or r["item"]["issuer"] == query.issuer)
    ]
    chosen.sort(key=SORT_KEYS[query.sort.removeprefix("-")], reverse=query.sort.startswith("-"))
    return [r["item"] for r in chosen]


async def _build_fleet(url: str) -> tuple[list[dict[str, Any]], set[str], datetime]:
    store = await Store.open(url)
    try:
        in_flight = await _populate(store, utcnow())
        await _clone(store, CLONES)
        now = utcnow()
        return await _reference(store, in_flight, now), in_flight, now
    finally:
        await store.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """One database of a few thousand names per backend for the whole module (building it is
    the slow part), with its report computed the old way; tests only read it."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('fleet') / 'fleet.db'}"
        yield url, asyncio.run(_build_fleet(url))
        return
    base = os.environ.get(POSTGRES_URL_ENV)
    if not base:
        pytest.skip(POSTGRES_SKIP_REASON)
    scratch = f"autocert_fleet_{os.getpid()}_{secrets.token_hex(4)}"
    admin = _plain_postgres_dsn(base)
    asyncio.run(_postgres_execute(admin, f'CREATE DATABASE "{scratch}"'))
    try:
        url = _plain_postgres_dsn(base, scratch)
        yield url, asyncio.run(_build_fleet(url))
    finally:
        asyncio.run(_postgres_execute(admin, f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)'))


@pytest.fixture
async def fleet(fleet_database: tuple[str, Any]) -> AsyncIterator[tuple[Store, list[dict[str, Any]], set[str], datetime]]:
    url, (reference, in_flight, now) = fleet_database
    store = await Store.open(url)
    try:
        yield store, reference, in_flight, now
    finally:
        await store.close()


QUERIES = [
    parse_query(),
    *(parse_query(states=[state], sort="attention") for state in STATES),
    parse_query(states=["failed", "expired"], sort="-expires"),
    parse_query(failing=True, sort="next"),
    parse_query(expiring=True, sort="attention"),
    parse_query(expired=True, sort="-state"),
    parse_query(prefix="c7-n1", sort="attention"),
    parse_query(prefix="n2", states=["valid"], sort="renew"),
    parse_query(issuer=OTHER_ISSUER, sort="name"),
    parse_query(issuer=OTHER_ISSUER, sort="-attention", failing=True),
    *(parse_query(sort=sort) for sort in ("attention", "-attention", "state", "expires", "-renew", "attempts", "-attempts", "next", "-next", "-name")),
]


async def test_every_filter_and_sort_pages_through_exactly_the_report(fleet: Any) -> None:
    store, reference, in_flight, now = fleet
    assert len(reference) > 3000
    assert await status_report(store, directory=DIRECTORY, in_flight=in_flight, now=now) == [r["item"] for r in reference]
    for query in QUERIES:
        expected = _expected(reference, query)
        for limit in (97, 1000):
            pages, cursor = [], None
            while True:
                page = await status_page(store, query, directory=DIRECTORY, limit=limit, cursor=cursor, in_flight=in_flight, now=now)
                pages.append(page)
                if page.next is None:
                    break
                cursor = page.next
            assert [item for page in pages for item in page.items] == expected, (query, limit)
            assert all(len(page.items) == limit for page in pages[:-1])
            # And back again from the last page, with the cursors the pages handed out.
            backwards, cursor = [], pages[-1].previous
            while cursor is not None:
                page = await status_page(store, query, directory=DIRECTORY, limit=limit, cursor=cursor, in_flight=in_flight, now=now)
                backwards[:0] = page.items
                cursor = page.previous
            assert backwards + pages[-1].items == expected, (query, limit)
        streamed = [item async for chunk in status_chunks(store, query, directory=DIRECTORY, in_flight=in_flight, now=now, chunk=250)
                    for item in chunk]
        assert streamed == expected, query


async def test_counts_are_the_rules_counted(fleet: Any) -> None:
    store, reference, in_flight, now = fleet
    counts = await status_counts(store, in_flight=in_flight, now=now)
    states = Counter(r["item"]["state"] for r in reference)
    assert counts.total == len(reference)
    assert counts.states == {state: states.get(state, 0) for state in STATES}
    assert all(states[state] for state in STATES), "the data covers every state"
    assert counts.soon == sum(r["soon"] for r in reference) > 0
    assert counts.attention == sum(needs_attention(r["item"]["state"], r["soon"]) for r in reference)
    allowed = [r for r in reference if r["item"]["state"] != "disallowed" and r["not_after"] is not None]
    soonest = min(allowed, key=lambda r: (r["not_after"], r["item"]["name"]))
    assert counts.soonest == (soonest["item"]["name"], soonest["not_after"])


async def test_named_names_and_unknown_ones(fleet: Any) -> None:
    store, reference, in_flight, now = fleet
    wanted = [reference[5]["item"]["name"], "unknown.p.example", "unknown.elsewhere.example", reference[1]["item"]["name"], "never-stored.p.example"]
    items = await status_report(store, directory=DIRECTORY, names=wanted, in_flight=in_flight, now=now)
    assert [item["name"] for item in items] == wanted
    assert items[0] == reference[5]["item"] and items[3] == reference[1]["item"]
    assert [item["state"] for item in items[1:3]] == ["pending", "disallowed"], "a pattern allows a name never seen"
    assert items[4]["state"] == "issuing"


async def test_a_limited_stream_stops_at_the_limit(fleet: Any) -> None:
    store, reference, in_flight, now = fleet
    query = parse_query(sort="attention")
    chunks = [chunk async for chunk in status_chunks(store, query, directory=DIRECTORY, in_flight=in_flight, now=now, chunk=40, limit=101)]
    assert [len(chunk) for chunk in chunks] == [40, 40, 21]
    assert [item for chunk in chunks for item in chunk] == _expected(reference, query)[:101]


async def test_bad_queries_name_the_parameter(fleet: Any) -> None:
    store, _reference, _in_flight, now = fleet
    assert parse_query(prefix=" Bücher.Example. ").prefix == "xn--bcher-kva.example", "a whole Unicode name is searched as stored"
    for arguments, parameter in (({"states": ["bogus"]}, "state"), ({"sort": "colour"}, "sort"), ({"prefix": "bü ch"}, "q")):
        with pytest.raises(QueryError) as raised:
            parse_query(**arguments)
        assert raised.value.parameter == parameter
    page = await status_page(store, parse_query(sort="expires"), directory=DIRECTORY, limit=10, now=now)
    for cursor in ("garbage", page.next[:-3], page.next.replace("A", "B", 1)):
        with pytest.raises(QueryError) as raised:
            await status_page(store, parse_query(sort="name"), directory=DIRECTORY, limit=10, cursor=cursor, now=now)
        assert raised.value.parameter == "cursor"


# -- the listing read without SQLAlchemy (autocert status) ---------------------------------------------


async def test_the_listing_read_without_sqlalchemy_is_the_stores(fleet_database: tuple[str, Any]) -> None:
    """``autocert status`` reads through the driver alone; for every state filter and limit it
    must give the chunks the store gives, names being ordered (held leases) included."""
    url, (reference, _in_flight, now) = fleet_database
    store = await Store.open(url)
    listing = await open_listing(url)
    assert listing is not None, "a database at the current schema is read directly"
    try:
        seen = 0
        for query in [parse_query(), *(parse_query(states=[state]) for state in STATES), parse_query(states=["failed", "expired", "issuing"])]:
            for limit in (None, 1, 97):
                expected = [chunk async for chunk in status_chunks(store, query, directory=DIRECTORY, now=now, chunk=250, limit=limit)]
                got = [chunk async for chunk in listing.chunks(query, directory=DIRECTORY, now=now, chunk=250, limit=limit)]
                assert got == expected, (query, limit)
                if limit is None and len(query.states) == 1:
                    assert expected, f"the fleet has {query.states} names"
                    seen += sum(map(len, expected))
        assert seen == len(reference)
        assert await listing.widths() == await store.status_widths()
        wanted = [reference[5]["item"]["name"], "unknown.p.example", "unknown.elsewhere.example", reference[1]["item"]["name"],
                  "pending-only.x.example", reference[5]["item"]["name"], *(r["item"]["name"] for r in reference[::5])]
        named = await listing.named(wanted, directory=DIRECTORY, now=now)
        assert named == await status_report(store, directory=DIRECTORY, names=wanted, now=now)
        assert [item["state"] for item in named[1:3]] == ["pending", "disallowed"], "a pattern allows a name never seen"
        assert len(wanted) > 500, "more names than one query binds"
    finally:
        await listing.close()
        await store.close()


def test_status_prints_the_listing_without_importing_sqlalchemy(fleet_database: tuple[str, Any]) -> None:
    url, (_reference, _in_flight, _now) = fleet_database
    code = ("import sys; from autocert._cli import run; status = run(sys.argv[1:]); sys.stdout.flush(); "
            "assert not [m for m in sys.modules if m.startswith('sqlalchemy')], 'SQLAlchemy was imported'; sys.exit(status)")
    argv = [sys.executable, "-c", code, "--db", url, "status", "--state", "failed", "--state", "pending", "--json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=cli_env({"AUTOCERT_DIRECTORY": DIRECTORY}))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)["certificates"]
    assert printed and {item["state"] for item in printed} == {"failed", "pending"}
    expected = asyncio.run(_all_chunks(url, parse_query(states=["failed", "pending"])))
    # The CLI reads the clock itself: only a state at a boundary could differ, and none is near one.
    assert printed == expected


async def _all_chunks(url: str, query: StatusQuery) -> list[dict[str, Any]]:
    async with await Store.open(url) as store:
        return [item async for chunk in status_chunks(store, query, directory=DIRECTORY) for item in chunk]


async def test_the_listing_leaves_to_the_store_what_it_does_not_read(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    assert await open_listing(f"sqlite:///{missing}") is None
    assert not missing.exists(), "only the store creates the file, owner-only"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    assert await open_listing(f"sqlite:///{garbage}") is None
    older = tmp_path / "older.db"
    store = await Store.open(f"sqlite:///{older}")
    await store.close()
    listing = await open_listing(f"sqlite:///{older}")
    assert listing is not None
    await listing.close()
    with sqlite3.connect(older) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0001'")
    assert await open_listing(f"sqlite:///{older}") is None, "a schema to migrate is the store's to migrate"
    for url in (f"sqlite:///{older}?mode=ro", "sqlite://", "sqlite:///:memory:", "mysql://u@h/db", "postgresql://postgres@127.0.0.1:1/test"):
        assert await open_listing(url) is None, url


# -- the index itself ---------------------------------------------------------------------------------


async def _index_rows(store: Store) -> list[tuple[Any, ...]]:
    names = Base.metadata.tables["names"]
    async with store._reading() as session:
        return [tuple(row) for row in (await session.execute(select(names).order_by(names.c.name))).all()]


async def test_every_write_keeps_the_index_what_a_rebuild_makes(database_url: str) -> None:
    store = await Store.open(database_url)
    try:
        now = utcnow()
        await _populate(store, now)
        kept = await _index_rows(store)
        assert len(kept) > 150
        assert await store.rebuild_names() == len(kept)
        assert await _index_rows(store) == kept

        # The writes that move a name between states, each checked against a rebuild.
        live, week = "n9-live.x.example", "n18-week.x.example"
        certificate = await store.current_certificate(live)
        renewing = await store.current_certificate(week)
        steps = [
            lambda: store.disallow(["pending-only.x.example", "n0-none.x.example", live, "*.p.example"]),
            lambda: store.allow(["*.p.example", live, "new.x.example"]),
            lambda: store.disallow(["*.p.example"]),
            lambda: store.mark_revoked(certificate.id),
            lambda: store.set_renewal(renewing.id, renew_at=now - timedelta(days=9), ari_next_check_at=None),
            lambda: store.set_next_attempt("fresh.z.example", None),
            lambda: store.save_pending_order("order.z.example", DIRECTORY, "https://o/1", b"key"),
            lambda: store.release_lease("n1-none.x.example", "someone"),
            lambda: store.allow(["*.wild.example"], wildcard=True),  # a wildcard pattern is a name of its own
            lambda: store.allow(["*.x.example"], wildcard=True),  # so is a pattern made one
            lambda: store.disallow(["*.wild.example"]),
            lambda: store.record_asked("asked.q.example"),  # allowed by the ask endpoint
            lambda: store.allow(["*.q.example"]),
            lambda: store.disallow(["*.q.example"]),  # still allowed: the endpoint said so
        ]
        for step in steps:
            await step()
            kept = await _index_rows(store)
            await store.rebuild_names()
            assert await _index_rows(store) == kept
        names = {row[0] for row in kept}
        assert "pending-only.x.example" not in names, "an entry without history leaves with its entry"
        assert "n0-none.x.example" in names, "one with history stays"
        assert {live, "new.x.example", "fresh.z.example", "order.z.example", "*.x.example"} <= names
        assert "*.wild.example" not in names and "*.p.example" not in names
        allowed = {row[0]: row[2] for row in kept}  # name, listed, allowed, ...
        assert allowed["asked.q.example"], "allowed by the endpoint, off the allowlist"
        assert await store.forget_asked("asked.q.example") and not await store.forget_asked("asked.q.example")
        assert "asked.q.example" not in {row[0] for row in await _index_rows(store)}, "refused again with no history: unknown"
        kept = await _index_rows(store)
        await store.rebuild_names()
        assert await _index_rows(store) == kept
    finally:
        await store.close()


async def test_a_database_from_before_the_index_gets_it_filled(database_url: str) -> None:
    store = await Store.open(database_url)
    try:
        await _populate(store, utcnow())
        kept = await _index_rows(store)
        async with store._writing() as session:  # back to the schema before the index, keeping the data
            await session.execute(text("UPDATE alembic_version SET version_num = '0007'"))
            await session.execute(text("DROP TABLE names"))
            await session.execute(text("DROP INDEX ix_name_states_lease_until"))
            await session.execute(text("DROP TABLE asked_names"))  # and before 0012's asked names
            await session.execute(text("DROP TABLE leases"))  # and before 0011's job leases
            await session.execute(text("DROP TABLE dns_records"))  # and before 0010's wildcards
            await session.execute(text("ALTER TABLE allowed DROP COLUMN wildcard"))
            await session.execute(text("DROP TABLE cap_claims"))  # and before 0009's shared challenges
            await session.execute(text("DROP INDEX ix_challenges_name"))
            await session.execute(text("ALTER TABLE challenges DROP COLUMN challenge_type"))
    finally:
        await store.close()
    reopened = await Store.open(database_url)
    try:
        assert await _index_rows(reopened) == kept
    finally:
        await reopened.close()


async def test_concurrent_pattern_and_first_attempt_agree(database_url: str) -> None:
    """A name first seen while its pattern is being allowed ends up allowed either way."""
    stores = [await Store.open(database_url) for _ in range(2)]
    try:
        for round_ in range(8):
            pattern, name = f"*.r{round_}.example", f"a.r{round_}.example"
            await asyncio.gather(stores[0].allow([pattern]), stores[1].start_attempt(name, DIRECTORY))
            (row,) = await stores[0].name_statuses([name])
            assert row.allowed and row.attempts == 1
    finally:
        for store in stores:
            await store.close()
