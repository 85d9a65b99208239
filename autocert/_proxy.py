"""The reverse proxy ``autocert serve --upstream URL`` puts behind its TLS listener.

A handler for :class:`autocert._http.HttpServer`: each request is forwarded on a keep-alive
connection from a pool, its body chunk by chunk as it arrives, the response likewise, with
backpressure both ways, so a multi-gigabyte upload or download costs a few buffers, not its
size. Bodies pass through byte for byte (no decompression, no re-encoding), redirects go back
to the client, and nothing about one visitor (cookies, credentials) is kept in the proxy.

What the upstream sees: the client's own ``Host``, ``X-Forwarded-For`` (appended to),
``X-Forwarded-Proto: https``, ``X-Forwarded-Host``, ``X-Real-IP`` and an RFC 7239
``Forwarded`` element, and none of the hop-by-hop headers, which describe the client's
connection rather than the request. WebSockets (and only they) are relayed after the
upstream's 101, as raw bytes both ways.
"""

from __future__ import annotations

import logging
import ssl
from typing import Final

import httptools

from ._config import parse_upstream
from ._http import Exchange, HttpConnection, Upstream, UpstreamPool, WebSocketRelay
from ._http.heads import error_body, forwarded_headers, join_head, response_headers, status_line
from ._http.upstream import Failure

__all__ = ["ProxyHandler", "parse_upstream"]

log = logging.getLogger("autocert.proxy")

CONNECT_TIMEOUT: Final = 10.0
#: Longest silence tolerated from the upstream while waiting for headers or the next body
#: chunk. There is no total timeout, so a long download or event stream lasts as long as
#: data keeps coming.
READ_TIMEOUT: Final = 300.0
#: Methods a request may be sent again with when a kept-alive connection turns out closed.
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

_UNAVAILABLE: Final = "The web application behind this server is not answering right now. Please try again in a moment."
_TOO_SLOW: Final = "The web application behind this server took too long to answer. Please try again in a moment."


def request_target(raw: bytes) -> bytes | None:
    """The path and query to ask the upstream for, exactly as the client encoded them.

    A client may send the absolute form (``GET http://host/path``, RFC 9112 section 3.2.2);
    only its path and query go upstream, never its scheme and authority.
    """
    if raw[:1] == b"/" or raw == b"*":
        return raw
    try:
        url = httptools.parse_url(raw)
    except httptools.HttpParserInvalidURLError:
        return None
    if not url.schema or not url.host:
        return None
    return (url.path or b"/") + (b"?" + url.query if url.query else b"")


class ProxyHandler:
    """Forwards every exchange to one upstream (see the module docstring).

    ``upstream`` may carry a path prefix (``http://127.0.0.1:8000/app``); request paths are
    appended to it unchanged.
    """

    def __init__(self, upstream: str, *, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT) -> None:
        base = parse_upstream(upstream)
        assert base.host is not None
        self.prefix = base.raw_path.rstrip("/").encode()
        host = base.raw_host or base.host
        port = base.port or (443 if base.scheme == "https" else 80)
        self.authority = (f"[{host}]" if ":" in host else host).encode() + (b"" if base.is_default_port() else b":%d" % port)
        context = ssl.create_default_context() if base.scheme == "https" else None
        self.pool = UpstreamPool(host, port, ssl_context=context, connect_timeout=connect_timeout, read_timeout=read_timeout)

    def __call__(self, exchange: Exchange) -> None:
        target = request_target(exchange.target)
        if target is None:
            exchange.close = True
            exchange.respond(400, b"400 bad request target\n")
            return
        if target[:1] == b"/":
            target = self.prefix + target
        headers = forwarded_headers(exchange.headers, exchange.connection.origin)
        extra = b""
        if headers[-2][0] != b"X-Forwarded-Host":  # the request has no Host
            extra += b"Host: " + self.authority + b"\r\n"
        if exchange.body_chunked:
            extra += b"Transfer-Encoding: chunked\r\n"
        if exchange.upgrade:
            extra += b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        head = join_head(b"%s %s HTTP/1.1\r\n" % (exchange.method, target), headers, extra)
        self._send(exchange, head, self.pool.take())
        exchange.go_on()  # the body goes upstream as it comes

    def _send(self, exchange: Exchange, head: bytes, upstream: Upstream | None) -> None:
        reused = upstream is not None
        if upstream is None:
            upstream = Upstream(self.pool, self)
            self.pool.open(upstream)
        upstream.start(exchange, head, chunked=exchange.body_chunked, reused=reused)
        if not exchange.connection.feeding:  # else the connection writes it with what follows
            upstream.flush()

    # -- what the upstream connections report ----------------------------------------------------

    def failed(self, exchange: Exchange, upstream: Upstream, failure: str, detail: object) -> None:
        what = f"{exchange.method.decode('latin-1')} {exchange.target.decode('latin-1')}"
        if exchange.head_sent:
            # The status line is gone already; cutting the connection before the end of the
            # body is the only way left to tell the client its copy is incomplete.
            log.warning("upstream broke off %s mid-response: %s", what, detail)
            exchange.abort()
            return
        if failure == Failure.CLOSED and upstream.reused and not upstream._started and not exchange.has_body \
                and exchange.method in _IDEMPOTENT:
            # A kept-alive connection the upstream closed as the request went out: once more,
            # on a new connection.
            self._send(exchange, upstream.head, None)
            return
        if failure in (Failure.TIMEOUT, Failure.CONNECT_TIMEOUT):
            log.warning("upstream timed out: %s (%s)", what, detail)
            status, text = 504, _TOO_SLOW
        else:
            log.warning("upstream unavailable for %s: %s", what, detail)
            status, text = 502, _UNAVAILABLE
        exchange.close = exchange.close or not exchange.request_done
        exchange.respond(status, error_body(status, text), content_type=b"text/html; charset=utf-8",
                         headers=[(b"Cache-Control", b"no-store")])

    def switched(self, exchange: Exchange, upstream: Upstream, rest: bytes) -> WebSocketRelay:
        """The upstream answered 101: send its head on, then relay bytes both ways."""
        headers, _, _ = response_headers(upstream.headers, upgrade=True)
        exchange.send_head(join_head(status_line(101, upstream.reason), headers), 101, close=False)
        if rest:
            exchange.write(rest)
        exchange.flush()
        connection: HttpConnection = exchange.connection
        relay = WebSocketRelay(connection, upstream)
        if rest:
            relay.track(rest)
        connection.start_relay(relay)
        return relay

    async def close(self) -> None:
        await self.pool.close()

