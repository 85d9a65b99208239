"""The reverse proxy ``autocert serve --upstream URL`` puts behind its TLS listener.

Everything is streamed: request and response bodies pass through in chunks with backpressure
on both sides, so a multi-gigabyte upload or download costs a few buffers, not its size. Bodies
pass through byte for byte (no decompression, no re-encoding), redirects go back to the client,
and cookies are never stored in the proxy: one shared client session serves every visitor, so
anything it remembered would leak between them.

What the upstream sees: the client's own ``Host``, ``X-Forwarded-For`` (appended to),
``X-Forwarded-Proto: https``, ``X-Forwarded-Host`` and an RFC 7239 ``Forwarded`` element, and
none of the hop-by-hop headers, which describe the client's connection rather than the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import weakref
from collections.abc import AsyncIterator, Iterable
from http import HTTPStatus
from typing import Final

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ._errors import ConfigError

__all__ = ["proxy_app"]

log = logging.getLogger("autocert.proxy")

#: Headers that belong to one connection (RFC 9110 section 7.6.1), plus the ``Proxy-*`` family,
#: which is meant for a forward proxy and must never reach an application.
HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)

#: Sent to the upstream by ``ws_connect`` itself; the client's values describe the other leg.
WEBSOCKET_HANDSHAKE: Final = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol", "sec-websocket-accept"}
)

CONNECT_TIMEOUT: Final = 10.0
#: Longest silence tolerated from the upstream while waiting for headers or the next body
#: chunk. There is no total timeout, so a long download or event stream lasts as long as
#: data keeps coming.
READ_TIMEOUT: Final = 300.0
#: Largest WebSocket message relayed. Messages are relayed whole, so this bounds the memory
#: one connection can pin; aiohttp's own default (4 MiB) is too small for many apps.
WEBSOCKET_MAX_MESSAGE: Final = 16 * 1024 * 1024
#: How long a WebSocket close handshake may take on each side before the socket is dropped.
WEBSOCKET_CLOSE_TIMEOUT: Final = 10.0
HSTS_VALUE: Final = "max-age=31536000"

_SESSION: Final = web.AppKey("autocert_proxy_session", aiohttp.ClientSession)
#: Client-side WebSockets being relayed, so that shutdown can close them.
_WEBSOCKETS: Final[web.AppKey[weakref.WeakSet[web.WebSocketResponse]]] = web.AppKey("autocert_proxy_websockets")

_ERROR_PAGE: Final = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{status} {reason}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36em;margin:4em auto;padding:0 1em;color:#222}}</style>
</head>
<body>
<h1>{status} {reason}</h1>
<p>{detail}</p>
</body>
</html>
"""


def parse_upstream(upstream: str) -> URL:
    """Check ``--upstream`` once at startup, so a typo fails the start rather than every request."""
    try:
        url = URL(upstream)
    except (ValueError, TypeError):
        raise ConfigError(f"--upstream {upstream!r}: not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"--upstream {upstream!r}: expected http://HOST:PORT or https://HOST:PORT")
    if url.query_string or url.fragment or url.user or url.password:
        raise ConfigError(f"--upstream {upstream!r}: must not contain credentials, a query or a fragment")
    return url


def proxy_app(
    upstream: str,
    *,
    hsts: bool = False,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
) -> web.Application:
    """An aiohttp application that forwards every request and WebSocket to ``upstream``.

    ``upstream`` may carry a path prefix (``http://127.0.0.1:8000/app``); request paths are
    appended to it unchanged.
    """
    base = parse_upstream(upstream)
    origin = str(base.origin())
    prefix = base.raw_path.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=read_timeout)

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        # limit=0: the pool never queues requests; long downloads and WebSockets would
        # otherwise hold every slot and starve short requests.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=15)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        app[_SESSION] = session
        yield
        await session.close()

    async def close_websockets(app: web.Application) -> None:
        # Runs when shutdown starts, before the server waits for in-flight handlers: open
        # WebSockets would otherwise hold the shutdown until its timeout.
        sockets = app[_WEBSOCKETS]
        for ws in list(sockets):
            with contextlib.suppress(Exception):
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def handle(request: web.Request) -> web.StreamResponse:
        target = URL(f"{origin}{prefix}{request_target(request)}", encoded=True)
        headers = forwarded_headers(request)
        session = request.app[_SESSION]
        if is_websocket_upgrade(request.headers):
            return await _proxy_websocket(request, session, target, headers)
        return await _proxy_http(request, session, target, headers)

    async def add_hsts(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("Strict-Transport-Security", HSTS_VALUE)

    app = web.Application()
    app[_WEBSOCKETS] = weakref.WeakSet()
    app.cleanup_ctx.append(client_session)
    app.on_shutdown.append(close_websockets)
    if hsts:
        app.on_response_prepare.append(add_hsts)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def request_target(request: web.Request) -> str:
    """The path and query to ask the upstream for, exactly as the client encoded them.

    A client may send the absolute form (``GET http://host/path``, RFC 9112 section 3.2.2);
    only its path and query go upstream, never its scheme and authority.
    """
    raw = request.raw_path
    if raw.startswith("/"):
        return raw
    return request.rel_url.raw_path_qs or "/"


# -- headers -------------------------------------------------------------------------------


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """Header names listed in ``Connection``: hop-by-hop for this message only."""
    return {token.strip().lower() for value in headers.getall("Connection", ()) for token in value.split(",") if token.strip()}


def strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str], *, drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers, the ones ``Connection`` names and ``drop``."""
    named = connection_tokens(headers) | set(drop)
    result: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lower = key.lower()
        if lower in HOP_BY_HOP or lower in named or lower.startswith("proxy-"):
            continue
        result.add(key, value)
    return result


def is_websocket_upgrade(headers: CIMultiDictProxy[str]) -> bool:
    return headers.get("Upgrade", "").strip().lower() == "websocket" and "upgrade" in connection_tokens(headers)


def _forwarded_node(remote: str | None) -> str:
    """RFC 7239 node syntax: IPv6 in brackets and quoted, unknown peers as ``unknown``."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return _forwarded_value(remote)
    return f'"[{address}]"' if address.version == 6 else str(address)


