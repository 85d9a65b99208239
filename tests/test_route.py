"""``Manager.route``: the one decision behind the embedded ``sni_callback`` and serve's front."""

from __future__ import annotations

import ssl
from pathlib import Path

from autocert import Manager
from autocert._manager import Route


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
