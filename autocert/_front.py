"""The ClientHello front of ``autocert serve``: reads each hello, then routes the connection.

The front reads each ClientHello before TLS starts. Knowing the name (and ALPN) up front lets
it refuse unknown names with a bare 7-byte alert, answer tls-alpn-01, await a certificate load
or a first issuance, and only then start the event loop's TLS on the same connection, with the
right context and the hello bytes replayed into it.

The event loop accepts and reads in its own (C) code: every connection starts with a small
plain protocol that collects the ClientHello as it arrives, so there is no Python accept loop,
no task and no extra peek per connection. Once the hello is complete the front picks a context
and turns the same transport into TLS by swapping in the loop's own ``SSLProtocol`` and feeding
it the bytes already read, which is what ``loop.start_tls`` does minus the coroutine.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import functools
import logging
import socket
import ssl
import struct
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from ._policy import Route
from ._proxy_protocol import Network, NotProxyHeader, Source, is_trusted, parse_proxy_header, starts_proxy_header
from ._tls import HANDSHAKE_FAILURE, PROTOCOL_VERSION, TLS12_SUITE_IDS, UNRECOGNIZED_NAME_ALERT, fatal_alert

if TYPE_CHECKING:
    from ._config import ServeOptions
    from ._descriptors import DescriptorGuard
    from ._manager import Manager

log = logging.getLogger("autocert.server")



# -- the ClientHello parser -----------------------------------------------------------------


class ClientHello:
    """What the front needs from a ClientHello: the SNI host name, the offered ALPN list, and
    for a client no handshake can succeed with (TLS 1.1 or older; TLS 1.2 without one of our
    suites) the alert record to answer it with instead of a bare close."""

    __slots__ = ("alpn", "refusal", "server_name")

    def __init__(self, server_name: str | None, alpn: tuple[str, ...], refusal: bytes | None = None) -> None:
        self.server_name = server_name
        self.alpn = alpn
        self.refusal = refusal

    def __repr__(self) -> str:
        return f"ClientHello(server_name={self.server_name!r}, alpn={self.alpn!r})"


class NotClientHello(ValueError):
    """The bytes can never become a TLS ClientHello; the connection should be dropped."""


#: Upper bound on the ClientHello we are willing to buffer (several records' worth).
MAX_CLIENT_HELLO = 64 * 1024


#: The largest TLS plaintext record (2^14) plus the slack some stacks use.
_MAX_RECORD = 16384 + 256

#: Clients put a ClientHello in one record, a few when it is large or split on purpose (some
#: anti-censorship tools do). Far more is only useful to make a server re-parse a growing
#: buffer over and over, so it is refused.
MAX_HELLO_RECORDS = 64


def parse_client_hello(data: bytes | bytearray) -> ClientHello | None:
    """Parse the TLS records at the start of a connection.

    Returns None while more bytes are needed, raises ``NotClientHello`` for anything that
    is not (the start of) a well-formed ClientHello. Handles a ClientHello split across
    several handshake records. Never raises anything else, whatever the input.

    Runs on every connection before TLS starts, so the usual case (the whole hello in one
    record) reads the bytes in place with plain indexing: no copies, no slices, no helper
    calls per field. It costs about a fifth of the general version.
    """
    size = len(data)
    if size >= 9 and data[0] == 0x16 and data[1] == 3:
        length = data[3] << 8 | data[4]
        if 4 <= length <= _MAX_RECORD and size >= 5 + length:
            if data[5] != 0x01:
                raise NotClientHello("first handshake message is not a ClientHello")
            end = 9 + (data[6] << 16 | data[7] << 8 | data[8])
            if end <= 5 + length:
                return _parse_hello_body(data, 9, end)
    return _parse_records(data)


def _parse_records(data: bytes | bytearray) -> ClientHello | None:
    """The general case: a ClientHello spread over several records, or not all here yet."""
    handshake = bytearray()
    offset = 0
    records = 0
    needed: int | None = None
    while needed is None or len(handshake) < needed:
        if records == MAX_HELLO_RECORDS:
            raise NotClientHello("ClientHello spread over too many records")
        records += 1
        if len(data) - offset < 5:
            return None
        content_type, major = data[offset], data[offset + 1]
        length = data[offset + 3] << 8 | data[offset + 4]
        if content_type != 0x16 or major != 3:
            raise NotClientHello("not a TLS handshake record")
        if length == 0 or length > _MAX_RECORD:
            raise NotClientHello("bad TLS record length")
        if len(data) - offset - 5 < length:
            return None
        handshake += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if needed is None and len(handshake) >= 4:
            if handshake[0] != 0x01:
                raise NotClientHello("first handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if needed > MAX_CLIENT_HELLO:
                raise NotClientHello("ClientHello too large")
        if offset > MAX_CLIENT_HELLO:
            raise NotClientHello("ClientHello too large")
    return _parse_hello_body(handshake, 4, needed)


def client_hello_wanted(data: bytes | bytearray) -> int:
    """How long ``data`` must grow before :func:`parse_client_hello` can tell more.

    For bytes on which the parser returned None: the end of the first incomplete record (or
    of the next record header). A reader that parses again only then does a bounded amount
    of work per connection, however the client slices its bytes into TCP segments.
    """
    offset = 0
    while len(data) - offset >= 5:
        end = offset + 5 + (data[offset + 3] << 8 | data[offset + 4])
        if end > len(data):
            return end
        offset = end
    return offset + 5


#: Type and length of an extension in one C call: the loop over a dozen or more extensions
#: is most of the parsing time.
_two_u16 = struct.Struct(">HH").unpack_from


def _parse_hello_body(b: bytes | bytearray, p: int, end: int) -> ClientHello:
    """The ClientHello body ``b[p:end]``: skip to the extensions, read SNI, ALPN and whether
    TLS 1.3 is offered; only a client without TLS 1.3 has its suites looked at."""
    version = b[p] << 8 | b[p + 1] if p + 2 <= end else 0
    p += 34  # legacy_version, random
    if p >= end:
        raise NotClientHello("malformed ClientHello: truncated")
    p += 1 + b[p]  # legacy_session_id
    if p + 2 > end:
        raise NotClientHello("malformed ClientHello: truncated session id")
    suites = p + 2
    p += 2 + (b[p] << 8 | b[p + 1])  # cipher_suites
    if p >= end:
        raise NotClientHello("malformed ClientHello: truncated cipher suites")
    suites_end = p
    p += 1 + b[p]  # legacy_compression_methods
    if p == end:
        return ClientHello(None, (), _refusal(b, version, suites, suites_end))
    if p + 2 > end:
        raise NotClientHello("malformed ClientHello: truncated compression methods or extensions")
    extensions_end = p + 2 + (b[p] << 8 | b[p + 1])
    if extensions_end > end:
        raise NotClientHello("malformed ClientHello: truncated extensions")
    p += 2
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    tls13 = False
    while p < extensions_end:
        if p + 4 > extensions_end:
            raise NotClientHello("malformed ClientHello: truncated extension")
        extension_type, extension_size = _two_u16(b, p)
        extension_end = p + 4 + extension_size
        if extension_end > extensions_end:
            raise NotClientHello("malformed ClientHello: truncated extension")
        if extension_type == 0:  # server_name: the first host_name entry
            names_end = _vector_end(b, p + 4, extension_end)
            entry = p + 6
            while entry < names_end:
                host_end = _vector_end(b, entry + 1, names_end)
                if b[entry] == 0:
                    server_name = _decode_host(bytes(b[entry + 3 : host_end]))
                    break
                entry = host_end
        elif extension_type == 16:  # application_layer_protocol_negotiation
            alpn = _alpn(b, p + 4, extension_end)
        elif extension_type == 43:  # supported_versions
            tls13 = _offers_tls13(b, p + 4, extension_end)
        p = extension_end
    return ClientHello(server_name, alpn, None if tls13 else _refusal(b, version, suites, suites_end))


def _offers_tls13(b: bytes | bytearray, p: int, end: int) -> bool:
    """Whether a supported_versions list (one length octet, then two-octet versions) holds TLS 1.3."""
    if p >= end:
        raise NotClientHello("malformed ClientHello: truncated supported_versions")
    versions_end = min(p + 1 + b[p], end)
    return any(b[q] == 0x03 and b[q + 1] == 0x04 for q in range(p + 1, versions_end - 1, 2))


def _refusal(b: bytes | bytearray, version: int, suites: int, suites_end: int) -> bytes | None:
    """For a client without TLS 1.3: the alert it gets when it offers nothing we speak
    (protocol_version below TLS 1.2, handshake_failure without a shared suite), else None."""
    if version < 0x0303:
        return fatal_alert(PROTOCOL_VERSION, max(version, 0x0301))
    for q in range(suites, suites_end - 1, 2):
        if (b[q] << 8 | b[q + 1]) in TLS12_SUITE_IDS:
            return None
    return fatal_alert(HANDSHAKE_FAILURE)


def _vector_end(b: bytes | bytearray, p: int, end: int) -> int:
    """End of the 16-bit-length-prefixed vector at ``p``, which must fit before ``end``."""
    if p + 2 > end:
        raise NotClientHello("malformed ClientHello: truncated length")
    vector_end = p + 2 + (b[p] << 8 | b[p + 1])
    if vector_end > end:
        raise NotClientHello("malformed ClientHello: truncated vector")
    return vector_end


def _alpn(b: bytes | bytearray, p: int, end: int) -> tuple[str, ...]:
    protocols_end = _vector_end(b, p, end)
    p += 2
    found = []
    while p < protocols_end:
        protocol_end = p + 1 + b[p]
        if protocol_end > protocols_end:
            raise NotClientHello("malformed ClientHello: truncated protocol name")
        found.append(bytes(b[p + 1 : protocol_end]).decode("ascii", "replace"))
        p = protocol_end
    return tuple(found)


def _decode_host(raw: bytes) -> str | None:
    """SNI host names are ASCII (A-labels); anything else cannot match an allowed name."""
    try:
        host = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    host = host.rstrip(".").lower()
    return host or None


# -- the front ------------------------------------------------------------------------------


class TlsFront:
    """Accepts TLS connections and routes each one by its ClientHello.

    Every connection starts as a :class:`_HelloReader` (see the module docstring); a
    hand-off through ``sock_accept``, a task and ``connect_accepted_socket`` instead cost
    about 8% more CPU per handshake (``bench/``).

    Only names that need waiting (a database load, a first issuance, a new challenge
    certificate) get a task; their transport stops reading meanwhile.
    """

    def __init__(self, manager: Manager, protocol_factory: Callable[[str], asyncio.BaseProtocol], options: ServeOptions,
                 guard: DescriptorGuard | None = None) -> None:
        self._manager = manager
        #: Each new connection is admitted against the open-file limit (see _descriptors).
        self.guard = guard
        if guard is not None:
            guard.shedders.append(self._shed_silent)
        self._protocol_factory = protocol_factory
        self._options = options
        self._connections: set[asyncio.Task[None]] = set()
        # Connections still waiting for their ClientHello, in two generations: every half
        # hello_timeout the older one is aborted, so one timer serves every connection.
        self._young: set[_HelloReader] = set()
        self._old: set[_HelloReader] = set()
        #: Each connection's application protocol while its TLS handshake may be under way, with
        #: the plain transport under it: a shutdown lets those handshakes finish (see settle).
        self._handshakes: weakref.WeakKeyDictionary[asyncio.BaseProtocol, asyncio.Transport] = weakref.WeakKeyDictionary()
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ssl_protocol: Callable[..., asyncio.BufferedProtocol] = asyncio.sslproto.SSLProtocol
        #: Balancers whose connections start with a PROXY header (none: no connection may).
        self.trusted_proxies = options.trusted_proxies

    async def serve(self, listeners: Sequence[socket.socket]) -> None:
        """Accept on every socket of ``listeners`` until cancelled."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ssl_protocol = ssl_protocol_class(loop)
        reader = _ProxiedHelloReader if self.trusted_proxies else _HelloReader
        servers: list[asyncio.Server] = []
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        try:
            for listener in listeners:
                servers.append(await loop.create_server(functools.partial(reader, self), sock=listener, backlog=1024))
            await asyncio.gather(*(server.serve_forever() for server in servers))
        finally:
            for server in servers:
                server.close()

    def _unsettled(self) -> bool:
        """Whether a connection already accepted is still before or inside its handshake."""
        if self._young or self._old or self._connections:
            return True
        return any(getattr(application, "transport", None) is None and not transport.is_closing()
                   for application, transport in list(self._handshakes.items()))

    async def settle(self, timeout: float) -> None:
        """Shutdown, once accepting has stopped: let the connections already accepted send their
        ClientHello, get their certificate and finish their handshake (each within its own
        bound, and all within ``timeout``), so that a restart or a worker replacement fails
        none of them. Their application then serves them as a draining server does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._unsettled() and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for reader in [*self._young, *self._old]:
            reader.abort()
        self._young.clear()
        self._old.clear()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _sweep(self) -> None:
        """Drop connections that have not sent a complete ClientHello in time."""
        period = max(self._options.hello_timeout / 2, 0.01)
        while True:
            await asyncio.sleep(period)
            stale, self._old, self._young = self._old, self._young, set()
            for reader in stale:
                reader.abort()

    def _shed_silent(self, count: int) -> int:
        """Close up to ``count`` connections still waiting for their ClientHello, older ones first."""
        closed = 0
        for generation in (self._old, self._young):
            while generation and closed < count:
                generation.pop().abort()
                closed += 1
        return closed

    def _done_waiting(self, reader: _HelloReader) -> None:
        self._young.discard(reader)
        self._old.discard(reader)

    def _hello_received(self, reader: _HelloReader, transport: asyncio.Transport, hello: ClientHello, data: bytes) -> None:
        """Route on the memory-only fast path; start a task only when something must be awaited."""
        if hello.refusal is not None:  # TLS 1.1 or older, or no suite in common: say so
            self._reject(transport, hello.refusal)
            return
        local = None if hello.server_name is not None else _local_address(transport)
        route, name, context = self._manager.route(hello.server_name, hello.alpn, local)
        if context is not None:
            self._start_tls(transport, context, data, name, reader.source)
            return
        if route is Route.REFUSE or route is Route.HELD:
            self._reject(transport)
            return
        transport.pause_reading()
        assert self._loop is not None
        task = self._loop.create_task(self._route_later(reader, transport, route, name, data))
        reader.task = task
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _route_later(self, reader: _HelloReader, transport: asyncio.Transport, route: Route, name: str, data: bytes) -> None:
        try:
            if route is Route.CHALLENGE:
                context = await self._manager.challenges.context(name)
            elif route is Route.ASK and not await self._manager.may_serve(name):
                context = None  # counted as asked
            else:
                context = await self._manager.context_for(name, wait=self._options.first_contact_wait)
                self._manager.handshakes["served" if context is not None else "pending"] += 1
        except Exception:
            log.exception("could not pick a certificate for %s", name)
            context = None
        reader.task = None
        if transport.is_closing():
            return
        if context is None:
            self._reject(transport)
            return
        self._start_tls(transport, context, data, name, reader.source)
        transport.resume_reading()

    def _start_tls(self, transport: asyncio.Transport, context: ssl.SSLContext, data: bytes, name: str,
                   source: Source | None = None) -> None:
        """Turn the plain transport into TLS, replaying the ClientHello bytes already read.

        ``name``, the name the connection was routed by, goes to the application's protocol:
        HTTP holds each request's host to it, pass-through puts it in the PROXY header.
        ``source`` is the client's address a trusted balancer's PROXY header carried.
        """
        application = self._protocol_factory(name)
        if source is not None:
            self._carry(application, source)
        self._handshakes[application] = transport
        tls = self._ssl_protocol(
            self._loop, application, context, None,
            server_side=True, ssl_handshake_timeout=self._options.handshake_timeout,
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        view = memoryview(data)
        while view and not transport.is_closing():
            buffer = cast(memoryview, tls.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            tls.buffer_updated(size)
            view = view[size:]

    @staticmethod
    def _carry(application: asyncio.BaseProtocol, source: Source) -> None:
        """Tell the connection's application the client's address from a PROXY header."""
        application.peer = source[0]  # type: ignore[attr-defined]

    @staticmethod
    def _reject(transport: asyncio.Transport, alert: bytes = UNRECOGNIZED_NAME_ALERT) -> None:
        """Send a fatal alert (unrecognized_name unless told otherwise) in plaintext and close.

        The whole ClientHello has been read by now, so closing does not make the kernel send
        a reset that could overtake the alert.
        """
        transport.write(alert)
        transport.close()


class _HelloReader(asyncio.Protocol):
    """A connection's first protocol: collects the ClientHello, then hands over to the front."""

    __slots__ = ("_data", "_front", "_transport", "_wanted", "task")

    #: The client's address from a PROXY header (see :class:`_ProxiedHelloReader`).
    source: Source | None = None

    def __init__(self, front: TlsFront) -> None:
        self._front = front
        self._transport: asyncio.Transport | None = None
        self._data: bytes | bytearray = b""
        self._wanted = 0  # parse again only once this many bytes are here
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        front = self._front
        if front.guard is not None and not front.guard.admit(transport):
            self.abort()
            return
        front._young.add(self)

    def data_received(self, data: bytes | bytearray) -> None:
        if self._data:
            # A hello in several segments: grow one buffer, and parse only when a record
            # is complete, so a client sending bytes one by one cannot make this quadratic.
            self._data += data
            data = self._data
            if len(data) < self._wanted:
                return
        try:
            hello = parse_client_hello(data)
        except NotClientHello as exc:
            log.debug("dropping a connection that is not TLS: %s", exc)
            self.abort()
            return
        if hello is None:
            if len(data) > MAX_CLIENT_HELLO + 5:
                self.abort()
                return
            if not self._data:
                self._data = bytearray(data)
            self._wanted = client_hello_wanted(data)
            return
        self._data = b""
        self._front._done_waiting(self)
        self._front._hello_received(self, self._transport, hello, data)  # type: ignore[arg-type]

    def eof_received(self) -> bool | None:
        return None  # closed before a complete ClientHello: nothing to answer

    def connection_lost(self, exc: Exception | None) -> None:
        self._front._done_waiting(self)
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _ProxiedHelloReader(_HelloReader):
    """The first protocol of a listener behind trusted balancers: from them a PROXY header
    must come before the ClientHello; from anyone else it is refused (a ClientHello must
    come first, and a header is no ClientHello). Bounded by the same hello timeout."""

    __slots__ = ("_awaiting_header", "source")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.source = None
        self._awaiting_header = is_trusted(transport.get_extra_info("peername"), self._front.trusted_proxies)

    def data_received(self, data: bytes | bytearray) -> None:
        if self._awaiting_header:
            buffered = self._data + data if self._data else data
            try:
                parsed = parse_proxy_header(buffered)
            except NotProxyHeader as exc:
                log.debug("dropping a connection from a trusted proxy: %s", exc)
                self.abort()
                return
            if parsed is None:
                self._data = bytearray(buffered)
                return
            length, self.source = parsed
            self._awaiting_header = False
            self._data = b""
            data = bytes(buffered[length:])
            if not data:
                return
        super().data_received(data)