_TOKEN_CHARS: Final = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _forwarded_value(value: str) -> str:
    """A token as is, anything else as a quoted-string (``host:port`` needs quoting)."""
    if value and all(char in _TOKEN_CHARS for char in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def forwarded_headers(request: web.Request) -> CIMultiDict[str]:
    """The request headers the upstream gets: end-to-end ones plus where the request came from.

    ``Expect`` is dropped because this server has already answered ``100-continue`` to the
    client; forwarding it would make the client session wait for a second one that upstreams
    such as wsgiref never send. ``Proxy`` is dropped because CGI-style apps turn it into
    ``HTTP_PROXY`` and send their own outgoing requests through it (httpoxy, CVE-2016-5385).
    """
    headers = strip_hop_by_hop(request.headers, drop=("expect", "proxy"))
    host = request.headers.get("Host")
    if host is not None:
        headers["Host"] = host
    remote = request.remote
    previous = ", ".join(request.headers.getall("X-Forwarded-For", ()))
    if remote:
        headers["X-Forwarded-For"] = f"{previous}, {remote}" if previous else remote
        # Apps set up for nginx often trust X-Real-IP; a client must not be able to set it.
        headers["X-Real-IP"] = remote
    else:
        headers.popall("X-Real-IP", None)
    headers["X-Forwarded-Proto"] = "https"
    if host is not None:
        headers["X-Forwarded-Host"] = host
    element = f"for={_forwarded_node(remote)}"
    if host is not None:
        element += f";host={_forwarded_value(host)}"
    element += ";proto=https"
    earlier = ", ".join(request.headers.getall("Forwarded", ()))
    headers["Forwarded"] = f"{earlier}, {element}" if earlier else element
    return headers


# -- plain HTTP ----------------------------------------------------------------------------


def error_page(status: int, detail: str) -> web.Response:
    """A small page of our own: the client learns what failed, never where the upstream is."""
    phrase = HTTPStatus(status).phrase
    return web.Response(
        status=status,
        text=_ERROR_PAGE.format(status=status, reason=phrase, detail=detail),
        content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )


def bad_gateway() -> web.Response:
    return error_page(502, "The web application behind this server is not answering right now. Please try again in a moment.")


def gateway_timeout() -> web.Response:
    return error_page(504, "The web application behind this server took too long to answer. Please try again in a moment.")


async def _proxy_http(request: web.Request, session: aiohttp.ClientSession, target: URL, headers: CIMultiDict[str]) -> web.StreamResponse:
    data = request.content if request.body_exists else None
    try:
        upstream = await session.request(request.method, target, headers=headers, data=data, allow_redirects=False)
    except TimeoutError:
        log.warning("upstream timed out: %s %s", request.method, request.rel_url)
        return gateway_timeout()
    except (aiohttp.ClientError, OSError) as exc:
        log.warning("upstream unavailable for %s %s: %s", request.method, request.rel_url, exc)
        return bad_gateway()
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(strip_hop_by_hop(upstream.headers))
        await response.prepare(request)
        while True:
            try:
                chunk = await upstream.content.readany()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                # The status line is gone already; cutting the connection before the end of
                # the body is the only way left to tell the client its copy is incomplete.
                log.warning("upstream broke off %s %s mid-response: %s", request.method, request.rel_url, exc)
                _abort(request)
                return response
            if not chunk:
                break
            try:
                await response.write(chunk)
            except (ConnectionError, aiohttp.ClientError, OSError):
                # The client went away. Its connection must not be reused with half a body
                # in it, and releasing the unread upstream response below closes that too.
                _abort(request)
                return response
        await response.write_eof()
        return response
    finally:
        # Returns the connection to the pool only when the body was read to its end.
        upstream.release()


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


# -- WebSocket -----------------------------------------------------------------------------

#: Close codes a peer may send; 1005 and 1006 only ever describe a close locally.
_SENDABLE_CLOSE_CODES: Final = frozenset(range(1000, 1004)) | frozenset(range(1007, 1015)) | frozenset(range(3000, 5000))


async def _proxy_websocket(
    request: web.Request, session: aiohttp.ClientSession, target: URL, headers: CIMultiDict[str]
) -> web.StreamResponse:
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    for name in WEBSOCKET_HANDSHAKE:
        headers.popall(name, None)
    try:
        upstream = await session.ws_connect(
            target,
            headers=headers,
            protocols=protocols,
            autoclose=False,
            autoping=True,
            compress=0,
            max_msg_size=WEBSOCKET_MAX_MESSAGE,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=WEBSOCKET_CLOSE_TIMEOUT),
        )
    except aiohttp.WSServerHandshakeError as exc:
        # The upstream refused the upgrade (e.g. 403, 404): tell the client the same.
        status = exc.status if 400 <= exc.status < 600 else 502
        return error_page(status, "The web application refused this WebSocket connection.")
    except TimeoutError:
        return gateway_timeout()
    except (aiohttp.ClientError, OSError) as exc:
        log.warning("upstream unavailable for WebSocket %s: %s", request.rel_url, exc)
        return bad_gateway()

    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoclose=False,
        autoping=True,
        max_msg_size=WEBSOCKET_MAX_MESSAGE,
        timeout=WEBSOCKET_CLOSE_TIMEOUT,
    )
    sockets = request.app[_WEBSOCKETS]
    try:
        await client.prepare(request)
        sockets.add(client)
        relays = [
            asyncio.create_task(_relay(client, upstream), name="websocket client to upstream"),
            asyncio.create_task(_relay(upstream, client), name="websocket upstream to client"),
        ]
        try:
            done, _pending = await asyncio.wait(relays, return_when=asyncio.FIRST_COMPLETED)
            # One side ended. Closing is done here, in one place, so that the close code the
            # ending side sent is the one the other side gets (two relays closing sockets
            # concurrently would race and send 1000 instead).
            first = relays[0] if relays[0] in done else relays[1]
            ended, other = (client, upstream) if first is relays[0] else (upstream, client)
            code, reason = first.result()
            await other.close(code=code, message=reason)
            await ended.close(code=code)
            await asyncio.wait(relays, timeout=WEBSOCKET_CLOSE_TIMEOUT)
        finally:
            for task in relays:
                task.cancel()
            await asyncio.gather(*relays, return_exceptions=True)
    finally:
        sockets.discard(client)
        await upstream.close()
        await client.close()
    return client


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _relay(source: WebSocket, sink: WebSocket) -> tuple[int, bytes]:
    """Copy messages one way until ``source`` ends; return the close code and reason to pass on."""
    try:
        while True:
            message = await source.receive()
            if message.type is WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type is WSMsgType.CLOSE:
                code = message.data if message.data in _SENDABLE_CLOSE_CODES else aiohttp.WSCloseCode.OK
                return code, (message.extra or "").encode()[:123]
            elif message.type is WSMsgType.ERROR:
                error = message.data
                if isinstance(error, aiohttp.WebSocketError) and error.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                    return aiohttp.WSCloseCode.MESSAGE_TOO_BIG, b"message too big"
                return aiohttp.WSCloseCode.INTERNAL_ERROR, b""
            elif message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED):
                # Closed from this side (shutdown) or the peer vanished without a close frame.
                return aiohttp.WSCloseCode.GOING_AWAY, b""
    except (ConnectionError, aiohttp.ClientError, RuntimeError):
        # The sink went away while a message was being passed on.
        return aiohttp.WSCloseCode.GOING_AWAY, b""
