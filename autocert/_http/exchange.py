"""One request and its response: what a handler gets, and what feeds or drains it.

An :class:`Exchange` is made when a request head is complete. The handler answers through it
(a whole answer of autocert's own with :meth:`Exchange.respond`, or a head and body pieces as
they come), and attaches a :class:`Sink` for the request body and a :class:`Source` that the
client's flow control pauses and resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from .heads import own_response

if TYPE_CHECKING:
    from .server import HttpConnection

#: Request body bytes held for a handler that has not attached a sink yet.
EARLY_BODY_LIMIT: Final = 64 * 1024
#: Why reading from a client is paused; reading resumes when no reason is left.
PAUSE_UPSTREAM, PAUSE_PIPELINE, PAUSE_EARLY, PAUSE_UPGRADE = 1, 2, 4, 8


class Sink(Protocol):
    """Where a request body goes (the upstream connection, for the proxy)."""

    def send_body(self, data: bytes) -> None: ...
    def end_body(self) -> None: ...
    def flush(self) -> None: ...


class Source(Protocol):
    """What produces a response: paused while the client reads slowly, told when it is gone."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def client_gone(self) -> None: ...


Handler = Callable[["Exchange"], None]


class Exchange:
    """One request on a client connection, and what the handler has answered so far."""

    __slots__ = (
        "body_chunked", "close", "connection", "continue_expected", "early", "early_size", "has_body", "head_sent", "headers",
        "keep_alive",
        "method", "misdirected", "request_done", "sent", "sink", "source", "status", "target", "upgrade", "version",
    )

    def __init__(self, connection: HttpConnection, method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool, chunked: bool, length: int) -> None:
        self.connection = connection
        self.method = method
        self.target = target
        #: ``"1.1"`` or ``"1.0"``.
        self.version = version
        self.headers = headers
        #: The client wants the connection kept (llhttp's reading of version and ``Connection``).
        self.keep_alive = keep_alive
        self.body_chunked = chunked
        self.has_body = chunked or length > 0
        #: The whole request has arrived (true from the start when it has no body).
        self.request_done = not self.has_body
        #: A WebSocket upgrade the handler may accept (``Connection: upgrade``, ``Upgrade: websocket``).
        self.upgrade = False
        #: The request names another host than the TLS connection's: answered 421, never handled.
        self.misdirected = False
        #: Close the connection after this response whatever else holds.
        self.close = False
        self.sink: Sink | None = None
        #: What produces the response body (paused when the client reads slowly).
        self.source: Source | None = None
        #: The client waits for ``100 Continue`` before it sends the body (see :meth:`go_on`).
        self.continue_expected = False
        self.early: list[bytes] | None = None
        self.early_size = 0
        self.status = 0
        self.sent = 0
        self.head_sent = False

    # -- the request body ------------------------------------------------------------------------

    def attach(self, sink: Sink) -> None:
        """Send the request body to ``sink`` from now on, starting with what already arrived."""
        self.sink = sink
        if self.early:
            for chunk in self.early:
                sink.send_body(chunk)
            self.early = None
            self.early_size = 0
            self.connection.resume_reading(PAUSE_EARLY)
        if self.request_done and self.has_body:
            sink.end_body()

    def _body(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.send_body(data)
            return
        if self.early is None:
            self.early = []
        self.early.append(data)
        self.early_size += len(data)
        if self.early_size > EARLY_BODY_LIMIT:
            self.connection.pause_reading(PAUSE_EARLY)

    def go_on(self) -> None:
        """Tell a client that sent ``Expect: 100-continue`` to send its body now."""
        if self.continue_expected and not self.request_done and not self.head_sent:
            self.continue_expected = False
            self.connection.out.append(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- the response ----------------------------------------------------------------------------

    def will_close(self) -> bool:
        """Whether the connection ends after this response, as far as is known now."""
        return self.close or not self.keep_alive or not self.request_done or self.connection.server.draining

    def connection_line(self, close: bool) -> bytes:
        """The ``Connection`` line a response head needs (HTTP/1.0 clients are told to keep it)."""
        if close:
            return b"Connection: close\r\n"
        return b"Connection: keep-alive\r\n" if self.version == "1.0" else b""

    def send_head(self, head: bytes, status: int, *, close: bool) -> None:
        self.status = status
        self.head_sent = True
        if close:
            self.close = True
        self.connection.out.append(head)

    def write(self, data: bytes) -> None:
        self.sent += len(data)
        self.connection.out.append(data)

    def flush(self) -> None:
        self.connection.flush()

    def respond(self, status: int, body: bytes, *, content_type: bytes = b"text/plain; charset=utf-8",
                headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Answer with a whole response of autocert's own (see :func:`own_response`)."""
        close = self.will_close()
        head_only = self.method == b"HEAD"
        data = own_response(status, body, content_type=content_type, headers=headers, hsts=self.connection.server.hsts,
                            close=close, head_only=head_only)
        self.send_head(data, status, close=close)
        self.sent += 0 if head_only else len(body)
        self.finish()

    def finish(self) -> None:
        """The response is complete."""
        self.connection.flush()
        self.connection.exchange_done(self)

    def abort(self) -> None:
        """Drop the client connection: the response cannot be completed."""
        self.connection.flush()
        self.connection.abort()
