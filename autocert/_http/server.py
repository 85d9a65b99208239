"""The client side of HTTP/1.1: one plain asyncio protocol per connection.

Requests are parsed by llhttp (``httptools``), strictly: every smuggling vector it knows
(Content-Length with Transfer-Encoding, duplicate or malformed lengths, obs-fold, bare LF,
bad chunk sizes, stray bytes in names and values) is a 400 and the end of the connection.
Each request becomes an :class:`Exchange` handed to the listener's handler when its head is
complete; the body follows chunk by chunk into whatever the handler attached. Pipelined
requests wait their turn with reading paused, so responses leave in order.

Writes made while one read is being handled are joined and written once, after the parser
returns: a request whose head and first chunk arrive together reaches the upstream in one
write, and a request that turns out to be malformed has sent nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

import httptools

from .access import AccessLog
from .exchange import PAUSE_PIPELINE, PAUSE_UPGRADE, Exchange, Handler
from .heads import Origin, own_response, unmapped
from .hosts import MISDIRECTED_PAGE, misdirected

if TYPE_CHECKING:
    from .._descriptors import DescriptorGuard

log = logging.getLogger("autocert.http")

#: The largest request head accepted (request line and headers), like nginx's 4 × 8 KiB.
MAX_HEAD: Final = 32 * 1024
MAX_HEADERS: Final = 100
#: A client's write buffer once large bodies flow (a quarter of it is the low mark): fewer
#: pauses of the upstream, at most this much held per slow client.
WRITE_BUFFER_HIGH: Final = 512 * 1024

class BadRequest(Exception):
    """A request this server refuses before any handler sees it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class HttpServer:
    """One listener's HTTP/1.1 side: settings, the live connections, their deadlines, the drain.

    Call it to get a connection protocol (it is the protocol factory). Deadlines are checked
    by one timer for every connection, a few times per bound.
    """

    def __init__(self, handler: Handler, *, tls: bool, hsts: bool = False, header_timeout: float = 30.0,
                 idle_timeout: float = 75.0, access_log: bool = True, on_close: Callable[[], object] | None = None,
                 host_check: bool = True, guard: DescriptorGuard | None = None) -> None:
        self.handler = handler
        self.tls = tls
        #: Answer 421 to a request whose host is not the name its TLS connection was made for.
        self.host_check = host_check
        #: Add ``Strict-Transport-Security`` to every response that lacks it, own or proxied.
        self.hsts = hsts
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.access = AccessLog() if access_log else None
        #: Live connections, oldest first (a dict keeps the order they came in).
        self.connections: dict[HttpConnection, None] = {}
        #: Plain listeners admit each new client against the open-file limit; TLS connections
        #: were admitted by the front before their handshake.
        self.guard = guard if not tls else None
        if guard is not None:
            guard.shedders.append(self.shed_idle)
        self.draining = False
        self.now = 0.0
        self._on_close = on_close
        self._period = min(max(min(header_timeout, idle_timeout) / 4, 0.02), 1.0)
        self._tick: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()

    def __call__(self, server_name: str = "") -> HttpConnection:
        """A protocol for a new connection; ``server_name`` is the name its TLS was set up for."""
        if self._tick is None:
            self._loop = asyncio.get_running_loop()
            self.now = self._loop.time()
            self._tick = self._loop.call_later(self._period, self._sweep)
        return HttpConnection(self, server_name if self.host_check else "")

    def _sweep(self) -> None:
        assert self._loop is not None
        self.now = now = self._loop.time()
        # Deadlines are set from ``now`` as of the last tick, up to one period stale: a
        # period's slack here means no bound ever fires early.
        due = now - self._period
        for connection in [c for c in self.connections if 0 < c.deadline <= due]:
            connection.timed_out()
        self._tick = self._loop.call_later(self._period, self._sweep) if self.connections else None

    def shed_idle(self, count: int) -> int:
        """Close up to ``count`` connections waiting for a request head, oldest first."""
        closed = 0
        for connection in self.connections:
            if closed >= count:
                break
            if connection.waiting_for_head() and not connection.transport.is_closing():
                connection.transport.abort()
                closed += 1
        return closed

    def forget(self, connection: HttpConnection) -> None:
        self.connections.pop(connection, None)
        if not self.connections:
            self._idle.set()

    def start_draining(self) -> None:
        """Close idle connections now; the others close after their response in flight, and
        connections that come after this (handshakes finishing) after their first response."""
        if self.draining:
            return
        self.draining = True
        for connection in list(self.connections):
            connection.drain()

    async def shutdown(self, timeout: float) -> None:
        """Drain (see start_draining), let responses in flight finish for up to ``timeout``, then cut."""
        self.start_draining()
        self._idle.clear()
        if self.connections:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                for connection in list(self.connections):
                    connection.abort()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self.access is not None:
            self.access.close()
        if self._on_close is not None:
            await asyncio.sleep(0)  # connection_lost callbacks of the aborted connections
            result = self._on_close()
            if asyncio.iscoroutine(result):
                await result


