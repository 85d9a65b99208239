"""``Manager.route``: the one decision behind the embedded ``sni_callback`` and serve's front."""

from __future__ import annotations

import asyncio
import logging
import ssl
from datetime import timedelta
from pathlib import Path

import pytest

from autocert import Manager
from autocert._manager import Route
from autocert._timefmt import utcnow


async def test_one_decision_for_every_handshake(tmp_path: Path) -> None:
    manager = Manager(db=f"sqlite:///{tmp_path / 'route.db'}", directory="https://127.0.0.1:9/dir", renew=False)
    assert manager.route("shop.example.test")[0] is Route.REFUSE, "nothing is served before start()"
    async with manager:
        await manager.allow("shop.example.test", "*.tenants.example.test")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        manager.cache.put("shop.example.test", context, 1)

        assert manager.route("shop.example.test") == (Route.SERVE, "shop.example.test", context)
        assert manager.route("SHOP.Example.Test.") == (Route.SERVE, "shop.example.test", context), "one normal form on every path"
        assert manager.route("a.tenants.example.test") == (Route.LOAD, "a.tenants.example.test", None)
        assert manager.route("unknown.example.test")[0] is Route.REFUSE
        assert manager.route("a.b.tenants.example.test")[0] is Route.REFUSE, "a pattern covers one label"
        assert manager.route(None)[0] is Route.REFUSE, "no SNI and no default name"
        assert manager.route("shop.example.test", ("acme-tls/1",)) == (Route.CHALLENGE, "shop.example.test", None)
        assert dict(manager.handshakes) == {"served": 2, "unknown_name": 4, "challenge": 1}


async def test_an_address_is_routed_by_where_the_client_connected(tmp_path: Path) -> None:
    """No SNI: the local address, when allowed, names the certificate (RFC 8738); tls-alpn-01
    for it arrives under its reverse-DNS name. Refusals stay in memory."""
    manager = Manager(db=f"sqlite:///{tmp_path / 'address.db'}", directory="https://127.0.0.1:9/dir", renew=False,
                      default_name="shop.example.test")
    async with manager:
        await manager.allow("127.0.0.1", "::1", "shop.example.test")
        assert manager.route(None, (), "127.0.0.1") == (Route.LOAD, "127.0.0.1", None)
        assert manager.route(None, (), "::ffff:127.0.0.1") == (Route.LOAD, "127.0.0.1", None), "dual-stack socket"
        assert manager.route(None, (), "::1") == (Route.LOAD, "::1", None)
        assert manager.route(None, (), "127.0.0.2") == (Route.LOAD, "shop.example.test", None), "else the default name"
        assert manager.route("shop.example.test", (), "127.0.0.1")[1] == "shop.example.test", "SNI decides when sent"
        challenge = manager.route("1.0.0.127.in-addr.arpa", ("acme-tls/1",), "127.0.0.1")
        assert challenge == (Route.CHALLENGE, "127.0.0.1", None)
        assert manager.route("1.0.0.127.in-addr.arpa", ("http/1.1",))[0] is Route.REFUSE, "only a validation"
        assert manager.route("2.0.0.127.in-addr.arpa", ("acme-tls/1",))[0] is Route.REFUSE, "not allowed"
        await manager.disallow("shop.example.test")
        assert manager.route(None, (), "127.0.0.2")[0] is Route.REFUSE


async def test_a_held_back_name_is_refused_from_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Backoff, parked and over-cap names: after one look at the database, every retry is
    refused from memory, as cheaply as an unknown name, until their state changes."""
    manager = Manager(db=f"sqlite:///{tmp_path / 'held.db'}", directory="https://127.0.0.1:9/dir", renew=False)
    async with manager:
        store = manager.store
        await manager.allow("backoff.example.test", "parked.example.test")
        await manager.allow("*.capped.example.test", cap=1)
        for name in ("backoff.example.test", "parked.example.test"):
            await store.finish_attempt(await store.start_attempt(name, manager.directory), "failed", None, "boom")
        await store.set_next_attempt("backoff.example.test", utcnow() + timedelta(hours=1))
        await store.set_next_attempt("parked.example.test", None)
        await store.start_attempt("first.capped.example.test", manager.directory)  # the cap's one name

        caplog.set_level(logging.WARNING, logger="autocert.manager")
        held = ["backoff.example.test", "parked.example.test", "a.capped.example.test", "b.capped.example.test", "c.capped.example.test"]
        for name in held:
            assert manager.route(name)[0] is Route.LOAD
            assert await manager.context_for(name, wait=5) is None
        cap_lines = [r for r in caplog.records if "reached its cap" in r.getMessage()]
        assert len(cap_lines) == 1, "the first name over a cap is logged, the rest are counted"

        reads = {"count": 0}

        def counting(method):  # type: ignore[no-untyped-def]
            async def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
                reads["count"] += 1
                return await method(*args, **kwargs)
            return wrapper

        for method in ("name_state", "current_certificate", "pattern_cap", "names_under"):
            monkeypatch.setattr(store, method, counting(getattr(store, method)))
        before = manager.handshakes["held"]
        for _ in range(100):
            for name in held:
                assert manager.route(name) == (Route.HELD, name, None)
        assert reads["count"] == 0 and not manager.worker.in_flight
        assert manager.handshakes["held"] - before == 100 * len(held)

        await manager.allow("unrelated.example.test")  # any allowlist change lets them be looked at again
        assert manager.route("b.capped.example.test")[0] is Route.LOAD


async def test_a_database_outage_is_logged_once_and_its_end_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from autocert._errors import StoreError

    manager = Manager(db=f"sqlite:///{tmp_path / 'outage.db'}", directory="https://127.0.0.1:9/dir", renew=False, poll_interval=0.01)
    async with manager:
        real = manager.store.change_marks
        polls = {"failed": 0}

        async def unreachable():  # type: ignore[no-untyped-def]
            polls["failed"] += 1
            raise StoreError("database sqlite+aiosqlite:///outage.db: OperationalError: disk I/O error")

        caplog.set_level(logging.INFO, logger="autocert.manager")
        monkeypatch.setattr(manager.store, "change_marks", unreachable)
        while polls["failed"] < 20:
            await asyncio.sleep(0.01)
        monkeypatch.setattr(manager.store, "change_marks", real)
        while not any("reachable again" in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.01)
        lines = [r for r in caplog.records if r.name == "autocert.manager"]
        assert len(lines) == 2, [r.getMessage() for r in lines]
        assert lines[0].getMessage().startswith("cannot read the database") and "disk I/O error" in lines[0].getMessage()
        assert lines[1].getMessage().startswith("the database is reachable again")
        assert not any(r.exc_info for r in lines), "an outage is not a traceback"
