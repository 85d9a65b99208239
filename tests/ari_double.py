"""A test double that adds ACME renewal information (RFC 9773), and optionally certificate
profiles, to Pebble 2.4, which has neither.

It sits in front of a real Pebble on loopback: the directory gains a ``renewalInfo`` URL,
whose answers the test sets, and every other request is relayed to Pebble unchanged (the
Host header is kept, so Pebble builds its URLs for this double and checks JWS URLs against
it). newOrder payloads are recorded so a test can see ``replaces``, and the double can refuse
orders that carry ``replaces`` with 409, as a CA does for an already replaced certificate, or
refuse new orders with 429 ``rateLimited`` and a ``Retry-After``, as a CA over its limits does,
or with any other status and problem (a CA in trouble answering 500 ``serverInternal``).
It can also add challenge objects to every authorization, as a CA offering types a client
does not know (``dns-persist-01``) does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from pebble import Pebble, free_port


@dataclass
class RenewalWindow:
    start: datetime
    end: datetime
    retry_after: int | None = 21600


@dataclass
class AriDouble:
    pebble: Pebble
    port: int = field(default_factory=free_port)
    window: RenewalWindow | None = None
    refuse_replaces: bool = False
    #: (detail, Retry-After seconds): new orders without ``replaces`` are refused with 429
    #: ``rateLimited``, as Let's Encrypt does (renewals naming what they replace are exempt).
    rate_limit: tuple[str, int] | None = None
    #: The same for new orders of one name only (identifier value → detail, Retry-After seconds),
    #: as a limit on certificates per exact set of names does.
    name_rate_limits: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: (HTTP status, problem type after ``urn:ietf:params:acme:error:``): every new order is
    #: refused so, without a ``Retry-After``, as by a CA that is failing.
    order_error: tuple[int, str] | None = None
    profiles: dict[str, str] | None = None
    #: Challenge objects put in front of the ones Pebble offers in every authorization.
    extra_challenges: list[dict[str, Any]] = field(default_factory=list)
    #: How many authorizations got them.
    authorizations_extended: int = 0
    orders: list[dict[str, Any]] = field(default_factory=list)
    renewal_info_requests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> AriDouble:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> AriDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _start(self) -> None:
        upstream_tls = ssl.create_default_context(cafile=self.pebble.ca_bundle)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=upstream_tls), auto_decompress=False)
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/renewal-info/{certificate_id}", self._renewal_info)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        workdir = Path(self.pebble.ca_bundle).parent
        listener = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        listener.load_cert_chain(workdir / "listener-cert.pem", workdir / "listener-key.pem")
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=listener).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _renewal_info(self, request: web.Request) -> web.Response:
        self.renewal_info_requests.append(request.match_info["certificate_id"])
        if self.window is None:
            return web.json_response({"type": "urn:ietf:params:acme:error:malformed", "detail": "no window"}, status=404)
        body = {"suggestedWindow": {"start": self.window.start.isoformat(), "end": self.window.end.isoformat()}}
        headers = {"Retry-After": str(self.window.retry_after)} if self.window.retry_after else {}
        return web.json_response(body, headers=headers)

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        placed: dict[str, Any] | None = None  # a new-order request
        if request.method == "POST" and request.path.endswith("/order-plz"):
            payload = json.loads(base64.urlsafe_b64decode(json.loads(body)["payload"] + "=="))
            placed = payload
            # Counted, unless Pebble refuses its nonce (it does so at random, 5 % by default):
            # the client sends the same order again with a new one, and that is one order.
            self.orders.append(payload)
            if self.refuse_replaces and "replaces" in payload:
                problem = {"type": "urn:ietf:params:acme:error:alreadyReplaced", "detail": "already replaced"}
                return web.json_response(problem, status=409, content_type="application/problem+json")
            if self.order_error is not None:
                status, problem_type = self.order_error
                problem = {"type": f"urn:ietf:params:acme:error:{problem_type}", "detail": "the CA is having a bad day"}
                return web.json_response(problem, status=status, content_type="application/problem+json")
            names = [identifier["value"] for identifier in payload.get("identifiers", [])]
            limit = next((self.name_rate_limits[name] for name in names if name in self.name_rate_limits), self.rate_limit)
            if limit is not None and "replaces" not in payload:
                detail, retry_after = limit
                problem = {"type": "urn:ietf:params:acme:error:rateLimited", "detail": detail}
                return web.json_response(problem, status=429, content_type="application/problem+json",
                                         headers={"Retry-After": str(retry_after)})
        target = f"https://127.0.0.1:{self.pebble.listen_port}{request.rel_url}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        async with self._session.request(request.method, target, data=body or None, headers=headers, allow_redirects=False) as upstream:
            content = await upstream.read()
            if placed is not None and b"badNonce" in content:  # this very request, not an equal earlier one
                self.orders = [order for order in self.orders if order is not placed]
            if request.path == "/dir" and upstream.status == 200:
                directory = json.loads(content)
                directory["renewalInfo"] = f"https://127.0.0.1:{self.port}/renewal-info"
                if self.profiles is not None:
                    directory.setdefault("meta", {})["profiles"] = self.profiles
                content = json.dumps(directory).encode()
            elif self.extra_challenges and upstream.status == 200 and request.path.startswith("/authZ/"):
                authorization = json.loads(content)
                authorization["challenges"] = [*self.extra_challenges, *authorization.get("challenges", [])]
                self.authorizations_extended += 1
                content = json.dumps(authorization).encode()
            drop = {"content-length", "transfer-encoding", "content-encoding", "connection"}
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in drop}
            return web.Response(status=upstream.status, body=content, headers=out_headers)