class Relay(Protocol):
    """What a connection passes its bytes to once the upstream switched protocols."""

    def from_client(self, data: bytes) -> None: ...
    def client_closed(self) -> None: ...
    def going_away(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class HttpConnection(asyncio.Protocol):
    """One client connection: parses requests, runs exchanges one at a time, enforces deadlines."""

    __slots__ = (
        "__weakref__", "_active", "_big", "_broken", "_chunked", "_continue", "_eof", "_head_size", "_headers", "_host", "_host_ok", "_idle", "_length",
        "_paused", "_queue", "_receiving", "_upgrade_buffer", "_url", "_write_paused", "deadline", "feeding", "out", "parser", "peer",
        "relay", "server", "server_name", "transport",
    )

    def __init__(self, server: HttpServer, server_name: str = "") -> None:
        self.server = server
        #: The name this TLS connection was made for: requests for other hosts get 421.
        #: Empty when there is none to hold requests to (plain HTTP, the check turned off).
        self.server_name = server_name
        self._host: bytes | None = None
        #: The last ``Host`` that matched ``server_name``: later requests compare bytes only.
        self._host_ok = server_name.encode()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[bytes] = []
        #: True while a read is being parsed: writes wait for its end and leave together.
        self.feeding = False
        self.deadline = 0.0
        self.relay: Relay | None = None
        self.peer = ""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._length = 0
        self._chunked = False
        self._continue = False
        self._head_size = 0
        self._receiving: Exchange | None = None
        self._active: Exchange | None = None
        self._queue: deque[Exchange] | None = None
        self._paused = 0
        self._write_paused = False
        self._big = False
        self._eof = False
        self._idle = False  # kept alive after a response, waiting for the next request's first byte
        self._broken: BadRequest | None = None
        self._upgrade_buffer: list[bytes] | None = None

    # -- asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        # While draining too: a connection accepted before the stop gets its first request
        # answered (with ``Connection: close``), as it would have been.
        if server.guard is not None and not server.guard.admit(transport):
            transport.close()
            return
        server.connections[self] = None
        if not self.peer:  # else a trusted balancer's PROXY header said who the client is
            peer = transport.get_extra_info("peername")
            self.peer = unmapped(peer[0]) if isinstance(peer, tuple) else ""
        self.deadline = server.now + server.header_timeout

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_client(data)
            return
        if self._upgrade_buffer is not None or self._broken is not None:
            self._hold(data)
            return
        if self._receiving is None:  # a new head: its first bytes, or more of it
            if self._idle:
                self._idle = False
                self.deadline = self.server.now + self.server.header_timeout
            self._head_size += len(data)
            if self._head_size > MAX_HEAD + len(data):
                self._refuse(BadRequest(431, "request head too large"))
                return
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.feeding = False
            self._upgraded(data[upgrade.args[0]:])
        except httptools.HttpParserError as exc:
            self.feeding = False
            cause = exc.__context__
            if isinstance(exc, httptools.HttpParserCallbackError) and not isinstance(cause, BadRequest):
                log.error("error handling a request", exc_info=cause or exc)
                self.abort()
                return
            self._refuse(cause if isinstance(cause, BadRequest) else BadRequest(400, str(exc)))
            return
        self.feeding = False
        receiving = self._receiving or self._active
        if receiving is not None and receiving.sink is not None:
            receiving.sink.flush()
        if self.out:
            self.flush()

    def eof_received(self) -> bool | None:
        self._eof = True
        if self.relay is not None:
            self.relay.client_closed()
            return None
        # A plain client may half-close after its request and still read the answer.
        return True if (self._active is not None and not self.server.tls) else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        self.deadline = 0.0
        if self.relay is not None:
            self.relay.client_closed()
        for exchange in (self._active, self._receiving):
            if exchange is not None and exchange.source is not None:
                exchange.source.client_gone()
        self._active = self._receiving = self._queue = None
        # The parser holds this connection's callbacks: without it the connection, its
        # transport and (behind the front) its TLS objects are freed now, by reference
        # counting, instead of by the cyclic collector, whose full passes stall a busy loop.
        self.parser = None  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self._write_paused = True
        source = self._active.source if self._active is not None else None
        if source is not None:
            source.pause_reading()
        if self.relay is not None:
            self.relay.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        source = self._active.source if self._active is not None else None
        if source is not None:
            source.resume_reading()
        if self.relay is not None:
            self.relay.resume_reading()

    def waiting_for_head(self) -> bool:
        """Idle as far as the open-file limit goes: no request running, none relayed, and
        at most part of a head received (kept alive after a response, or new and silent)."""
        return self._active is None and self._receiving is None and self.relay is None and self._upgrade_buffer is None

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    @property
    def origin(self) -> Origin:
        """Where the client connects from, as the upstream is told."""
        return Origin.of(self.peer or None)

    # -- llhttp callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._length = 0
        self._chunked = False
        self._continue = False
        self._host = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= MAX_HEADERS:
            raise BadRequest(431, "too many header fields")
        headers.append((name, value))
        if len(name) == 14 and name.lower() == b"content-length":
            self._length = int(value)  # llhttp has checked it is one plain number
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            # llhttp insists on chunked, last; a coding before it would reach the upstream
            # undeclared once the chunks are undone here.
            if value.strip().lower() != b"chunked":
                raise BadRequest(501, "transfer codings other than chunked are not supported")
            self._chunked = True
        elif len(name) == 6 and name.lower() == b"expect" and value.strip().lower() == b"100-continue":
            self._continue = True
        elif len(name) == 4 and (name == b"Host" or name.lower() == b"host"):
            if self._host is not None:
                raise BadRequest(400, "more than one Host header field")
            self._host = value

    def on_headers_complete(self) -> None:
        if self.transport.is_closing():
            raise BadRequest(400, "a request after the connection was closed")
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise BadRequest(505, f"HTTP version {version} is not supported")
        self._head_size = 0
        exchange = Exchange(self, parser.get_method(), self._url, version, self._headers, parser.should_keep_alive(),
                            self._chunked, self._length)
        exchange.continue_expected = self._continue and version == "1.1"
        if self.server_name:
            host = self._host
            if host != self._host_ok or not self._url.startswith(b"/"):
                if misdirected(host, self._url, self.server_name):
                    exchange.misdirected = True
                elif host is not None and self._url.startswith(b"/"):
                    self._host_ok = host
        if parser.should_upgrade():
            if exchange.method == b"CONNECT":
                raise BadRequest(405, "CONNECT is not supported")
            if exchange.has_body:
                raise BadRequest(400, "an upgrade request with a body")
            # Relayed only when it is the next to run; anything else is an ordinary request.
            exchange.upgrade = self._active is None and exchange.method == b"GET" and _wants_websocket(self._headers)
        self._receiving = exchange
        self.deadline = 0.0
        if self._active is None:
            self._start(exchange)
        else:
            if self._queue is None:
                self._queue = deque()
            self._queue.append(exchange)
            self.pause_reading(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        self._receiving._body(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        exchange = self._receiving
        assert exchange is not None
        exchange.request_done = True
        self._receiving = None
        if exchange.sink is not None and exchange.has_body:
            exchange.sink.end_body()

    # -- running exchanges -----------------------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        self._active = exchange
        if exchange.misdirected:
            exchange.close = True
            exchange.upgrade = False
            exchange.respond(421, MISDIRECTED_PAGE, content_type=b"text/html; charset=utf-8")
            return
        try:
            self.server.handler(exchange)
        except Exception:
            log.exception("error handling %s %s", exchange.method.decode("latin-1"), exchange.target.decode("latin-1"))
            if exchange.head_sent:
                exchange.abort()
            else:
                exchange.close = True
                exchange.respond(500, b"500 Internal Server Error\n")

    def exchange_done(self, exchange: Exchange) -> None:
        if exchange is not self._active:
            return
        self._active = None
        self._log(exchange)
        if exchange.will_close() or self._eof:
            self.transport.close()
            self.deadline = 0.0
            return
        if self._queue:
            self._start(self._queue.popleft())
            if not self._queue:
                self.resume_reading(PAUSE_PIPELINE)
            return
        if self._broken is not None:
            self._refuse(self._broken)
            return
        self._idle = True
        self.deadline = self.server.now + self.server.idle_timeout
        if self._paused:
            self.resume_reading(PAUSE_PIPELINE)

    def _log(self, exchange: Exchange) -> None:
        access = self.server.access
        if access is not None:
            access.add(self.peer, exchange.method, exchange.target, exchange.version, exchange.status, exchange.sent,
                       exchange.headers)

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after a head with ``Connection: upgrade``."""
        exchange = self._active
        if exchange is None or not exchange.upgrade or exchange.head_sent:
            # Not one to relay (say ``Upgrade: h2c``): it is an ordinary request without a
            # body, and the parser starts afresh on what follows it.
            self.parser = httptools.HttpRequestParser(self)
            if rest:
                self.data_received(rest)
            return
        self._upgrade_buffer = [rest] if rest else []
        self.pause_reading(PAUSE_UPGRADE)

    def start_relay(self, relay: Relay) -> None:
        """The upstream switched protocols: from now on bytes pass through ``relay`` both ways."""
        self.relay = relay
        self.deadline = 0.0
        if self._active is not None:
            self._log(self._active)
        self._active = None
        held, self._upgrade_buffer = self._upgrade_buffer or [], None
        for data in held:
            relay.from_client(data)
        self.resume_reading(PAUSE_UPGRADE)

    def _hold(self, data: bytes) -> None:
        if self._upgrade_buffer is not None:
            self._upgrade_buffer.append(data)
        # else: bytes after a bad request are never read

    def _refuse(self, error: BadRequest) -> None:
        """Answer 4xx and close; after the response in flight if there is one."""
        self._broken = error
        self.deadline = 0.0
        receiving, self._receiving = self._receiving, None
        if receiving is not None:  # the body went wrong: its upstream must not see the rest
            if receiving.source is not None:
                receiving.source.client_gone()
            if receiving is not self._active or receiving.head_sent:
                log.info("bad request body from %s: %s", self.peer or "unknown", error)
                self.abort()
                return
            self._active = None
        if self._active is not None:
            self.pause_reading(PAUSE_PIPELINE)
            return
        log.info("bad request from %s: %s", self.peer or "unknown", error)
        self.out.clear()
        body = f"{error.status} {error}\n".encode()
        self.transport.write(own_response(error.status, body, hsts=self.server.hsts, close=True))
        self.transport.close()

    def timed_out(self) -> None:
        self.deadline = 0.0
        if self._active is None and self._receiving is None:
            self.transport.close()

    def drain(self) -> None:
        """Shutdown: close now if kept alive after a response with nothing more sent; otherwise
        after the response in flight (or the relay's close). A new connection keeps its first
        request: its client may be sending it right now, and closing would fail it (a client
        retries a request on a reused connection, not on a new one)."""
        if self.relay is not None:
            self.relay.going_away()
        elif self._idle:
            self.transport.close()

    def abort(self) -> None:
        self.out.clear()
        self.transport.abort()

    # -- writing and flow control ----------------------------------------------------------------

    def flush(self) -> None:
        out = self.out
        if not out:
            return
        if self.transport.is_closing():
            out.clear()
            return
        if len(out) == 1:
            data = out[0]
            if len(data) > 65536 and not self._big:
                self._allow_big_writes()
            self.transport.write(data)
        elif sum(map(len, out)) <= 65536:
            self.transport.write(b"".join(out))
        else:
            if not self._big:
                self._allow_big_writes()
            for data in out:
                self.transport.write(data)
        out.clear()

    def _allow_big_writes(self) -> None:
        """Large bodies: a bigger write buffer, so the upstream is not paused every 64 KiB."""
        self._big = True
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def pause_reading(self, reason: int) -> None:
        if not self._paused:
            self.transport.pause_reading()
        self._paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and not self.transport.is_closing():
                self.transport.resume_reading()


def _header(headers: list[tuple[bytes, bytes]], lower: bytes) -> bytes | None:
    for name, value in headers:
        if len(name) == len(lower) and name.lower() == lower:
            return value
    return None


def _wants_websocket(headers: list[tuple[bytes, bytes]]) -> bool:
    value = _header(headers, b"upgrade")
    return value is not None and value.strip().lower() == b"websocket"
