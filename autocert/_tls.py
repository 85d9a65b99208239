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
from collections import OrderedDict
from collections.abc import Sequence

log = logging.getLogger("autocert.tls")


def fatal_alert(description: int, version: int = 0x0303) -> bytes:
    """A fatal alert record in plaintext, as a server sends it before any TLS state exists:
    content type alert (21), the record version (TLS 1.2 unless told), length 2, level fatal
    (2), then the description."""
    return bytes([0x15, version >> 8, version & 0xFF, 0x00, 0x02, 0x02, description])


#: Alert descriptions (RFC 8446 section 6): an unknown name, and clients no handshake can
#: succeed with.
HANDSHAKE_FAILURE = 40
PROTOCOL_VERSION = 70
UNRECOGNIZED_NAME = 112

UNRECOGNIZED_NAME_ALERT = fatal_alert(UNRECOGNIZED_NAME)

DEFAULT_ALPN = ("http/1.1",)

#: The ALPN protocol a CA offers when it validates tls-alpn-01 (RFC 8737).
ACME_TLS_ALPN = "acme-tls/1"


#: TLS 1.2 suites offered: AEAD with forward secrecy only (ECDHE with AES-GCM or ChaCha20-Poly1305),
#: for ECDSA and RSA certificates alike. CBC suites are left out (LUCKY13, testssl.sh rates them
#: LOW), as is static RSA key exchange. TLS 1.3 suites are all AEAD and are not affected.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

#: The IANA code points of exactly those suites (a test holds the two together): a TLS 1.2
#: client offering none of them cannot complete a handshake here.
TLS12_SUITE_IDS = frozenset({0xC02B, 0xC02C, 0xC02F, 0xC030, 0xCCA8, 0xCCA9})



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
