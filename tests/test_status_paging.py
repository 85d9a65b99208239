"""The status page, ``/status.json`` and ``autocert status`` over a few thousand names: pages and
their links in a real browser, the search box, the streamed JSON and its cursors, the streamed
table, and bad parameters.

The names are stored the way the benchmarks store 100,000 (``bench/fixtures.py``: one
certificate saved through the store, its rows cloned in SQL), plus a few that failed, expired
or expire soon, saved through the store's API.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support import REPO, free_port, run_cli

import autocert
from autocert._status import parse_query, status_chunks, status_report
from autocert._store import Store
from autocert.web import status_app

NAMES = 2500
DIRECTORY = "https://acme.example/directory"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _bench_fixtures() -> Any:
    spec = importlib.util.spec_from_file_location("bench_fixtures", REPO / "bench" / "fixtures.py")
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _add_trouble(url: str) -> None:
    """Names that need attention, so that the first page is not all alike."""
    store = await Store.open(url)
    try:
        now = dt.datetime.now(dt.UTC)
        await store.allow(["*.tenants.example", "api.shop.example", "www.shop.example", "old.example"])
        for minutes, (name, problem) in enumerate([("api.shop.example", "connection"), ("blog.tenants.example", "dns"), ("shop.tenants.example", "unauthorized")]):
            attempt = await store.start_attempt(name, DIRECTORY)
            await store.finish_attempt(attempt, "failed", f"urn:ietf:params:acme:error:{problem}", f"{name}: no valid answer")
            await store.set_next_attempt(name, now + dt.timedelta(minutes=5 + minutes))
        for name, age in (("www.shop.example", 86), ("old.example", 92)):
            start = now - dt.timedelta(days=age)
            await store.save_certificate(
                name=name, names=[name], key_pem=b"key", chain_pem=b"chain", serial="4a3f", issuer="CN=R11,O=Let's Encrypt,C=US",
                not_before=start, not_after=start + dt.timedelta(days=90), renew_at=start + dt.timedelta(days=60), directory=DIRECTORY,
            )
    finally:
        await store.close()


@pytest.fixture(scope="module")
def fleet_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    fixtures = _bench_fixtures()
    path = tmp_path_factory.mktemp("paging") / "autocert.db"
    url = fixtures.build_database(path, NAMES, fixtures.make_chain(), DIRECTORY)
    asyncio.run(_add_trouble(url))
    yield url


@pytest.fixture
async def served(fleet_db: str) -> AsyncIterator[tuple[str, autocert.Manager]]:
    """The status app on a real port, as ``serve``'s admin listener runs it."""
    manager = autocert.Manager(db=fleet_db, directory=DIRECTORY, renew=False)
    await manager.start()
    runner = web.AppRunner(status_app(manager))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/", manager
    finally:
        await runner.cleanup()
        await manager.stop()


