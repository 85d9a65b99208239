"""The upstream side: keep-alive connections to the web app, one request at a time on each.

An :class:`Upstream` is a plain asyncio protocol. It sends one request head (and the body as
the client's bytes arrive), parses the response with llhttp and forwards it to the client as
it comes: the head rewritten once, the body chunk by chunk, re-framed only where the two
connections need different framing (chunked to an HTTP/1.1 client when the app ends its body
by closing; close-delimited to an HTTP/1.0 client). Slow readers on either side pause the
other side's reading.

The :class:`UpstreamPool` keeps idle connections for reuse (LIFO, at most ``max_idle``, closed
after ``idle_timeout``) and, with one timer for all of them, ends exchanges whose upstream
stays silent for longer than ``read_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Final, Protocol

import httptools

from .heads import HSTS, date_line, join_head, response_headers, status_line
from .exchange import PAUSE_EARLY, PAUSE_UPSTREAM, Exchange

if TYPE_CHECKING:
    from .relay import WebSocketRelay

log = logging.getLogger("autocert.proxy")

MAX_RESPONSE_HEAD: Final = 64 * 1024
#: Request bytes held while the connection to the upstream is being made.
PENDING_LIMIT: Final = 256 * 1024

# How the response body goes to the client.
_NONE, _RAW, _CHUNKED = 0, 1, 2


class Failure:
    """Why an exchange could not be completed by its upstream (for the handler to answer)."""

    CONNECT = "connect"  # could not connect: 502
    CONNECT_TIMEOUT = "connect timeout"  # 504
    TIMEOUT = "timeout"  # silent for read_timeout: 504
    CLOSED = "closed"  # closed before a complete response head: 502 (or a retry)
    INVALID = "invalid"  # not HTTP/1.1: 502


class Owner(Protocol):
    """What an upstream connection reports to (the proxy handler)."""

    def failed(self, exchange: Exchange, upstream: Upstream, failure: str, detail: object) -> None: ...
    def switched(self, exchange: Exchange, upstream: Upstream, rest: bytes) -> WebSocketRelay: ...


class _HeadResponse(Exception):
    """Raised from the parser's callback to end a response to HEAD at its head."""


class _Invalid(Exception):
    """Raised from the parser's callbacks for a response that cannot be passed on."""


