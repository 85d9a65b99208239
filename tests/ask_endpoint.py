"""An ask endpoint for tests (Caddy's on-demand ``ask`` protocol), on loopback in a thread of
its own, so that blocking TLS clients in the test do not stall it.

``GET /check?token=t&domain=NAME``: 200 for names in ``allowed``, 403 otherwise; a name in
``held`` is answered only once it leaves the set (or never, to test timeouts); a name in
``max_age`` gets that ``Cache-Control``. It counts calls per name and the most requests it
had in flight at once.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web
from pebble import free_port


@dataclass
class AskEndpoint:
    port: int = field(default_factory=free_port)
    allowed: set[str] = field(default_factory=set)
    held: set[str] = field(default_factory=set)
    max_age: dict[str, int] = field(default_factory=dict)
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    queries: list[str] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/check?token=t"

    def total(self) -> int:
        return sum(self.calls.values())

    def __enter__(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self.held.clear()
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)  # type: ignore[union-attr]
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/check", self._check)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _check(self, request: web.Request) -> web.Response:
        name = request.query.get("domain", "")
        self.calls[name] += 1
        self.queries.append(request.query_string)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            while name in self.held:
                await asyncio.sleep(0.01)
        finally:
            self.in_flight -= 1
        headers = {"Cache-Control": f"max-age={self.max_age[name]}"} if name in self.max_age else {}
        return web.Response(status=200 if name in self.allowed else 403, text="ok", headers=headers)
