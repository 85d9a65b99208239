"""TLS pass-through: ``autocert serve --upstream tcp://HOST:PORT``.

The front terminates TLS as usual; the application protocol it swaps in is :class:`_Client`,
which opens one TCP connection to the upstream and then copies bytes both ways as they come,
``transport.write(data)`` straight across, whatever the protocol inside (HTTP/1.1, h2c, gRPC,
WebSocket, a database). Nothing is parsed and no object is made per chunk beyond the bytes
the transports hand over.

- **Backpressure** both ways: when one side's write buffer is full (``pause_writing``), the
  other side stops reading until it drains (``resume_writing``).
- **Half-close** is passed on: EOF from one side becomes ``write_eof`` on the other where
  that transport can half-close (TCP). TLS cannot (the event loops shut the TLS session down
  on the peer's EOF), so EOF towards the client closes it once its buffer has drained.
- **Idle bound**: a connection that passes no bytes either way for ``idle_timeout`` seconds
  is closed. Activity is a flag set per chunk, read by one timer per connection a few times
  per bound; no clock is read per chunk.
- An **unreachable upstream** closes the client connection after the handshake, with one
  log line.
- With ``proxy_protocol``, every upstream connection starts with a PROXY protocol header
  (:mod:`autocert._proxy_protocol`) naming the client, the SNI name and the ALPN protocol.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, cast

from ._front import TlsFront
from ._proxy_protocol import Source, proxy_header
from ._tls import ACME_TLS_ALPN

if TYPE_CHECKING:
    from ._config import Listen, ServeOptions
    from ._descriptors import DescriptorGuard
    from ._manager import Manager

__all__ = ["PassthroughFront"]

log = logging.getLogger("autocert.passthrough")

#: Seconds the upstream may take to accept a connection before the client is let go.
CONNECT_TIMEOUT: Final = 10.0
#: The idle bound is checked this many times over its length, so a connection is closed
#: after between 1 and 1 + 1/IDLE_CHECKS times the bound without bytes.
IDLE_CHECKS: Final = 5


class PassthroughFront(TlsFront):
    """The ClientHello front whose connections, once TLS is up, are relayed to ``upstream``."""

    def __init__(self, manager: Manager, options: ServeOptions, upstream: Listen, guard: DescriptorGuard | None = None) -> None:
        super().__init__(manager, self._new_client, options, guard)
        self.upstream = upstream
        self.proxy_protocol = options.proxy_protocol
        self.idle_timeout = options.idle_timeout
        self.shutdown_timeout = options.shutdown_timeout
        #: Relays with a client connection up, so that shutdown can wait for them and end them.
        self.relays: set[_Client] = set()

    @staticmethod
    def _carry(application: asyncio.BaseProtocol, source: Source) -> None:
        cast(_Client, application).source = source

    def _new_client(self, name: str) -> _Client:
        return _Client(self, name)

    async def close(self) -> None:
        """Stop routing, let relays end on their own for up to ``shutdown_timeout``, then cut them."""
        await super().close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        while self.relays and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for relay in list(self.relays):
            relay.abort()


class _Sink:
    """What a side writes to while it has no live partner: before the upstream connects,
    chunks are kept (reading is paused by then, so at most one read's worth); once the other
    side is gone, they are dropped."""

    __slots__ = ("chunks", "eof")

    def __init__(self, keep: bool) -> None:
        self.chunks: list[bytes] | None = [] if keep else None
        self.eof = False

    def write(self, data: bytes) -> None:
        if self.chunks is not None:
            self.chunks.append(data)

    def write_eof(self) -> None:
        self.eof = True

    def can_write_eof(self) -> bool:
        return self.chunks is not None

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    resume_reading = close = abort = pause_reading


_GONE: Final = _Sink(keep=False)


class _Side(asyncio.Protocol):
    """One end of a relay: what it reads from its transport goes to ``other``, the transport
    of the other end (``peer``)."""

    __slots__ = ("active", "eof", "other", "peer", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: asyncio.Transport | _Sink = _GONE
        self.peer: _Side | None = None
        self.active = False  # bytes arrived since the idle check last looked
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.active = True
        self.other.write(data)

    def pause_writing(self) -> None:
        self.other.pause_reading()

    def resume_writing(self) -> None:
        self.other.resume_reading()

    def eof_received(self) -> bool:
        """Pass the EOF on; keep this transport open only while it still has bytes to send
        and can half-close."""
        self.eof = True
        other = self.other
        if not other.can_write_eof():
            _close(other)  # a TLS client: it gets the rest of its bytes, then close_notify
            return False
        other.write_eof()
        if self.peer is not None and self.peer.eof:
            _close(other)  # both ways are done
            return False
        assert self.transport is not None
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        other, self.other = self.other, _GONE
        if self.peer is not None:
            self.peer.other = _GONE  # what the other end still reads has nowhere to go
        _close(other)  # it still gets what was written to it

    def abort(self) -> None:
        """Cut this end at once, unsent bytes included."""
        if self.transport is not None:
            self.transport.abort()

    def end(self) -> None:
        """Close this end: gracefully unless its bytes are stuck (then nothing would drain them)."""
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            _close(transport)


def _close(transport: asyncio.Transport | _Sink) -> None:
    """Close once what was written has gone out. Reading resumes first: asyncio's TLS
    transport, paused when the client's EOF arrives, would otherwise wait for ever for the
    application to read on before it finishes closing. A transport already closing (or
    gone: asyncio's TLS one then has no protocol left to resume) is left alone."""
    if not transport.is_closing():
        transport.resume_reading()
        transport.close()


class _Client(_Side):
    """The client end, the application protocol under the loop's TLS; it runs the relay."""

    __slots__ = ("__weakref__", "connecting", "front", "idle_checks", "name", "source", "timer")

    def __init__(self, front: PassthroughFront, name: str) -> None:
        super().__init__()
        self.front = front
        self.name = name
        self.connecting: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.idle_checks = 0
        #: The client's address from a trusted balancer's PROXY header, passed on in ours.
        self.source: Source | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if alpn == ACME_TLS_ALPN:
            transport.close()  # a tls-alpn-01 validation has nothing for the upstream
            return
        transport.pause_reading()  # until the upstream is there
        self.other = _Sink(keep=True)
        front = self.front
        front.relays.add(self)
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(self._connect(alpn))
        if front.idle_timeout > 0:
            self.timer = loop.call_later(front.idle_timeout / IDLE_CHECKS, self._check_idle)

    async def _connect(self, alpn: str | None) -> None:
        front, transport = self.front, self.transport
        assert transport is not None
        header = b""
        if front.proxy_protocol is not None:
            header = proxy_header(front.proxy_protocol, self.source or transport.get_extra_info("peername"), transport.get_extra_info("sockname"),
                                  authority=self.name or None, alpn=alpn)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(lambda: _Upstream(self, header), front.upstream.host, front.upstream.port)
        except (OSError, TimeoutError) as exc:
            reason = f"no connection within {CONNECT_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            log.warning("%s: upstream %s unreachable (%s); closed the client connection", self.name, front.upstream, reason)
            self.other = _GONE
            _close(transport)
        finally:
            self.connecting = None

    def _check_idle(self) -> None:
        peer = self.peer
        if self.active or (peer is not None and peer.active):
            self.active = False
            if peer is not None:
                peer.active = False
            self.idle_checks = 0
        else:
            self.idle_checks += 1
            if self.idle_checks >= IDLE_CHECKS:
                log.debug("%s: no bytes either way for %g s; closing", self.name, self.front.idle_timeout)
                self.timer = None
                self.end()
                if peer is not None:
                    peer.end()
                return
        self.timer = asyncio.get_running_loop().call_later(self.front.idle_timeout / IDLE_CHECKS, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.front.relays.discard(self)
        if self.connecting is not None:
            self.connecting.cancel()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def abort(self) -> None:
        super().abort()
        if self.peer is not None:
            self.peer.abort()


class _Upstream(_Side):
    """The upstream end: writes the PROXY header and what the client sent while it connected."""

    __slots__ = ("client", "header")

    def __init__(self, client: _Client, header: bytes) -> None:
        super().__init__()
        self.client = client
        self.header = header

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        client = self.client
        early = client.other
        client_transport = client.transport
        assert isinstance(early, _Sink) and client_transport is not None
        if early.chunks is None or client_transport.is_closing():
            transport.close()  # the client is already gone
            return
        transport.writelines([self.header, *early.chunks] if self.header else early.chunks)
        self.peer, client.peer = client, self
        self.other, client.other = client_transport, transport
        if early.eof:
            client.eof_received()  # the client half-closed while this connected: pass it on
        client_transport.resume_reading()