async def _chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    process = await asyncio.create_subprocess_exec(
        str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()[-2000:]
    return out.decode()


def _names(page: str) -> list[str]:
    return re.findall(r'<tr class="[^"]*" data-name="([^"]+)"', page)


def _link(page: str, rel: str) -> str | None:
    found = re.search(rf'<a rel="{rel}" href="([^"]+)"', page)
    return found.group(1).replace("&amp;", "&") if found else None


async def _expected(url: str, sort: str, limit: int, **filters: Any) -> list[str]:
    store = await Store.open(url)
    try:
        chunks = status_chunks(store, parse_query(sort=sort, **filters), directory=DIRECTORY, limit=limit)
        return [item["name"] async for chunk in chunks for item in chunk]
    finally:
        await store.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_pages_and_search_in_a_browser(served: tuple[str, autocert.Manager], fleet_db: str, tmp_path: Path) -> None:
    base, _manager = served
    first = await _chromium(tmp_path, "--dump-dom", base)
    assert "<script" not in first
    expected = await _expected(fleet_db, "attention", 300)
    assert _names(first) == expected[:100], "the first page: the names that need attention first"
    assert expected[:3] == ["api.shop.example", "blog.tenants.example", "shop.tenants.example"]
    assert _link(first, "prev") is None
    assert "100 shown of 2505" in first

    second = await _chromium(tmp_path, "--dump-dom", base + _link(first, "next"))
    third = await _chromium(tmp_path, "--dump-dom", base + _link(second, "next"))
    assert _names(second) + _names(third) == expected[100:300], "next leads on, in order, without gaps or repeats"
    back = await _chromium(tmp_path, "--dump-dom", base + _link(third, "prev"))
    assert _names(back) == _names(second), "previous leads back"

    # The search box is a plain GET form: what a submitted search asks for is ?q=...
    assert re.search(r'<form class="search" method="get" action=""[^>]*>\s*<input type="search" name="q"', first)
    found = await _chromium(tmp_path, "--dump-dom", base + "?q=N12&sort=name")
    names = _names(found)
    assert names == await _expected(fleet_db, "name", 100, prefix="n12")
    assert len(names) == 100 and all(name.startswith("n12") for name in names)
    assert 'value="n12"' in found and '<input type="hidden" name="sort" value="name">' in found, "the form keeps the sort"
    rest = await _chromium(tmp_path, "--dump-dom", base + _link(found, "next"))
    assert [name for name in _names(rest)] == (await _expected(fleet_db, "name", 200, prefix="n12"))[100:]
    assert _link(rest, "next") is None, "111 names start with n12: two pages"
    nothing = await _chromium(tmp_path, "--dump-dom", base + "?q=zzz")
    assert _names(nothing) == [] and "No name starts with “zzz”." in nothing

    shot = tmp_path / "status-page-paging.png"
    await _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,820", base + _link(first, "next"))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1400, 820)
    if os.environ.get("AUTOCERT_UPDATE_SCREENSHOTS"):
        shutil.copyfile(shot, REPO / "docs" / "status-page-paging.png")


async def test_status_json_streams_everything_and_pages_with_cursors(served: tuple[str, autocert.Manager], fleet_db: str) -> None:
    _base, manager = served
    async with TestClient(TestServer(status_app(manager))) as client:
        response = await client.get("/status.json")
        assert response.status == 200 and response.headers["Content-Type"].startswith("application/json")
        assert response.headers.get("Transfer-Encoding") == "chunked", "streamed, not built whole"
        full = json.loads(await response.text())
        store = await Store.open(fleet_db)
        try:
            report = await status_report(store, directory=DIRECTORY)
        finally:
            await store.close()
        assert list(full) == ["certificates"] and full["certificates"] == report
        assert len(report) == NAMES + 5

        for query, expected in (("", report), ("&state=failed&state=expired", [i for i in report if i["state"] in ("failed", "expired")]),
                                ("&q=n2", [i for i in report if i["name"].startswith("n2")])):
            pages, cursor = [], ""
            while True:
                page = await (await client.get(f"/status.json?limit=700{query}{cursor}")).json()
                pages.append(page["certificates"])
                if page["next"] is None:
                    break
                cursor = f"&cursor={page['next']}"
            assert [item for page in pages for item in page] == expected, query
            assert all(len(page) == 700 for page in pages[:-1])

        sorted_by_expiry = await (await client.get("/status.json?sort=expires&limit=3")).json()
        assert [item["name"] for item in sorted_by_expiry["certificates"]] == ["old.example", "www.shop.example", "n0.bench.test"]
        for bad, parameter in (("state=bogus", "state"), ("limit=0", "limit"), ("limit=x", "limit"), ("sort=colour", "sort"),
                               ("cursor=bm9wZQ", "cursor"), ("expiring=yes", "expiring")):
            response = await client.get(f"/status.json?{bad}")
            assert response.status == 400 and (await response.text()).startswith(f"{parameter}: "), bad
        assert (await client.get("/?state=failed&state=expired")).status == 400, "the page shows one state at a time"


def test_status_command_streams_an_aligned_table_and_filters(fleet_db: str) -> None:
    table = run_cli("status", db=fleet_db)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert len(lines) == NAMES + 5
    state = header.index("STATE")
    assert all(line[state - 2 : state] == "  " and line[state] != " " for line in lines), "one column for the state, on every line"
    assert lines[0].startswith("api.shop.example ") and sorted(line.split()[0] for line in lines) == [line.split()[0] for line in lines]

    failed = run_cli("status", "--state", "failed", "--state", "expired", "--json", db=fleet_db)
    assert failed.returncode == 0, failed.stderr
    assert [(i["name"], i["state"]) for i in json.loads(failed.stdout)["certificates"]] == [
        ("api.shop.example", "failed"), ("blog.tenants.example", "failed"), ("old.example", "expired"), ("shop.tenants.example", "failed"),
    ]
    limited = run_cli("status", "--limit", "5", db=fleet_db)
    assert limited.returncode == 0 and len(limited.stdout.splitlines()) == 6
    named = run_cli("status", "old.example", "nope.example", "--json", db=fleet_db)
    assert [i["state"] for i in json.loads(named.stdout)["certificates"]] == ["expired", "disallowed"]

    for args, option in ((["--state", "bogus"], "--state"), (["--limit", "0"], "--limit"), (["--limit", "many"], "--limit")):
        result = run_cli("status", *args, db=fleet_db)
        assert result.returncode == 2 and result.stdout == "", args
        assert len(result.stderr.strip().splitlines()) == 1 and option in result.stderr, result.stderr