class ProxyHeaderReader(asyncio.Protocol):
    """The first protocol of a plain listener behind trusted balancers: from them it reads the
    PROXY header, from anyone else it refuses one, then hands the connection to the protocol
    ``factory`` makes, with the carried address as its ``peer``. A connection that has not
    got that far within ``timeout`` seconds is dropped."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], trusted: tuple[Network, ...], timeout: float) -> None:
        self._factory = factory
        self._trusted = trusted
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._data = bytearray()
        self._required = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._required = is_trusted(transport.get_extra_info("peername"), self._trusted)
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._transport.abort)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._data += data
        try:
            if self._required:
                parsed = parse_proxy_header(self._data)
                if parsed is None:
                    return
                length, source = parsed
            else:
                claimed = starts_proxy_header(self._data)
                if claimed is None:
                    return
                if claimed:
                    raise NotProxyHeader("a PROXY header from a peer not trusted to send one")
                length, source = 0, None
        except NotProxyHeader as exc:
            log.debug("dropping a connection: %s", exc)
            self._transport.abort()
            return
        self._hand_over(length, source)

    def _hand_over(self, length: int, source: Source | None) -> None:
        assert self._transport is not None
        if self._timer is not None:
            self._timer.cancel()
        application = self._factory()
        if source is not None:
            application.peer = source[0]  # type: ignore[attr-defined]
        self._transport.set_protocol(application)
        application.connection_made(self._transport)
        rest = bytes(self._data[length:])
        self._data = bytearray()
        if rest and not self._transport.is_closing():
            application.data_received(rest)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _local_address(transport: asyncio.Transport) -> str | None:
    """The address a client connected to: for a client without SNI, the name it asks for."""
    sockname = transport.get_extra_info("sockname")
    return sockname[0] if isinstance(sockname, tuple) else None


def ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Callable[..., asyncio.BufferedProtocol]:
    """The running loop's own TLS protocol: uvloop's reads straight into OpenSSL's buffer."""
    if type(loop).__module__.startswith("uvloop"):
        with contextlib.suppress(ImportError, AttributeError):
            from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]

            return SSLProtocol  # type: ignore[no-any-return]
    return asyncio.sslproto.SSLProtocol
