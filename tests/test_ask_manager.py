"""The ask endpoint with an in-process ``Manager``: renewals ask again, and the embedded
``sni_callback`` (which cannot wait) refuses a name until its answer is in memory.

Apart from tests/test_ask.py because its server holds the ports Pebble validates on."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from ask_endpoint import AskEndpoint
from pebble import Pebble, wait_for
from support import served_certificate
from test_ask import refused


@pytest.fixture(scope="module")
def endpoint() -> Iterator[AskEndpoint]:
    with AskEndpoint() as instance:
        yield instance


async def test_renewal_asks_again_and_a_refusal_stops_serving(pebble: Pebble, endpoint: AskEndpoint, tmp_path: Path) -> None:
    from test_renewal import running_manager

    from autocert._errors import IssuanceError
    from autocert._policy import Route

    name = "renew.ask.test"
    endpoint.allowed.add(name)
    async with running_manager(pebble, f"sqlite:///{tmp_path / 'renew.db'}", renew=False, ask=endpoint.url) as manager:
        first = await manager.issue(name)
        assert manager.route(name)[0] is Route.SERVE and endpoint.calls[name] == 1
        assert [item["state"] for item in await manager.status([name])] == ["valid"], "allowed by the endpoint, not disallowed"
        renewed = (await manager.renew([name], force=True))[name]
        assert not isinstance(renewed, BaseException) and renewed.serial != first.serial
        assert endpoint.calls[name] == 2, "asked again before renewing, whatever the cache says"
        endpoint.allowed.discard(name)
        result = (await manager.renew([name], force=True))[name]
        assert isinstance(result, IssuanceError) and "no longer allowed" in str(result)
        assert endpoint.calls[name] == 3
        assert manager.route(name)[0] is Route.REFUSE, "dropped from what is served"
        assert await manager.store.attempt_count(name) == 2
        assert [item["state"] for item in await manager.status([name])] == ["disallowed"], "and from what status calls allowed"
        assert await manager.store.asked_names() == []


async def test_embedded_sni_callback_refuses_then_serves_the_answer(pebble: Pebble, endpoint: AskEndpoint, tmp_path: Path, root_ca: str) -> None:
    """``sni_callback`` cannot wait: a name not yet asked is refused while it is asked in the
    background; later handshakes use the cached answer."""
    from test_renewal import running_manager

    endpoint.allowed.add("embedded.ask.test")
    async with running_manager(pebble, f"sqlite:///{tmp_path / 'embed.db'}", renew=False, ask=endpoint.url) as manager:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=manager.ssl_context())
        port = server.sockets[0].getsockname()[1]
        try:
            assert await asyncio.to_thread(refused, port, "nope.ask.test")
            await asyncio.to_thread(wait_for, lambda: endpoint.calls["nope.ask.test"] == 1, timeout=30, what="the background ask")
            for _ in range(5):
                assert await asyncio.to_thread(refused, port, "nope.ask.test")
            assert endpoint.calls["nope.ask.test"] == 1
            certificate = await asyncio.to_thread(served_certificate, port, "embedded.ask.test", root_ca)
            assert "embedded.ask.test" in str(certificate.extensions)
            assert endpoint.calls["embedded.ask.test"] == 1
        finally:
            server.close()