class Upstream(asyncio.Protocol):
    """One connection to the upstream; see the module docstring."""

    __slots__ = (
        "_body_left", "_complete", "_framing", "_has_length", "_head_size", "_headed", "_headers", "_interim", "_keep", "_out",
        "_pending", "_reason", "_transfer_encoded",
        "_request_chunked", "_request_done", "_started", "exchange", "head", "last_read", "owner", "parser", "pool", "relay",
        "reused", "transport",
    )

    def __init__(self, pool: UpstreamPool, owner: Owner) -> None:
        self.pool = pool
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.relay: WebSocketRelay | None = None
        #: The request head, kept so that a request on a connection the upstream had just
        #: closed can be sent again on a new one.
        self.head = b""
        self.reused = False
        self.last_read = 0.0
        self._out: list[bytes] = []
        self._pending = 0
        self._request_done = True
        self._request_chunked = False
        self._reset_response()

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The header lines of the response being received."""
        return self._headers

    @property
    def reason(self) -> bytes:
        return self._reason

    def _reset_response(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._started = False  # a response byte has arrived for this exchange
        self._headed = False  # the final response head has arrived (and gone to the client)
        self._interim = False
        self._complete = False
        self._keep = False
        self._framing = _NONE
        self._head_size = 0
        self._has_length = False
        self._transfer_encoded = False
        self._body_left = -1  # bytes of a Content-Length body still to come (-1: not such a body)

    # -- sending the request ---------------------------------------------------------------------

    def start(self, exchange: Exchange, head: bytes, *, chunked: bool, reused: bool) -> None:
        """Send ``exchange``'s request; its body follows through :meth:`send_body`."""
        self.exchange = exchange
        self.head = head
        self.reused = reused
        self._request_chunked = chunked
        self._request_done = not exchange.has_body
        self._reset_response()
        self.last_read = self.pool.now
        self.pool.busy.add(self)
        self._out.append(head)
        exchange.source = self
        exchange.attach(self)
        # A connection back from the pool may have been paused for its previous client.
        if exchange.connection.write_paused:
            self.pause_reading()
        else:
            self.resume_reading()

    def send_body(self, data: bytes) -> None:
        if self._request_chunked:
            self._out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self._out.append(data)
        if self.transport is None:
            self._pending += len(data)
            if self._pending > PENDING_LIMIT and self.exchange is not None:
                self.exchange.connection.pause_reading(PAUSE_UPSTREAM)

    def end_body(self) -> None:
        if self._request_chunked:
            self._out.append(b"0\r\n\r\n")
        self._request_done = True
        self.last_read = self.pool.now  # the read timeout counts from the end of the request

    def flush(self) -> None:
        out = self._out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    # -- asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._pending = 0
        self.flush()
        if self.exchange is not None:
            self.exchange.connection.resume_reading(PAUSE_UPSTREAM | PAUSE_EARLY)

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_upstream(data)
            return
        exchange = self.exchange
        if exchange is None:  # nothing was asked: an idle connection must stay silent
            self.close()
            return
        self.last_read = self.pool.now
        self._started = True
        if self._body_left > 0:
            self._pass_body(exchange, data)
            return
        if not self._headed:
            self._head_size += len(data)
            if self._head_size > MAX_RESPONSE_HEAD + len(data):
                self._fail(Failure.INVALID, "response head too large")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._switch(exchange, data[upgrade.args[0]:])
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadResponse):
                self.parser = httptools.HttpResponseParser(self)
                self._complete = True
            else:
                if cause is not None and not isinstance(cause, _Invalid):
                    log.error("error passing on a response", exc_info=cause)
                self._fail(Failure.INVALID, cause or exc)
                return
        exchange.flush()
        if self._complete:
            self._finish(exchange)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.forget(self)
        if self.relay is not None:
            self.relay.upstream_closed()
            return
        exchange = self.exchange
        if exchange is None:
            return
        if self._headed and not self._complete and self._until_close():
            # The body ran until the upstream closed: that is its end.
            self.on_message_complete()
            self._finish(exchange)
            return
        self._fail(Failure.CLOSED, exc or "the connection was closed")

    def _pass_body(self, exchange: Exchange, data: bytes) -> None:
        """The rest of a Content-Length body goes to the client as read: no parser, no copy.

        llhttp is left behind mid-body, so the next response gets a new one.
        """
        left = self._body_left - len(data)
        if left < 0:
            self._fail(Failure.INVALID, "more bytes than the Content-Length announced")
            return
        exchange.write(data)
        exchange.flush()
        self._body_left = left
        if not left:
            self.parser = httptools.HttpResponseParser(self)
            self._complete = True
            self._finish(exchange)

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.upstream_full()
        elif self.exchange is not None:
            self.exchange.connection.pause_reading(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.upstream_drained()
        elif self.exchange is not None:
            self.exchange.connection.resume_reading(PAUSE_UPSTREAM)

    # -- llhttp callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""
        self._has_length = self._transfer_encoded = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headed:  # trailers of a chunked body are not passed on
            return
        self._headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            self._has_length = True
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            self._transfer_encoded = True

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        assert exchange is not None
        status = self.parser.get_status_code()
        self._head_size = 0
        if status < 200:
            self._interim = True
            if status == 101:
                if not exchange.upgrade:
                    raise _Invalid("101 to a request that asked for no upgrade")
                return  # the parser stops with HttpParserUpgrade next; _switch sends the head
            if status != 100 and exchange.version == "1.1":  # 100 was answered here already
                headers, _, _ = response_headers(self._headers)
                exchange.write(join_head(status_line(status, self._reason), headers))
            return
        self._interim = False
        method = exchange.method
        headers, has_date, has_hsts = response_headers(self._headers)
        lines = []
        if not has_date:
            lines.append(date_line())
        if exchange.connection.server.hsts and not has_hsts:
            lines.append(b"Strict-Transport-Security: " + HSTS + b"\r\n")
        close = exchange.will_close() or exchange.upgrade
        if method == b"HEAD" or status == 204 or status == 304:
            self._framing = _NONE
        elif self._has_length:
            self._framing = _RAW
            self._body_left = _content_length(self._headers)
            self._keep = self.parser.should_keep_alive()
        elif exchange.version == "1.1":
            self._framing = _CHUNKED
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:  # an HTTP/1.0 client: the end of the body is the end of the connection
            self._framing = _RAW
            close = True
        lines.append(exchange.connection_line(close))
        exchange.send_head(join_head(status_line(status, self._reason), headers, b"".join(lines)), status, close=close)
        self._headed = True
        if method == b"HEAD":
            # llhttp would wait for the body its Content-Length announces; there is none.
            self._keep = self.parser.should_keep_alive()
            raise _HeadResponse

    def on_body(self, body: bytes) -> None:
        framing = self._framing
        if framing == _RAW:
            self.exchange.write(body)  # type: ignore[union-attr]
            if self._body_left > 0:
                self._body_left -= len(body)
        elif framing == _CHUNKED:
            exchange = self.exchange
            assert exchange is not None
            exchange.write(b"%x\r\n" % len(body))
            exchange.write(body)
            exchange.write(b"\r\n")

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._framing == _CHUNKED:
            self.exchange.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        self._complete = True
        self._body_left = -1
        self._keep = self.parser.should_keep_alive()

    # -- the end of an exchange ------------------------------------------------------------------

    def _until_close(self) -> bool:
        """Whether the response's body is delimited by the end of the connection."""
        return not self._has_length and not self._transfer_encoded

    def _finish(self, exchange: Exchange) -> None:
        transport = self.transport
        reusable = self._keep and self._request_done and transport is not None and not transport.is_closing()
        self._detach()
        if reusable:
            self.pool.put(self)
        else:
            self.close()
        exchange.finish()

    def _detach(self) -> None:
        exchange = self.exchange
        self.exchange = None
        self.pool.busy.discard(self)
        if exchange is not None:
            if exchange.source is self:
                exchange.source = None
            if exchange.sink is self:
                exchange.sink = None
            exchange.connection.resume_reading(PAUSE_UPSTREAM)  # if this connection had paused it
        self._out.clear()

    def _fail(self, failure: str, detail: object) -> None:
        exchange = self.exchange
        self._detach()
        self.abort()
        if exchange is not None:
            self.owner.failed(exchange, self, failure, detail)

    def _switch(self, exchange: Exchange, rest: bytes) -> None:
        """A 101: from now on bytes pass both ways unparsed."""
        self.pool.busy.discard(self)
        self.exchange = None
        exchange.source = exchange.sink = None
        self.relay = self.owner.switched(exchange, self, rest)

    def timed_out(self) -> None:
        self._fail(Failure.TIMEOUT, "no answer")

    def client_gone(self) -> None:
        """The client left (or sent a bad body): this exchange can never complete."""
        if self.exchange is not None:
            self._detach()
            self.pool.cancel(self)
            self.abort()

    def close(self) -> None:
        self._out.clear()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._out.clear()
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and self.transport.is_reading():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_reading() and not self.transport.is_closing():
            self.transport.resume_reading()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if len(name) == 14 and name.lower() == b"content-length":
            return int(value)  # llhttp has checked it is one plain number
    return -1


class UpstreamPool:
    """Connections to one upstream: idle ones for reuse, busy ones watched for silence."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None, connect_timeout: float = 10.0,
                 read_timeout: float = 300.0, idle_timeout: float = 15.0, max_idle: int = 100) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.idle: list[tuple[float, Upstream]] = []
        self.busy: set[Upstream] = set()
        self.now = 0.0
        self._connecting: dict[Upstream, asyncio.Task[None]] = {}
        self._period = min(max(min(read_timeout, idle_timeout) / 4, 0.02), 1.0)
        self._tick: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def take(self) -> Upstream | None:
        """An idle connection, most recently used first, or None."""
        self._ensure_tick()
        idle = self.idle
        while idle:
            _, upstream = idle.pop()
            if upstream.transport is not None and not upstream.transport.is_closing():
                return upstream
        return None

    def open(self, upstream: Upstream) -> None:
        """Connect ``upstream`` (its request is sent once connected)."""
        self._ensure_tick()
        assert self._loop is not None
        task = self._loop.create_task(self._connect(upstream))
        self._connecting[upstream] = task

    async def _connect(self, upstream: Upstream) -> None:
        assert self._loop is not None
        try:
            await asyncio.wait_for(
                self._loop.create_connection(lambda: upstream, self.host, self.port, ssl=self.ssl_context,
                                             server_hostname=self.host if self.ssl_context else None),
                self.connect_timeout,
            )
        except TimeoutError:
            upstream._fail(Failure.CONNECT_TIMEOUT, f"no connection within {self.connect_timeout:g} s")
        except (OSError, ssl.SSLError) as exc:
            upstream._fail(Failure.CONNECT, exc)
        finally:
            self._connecting.pop(upstream, None)

    def cancel(self, upstream: Upstream) -> None:
        task = self._connecting.pop(upstream, None)
        if task is not None:
            task.cancel()

    def put(self, upstream: Upstream) -> None:
        if self._closed or len(self.idle) >= self.max_idle:
            upstream.close()
            return
        self.idle.append((self.now, upstream))

    def forget(self, upstream: Upstream) -> None:
        self.busy.discard(upstream)
        if self.idle:
            self.idle = [entry for entry in self.idle if entry[1] is not upstream]

    def _ensure_tick(self) -> None:
        if self._tick is None:
            self._loop = asyncio.get_running_loop()
            self.now = self._loop.time()
            self._tick = self._loop.call_later(self._period, self._sweep)

    def _sweep(self) -> None:
        assert self._loop is not None
        self.now = now = self._loop.time()
        silent_since = now - self.read_timeout - self._period
        for upstream in [u for u in self.busy if u.last_read <= silent_since]:
            if upstream._request_done and not (upstream.transport is not None and not upstream.transport.is_reading()):
                upstream.timed_out()
            else:  # still sending the request, or paused because the client reads slowly
                upstream.last_read = now
        expired = now - self.idle_timeout
        while self.idle and self.idle[0][0] <= expired:
            self.idle.pop(0)[1].close()
        self._tick = self._loop.call_later(self._period, self._sweep) if (self.busy or self.idle or self._connecting) else None

    async def close(self) -> None:
        self._closed = True
        for _, upstream in self.idle:
            upstream.close()
        self.idle.clear()
        for task in list(self._connecting.values()):
            task.cancel()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
