"""TLS building blocks: per-host contexts built from memory, the LRU context cache, and the
asyncio fix that lets a client actually receive the ``unrecognized_name`` alert.

Nothing here touches the database or the network; the manager decides *what* to serve and
this module only knows *how* to serve it cheaply.
"""

from __future__ import annotations

import inspect
import logging
import os
import ssl
import struct
from collections import OrderedDict
from collections.abc import Sequence

log = logging.getLogger("autocert.tls")

#: The fatal ``unrecognized_name`` alert record, as a server would send it in plaintext before
#: any TLS state exists: content type alert (21), legacy version TLS 1.2, length 2, level fatal
#: (2), description unrecognized_name (112).
UNRECOGNIZED_NAME_ALERT = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70])

DEFAULT_ALPN = ("http/1.1",)

#: The ALPN protocol a CA offers when it validates tls-alpn-01 (RFC 8737).
ACME_TLS_ALPN = "acme-tls/1"


#: TLS 1.2 suites offered: AEAD with forward secrecy only (ECDHE with AES-GCM or ChaCha20-Poly1305),
#: for ECDSA and RSA certificates alike. CBC suites are left out (LUCKY13, testssl.sh rates them
#: LOW), as is static RSA key exchange. TLS 1.3 suites are all AEAD and are not affected.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def new_server_context(alpn: Sequence[str] = DEFAULT_ALPN) -> ssl.SSLContext:
    """A server context with our baseline policy (TLS 1.2+, AEAD suites, no compression, ALPN)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def build_context(chain_pem: bytes, key_pem: bytes, alpn: Sequence[str] = DEFAULT_ALPN) -> ssl.SSLContext:
    """Build a server context for one certificate without writing the key to any file.

    ``SSLContext.load_cert_chain`` only reads paths, so the key and chain go into an anonymous
    in-memory file (``memfd_create``) that is read through ``/proc/self/fd``: nothing lands on
    disk and no other user can open it.
    """
    context = new_server_context(alpn)
    fd = os.memfd_create("autocert-context", os.MFD_CLOEXEC)
    try:
        os.write(fd, key_pem.rstrip(b"\n") + b"\n" + chain_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


class ContextCache:
    """A bounded LRU map from host name to its live ``SSLContext``.

    One context costs about 24 KiB and 0.65 ms to build, so holding every certificate of a
    large deployment in memory is neither cheap nor needed: the least recently served names
    are dropped and rebuilt from the database on their next handshake.
    """

    def __init__(self, max_size: int = 10_000) -> None:
        if max_size < 1:
            raise ValueError("the context cache needs room for at least one context")
        self.max_size = max_size
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        #: The stored certificate each context was built from, so a revocation finds what to drop.
        self._certificate_ids: dict[str, int] = {}
        self.hits = 0
        self.misses = 0

    def get(self, name: str) -> ssl.SSLContext | None:
        context = self._contexts.get(name)
        if context is None:
            self.misses += 1
            return None
        self._contexts.move_to_end(name)
        self.hits += 1
        return context

    def put(self, name: str, context: ssl.SSLContext, certificate_id: int) -> None:
        self._contexts[name] = context
        self._contexts.move_to_end(name)
        self._certificate_ids[name] = certificate_id
        while len(self._contexts) > self.max_size:
            evicted, _ = self._contexts.popitem(last=False)
            self._certificate_ids.pop(evicted, None)

    def certificate_id(self, name: str) -> int | None:
        """The id of the stored certificate ``name`` is served from, if it is cached."""
        return self._certificate_ids.get(name)

    def discard(self, name: str) -> None:
        self._contexts.pop(name, None)
        self._certificate_ids.pop(name, None)

    def names(self) -> list[str]:
        return list(self._contexts)

    def __contains__(self, name: object) -> bool:
        return name in self._contexts

    def __len__(self) -> int:
        return len(self._contexts)


def _handshake_flushes_alerts() -> bool:
    """Whether this Python's asyncio already sends the alert OpenSSL writes on a failed handshake.

    CPython's ``SSLProtocol._do_handshake`` closed the transport without writing the pending
    outgoing TLS records (gh-98078), so clients saw a reset instead of ``unrecognized_name``.
    The fixed version flushes in its error branch; we look for that rather than trusting
    version numbers, which backports make unreliable.
    """
    from asyncio import sslproto

    try:
        source = inspect.getsource(sslproto.SSLProtocol._do_handshake)
    except (OSError, TypeError):
        return False
    error_branch = source.split("except ssl.SSLError", 1)
    return len(error_branch) == 2 and "_process_outgoing" in error_branch[1].split("except", 1)[0]


_alert_fix_installed = False


def install_alert_flush_fix() -> bool:
    """Make asyncio deliver the fatal alert of a failed server handshake; returns True if patched.

    Idempotent, and a no-op on a Python whose asyncio is already fixed. uvloop has its own
    TLS implementation, which this cannot change; ``serve`` avoids the problem there by
    rejecting unknown names before TLS starts.
    """
    global _alert_fix_installed
    if _alert_fix_installed:
        return True
    if _handshake_flushes_alerts():
        return False
    from asyncio import sslproto

    again_errors = sslproto.SSLAgainErrors

    def _do_handshake(self: sslproto.SSLProtocol) -> None:
        try:
            self._sslobj.do_handshake()
        except again_errors:
            self._process_outgoing()
        except ssl.SSLError as exc:
            # Write the alert record OpenSSL produced before the transport is torn down.
            self._process_outgoing()
            self._on_handshake_complete(exc)
        else:
            self._on_handshake_complete(None)

    sslproto.SSLProtocol._do_handshake = _do_handshake  # type: ignore[method-assign]
    _alert_fix_installed = True
    log.debug("installed the asyncio TLS alert flush fix")
    return True


class ClientHello:
    """What the front needs from a ClientHello: the SNI host name and the offered ALPN list."""

    __slots__ = ("alpn", "server_name")

    def __init__(self, server_name: str | None, alpn: tuple[str, ...]) -> None:
        self.server_name = server_name
        self.alpn = alpn

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
    """The ClientHello body ``b[p:end]``: skip to the extensions, read SNI and ALPN."""
    p += 34  # legacy_version, random
    if p >= end:
        raise NotClientHello("malformed ClientHello: truncated")
    p += 1 + b[p]  # legacy_session_id
    if p + 2 > end:
        raise NotClientHello("malformed ClientHello: truncated session id")
    p += 2 + (b[p] << 8 | b[p + 1])  # cipher_suites
    if p >= end:
        raise NotClientHello("malformed ClientHello: truncated cipher suites")
    p += 1 + b[p]  # legacy_compression_methods
    if p == end:
        return ClientHello(None, ())
    if p + 2 > end:
        raise NotClientHello("malformed ClientHello: truncated compression methods or extensions")
    extensions_end = p + 2 + (b[p] << 8 | b[p + 1])
    if extensions_end > end:
        raise NotClientHello("malformed ClientHello: truncated extensions")
    p += 2
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
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
        p = extension_end
    return ClientHello(server_name, alpn)


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
