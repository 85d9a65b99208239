"""Message heads as bytes: hop-by-hop rules, forwarding headers, and autocert's own answers.

Header sections stay bytes from the parser to the socket. A head is rebuilt once, in one pass
over the parsed ``(name, value)`` pairs, and joined into one ``bytes`` object: no header
dictionaries, no text decoding on the way through.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

Headers = list[tuple[bytes, bytes]]

#: Headers that belong to one connection (RFC 9110 section 7.6.1), plus ``Proxy-Connection``.
#: Any header whose name starts with ``proxy-`` is dropped as well: that family is meant for a
#: forward proxy and must never reach an application (``Proxy-Authorization``) or a visitor
#: (``Proxy-Authenticate``).
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
#: ``Connection`` options that name no header.
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})

HSTS: Final = b"max-age=31536000"

#: Sent with every answer autocert writes itself: no ``Server`` banner, and browsers must not
#: guess a type other than the one given.
OWN_HEADERS: Final = b"X-Content-Type-Options: nosniff\r\n"

_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed in ``Connection`` (lower case): hop-by-hop for this message only."""
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
        if token.strip()
    }


def strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]], *, drop: Iterable[bytes] = ()) -> Headers:
    """A copy without hop-by-hop headers, the ones ``Connection`` names and those in ``drop``."""
    named = connection_tokens(headers) | set(drop)
    return [
        (name, value)
        for name, value in headers
        if (lower := name.lower()) not in HOP_BY_HOP and lower not in named and not lower.startswith(b"proxy-")
    ]


def named_by_connection(value: bytes) -> set[bytes]:
    """The header names one ``Connection`` value lists, less the options that name none."""
    return {token for part in value.split(b",") if (token := part.strip().lower())} - _CONNECTION_OPTIONS


# -- where a request came from ----------------------------------------------------------------


def unmapped(address: str) -> str:
    """An address as the client has it: on a dual-stack listener an IPv4 client shows as
    ``::ffff:192.0.2.1``, which logs, ``X-Forwarded-For`` and ``Location`` give as ``192.0.2.1``."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def forwarded_node(remote: str | None) -> bytes:
    """RFC 7239 node syntax: IPv6 in brackets and quoted, unknown peers as ``unknown``."""
    if not remote:
        return b"unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return forwarded_value(remote.encode("latin-1", "replace"))
    return f'"[{address}]"'.encode() if address.version == 6 else str(address).encode()


def forwarded_value(value: bytes) -> bytes:
    """A token as is, anything else as a quoted-string (``host:port`` needs quoting)."""
    if _TOKEN.fullmatch(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class Origin:
    """What the upstream is told about one client address, worked out once (see :meth:`of`)."""

    __slots__ = ("address", "node")

    def __init__(self, remote: str | None) -> None:
        #: The client's address for ``X-Forwarded-For`` and ``X-Real-IP`` (None: unknown).
        self.address = remote.encode("latin-1", "replace") if remote else None
        #: Its RFC 7239 ``for=`` node.
        self.node = forwarded_node(remote)

    @classmethod
    def of(cls, remote: str | None) -> Origin:
        """The origin of ``remote``, from a small cache: clients come back from the same address."""
        origin = _ORIGINS.get(remote)
        if origin is None:
            if len(_ORIGINS) >= 4096:
                _ORIGINS.clear()
            origin = _ORIGINS[remote] = cls(remote)
        return origin


_ORIGINS: dict[str | None, Origin] = {}


#: What happens to each request header on its way upstream: 1 dropped, 2 replaced by ours, and
#: the ones merged with ours (``X-Forwarded-For``, ``Forwarded``) or read (``Host``).
_DROP, _REPLACE, _XFF, _FORWARDED, _HOST, _CONNECTION = 1, 2, 3, 4, 5, 6
_REQUEST_RULES: Final = {
    **{name: _DROP for name in HOP_BY_HOP},
    # Answered here already (100-continue); forwarding it makes some upstreams wait for a
    # second one they never send.
    b"expect": _DROP,
    # CGI-style apps turn it into HTTP_PROXY and send their own requests through it (httpoxy).
    b"proxy": _DROP,
    b"x-real-ip": _REPLACE,
    b"x-forwarded-proto": _REPLACE,
    b"x-forwarded-host": _REPLACE,
    b"x-forwarded-for": _XFF,
    b"forwarded": _FORWARDED,
    b"host": _HOST,
    b"connection": _CONNECTION,
}


def forwarded_headers(headers: Sequence[tuple[bytes, bytes]], origin: Origin, *, proto: bytes = b"https") -> Headers:
    """The request headers the upstream gets: end-to-end ones plus where the request came from.

    The client's own ``Host`` is kept. ``X-Forwarded-For`` and ``Forwarded`` are appended to;
    ``X-Real-IP``, ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are replaced, so a client can
    never set them. Hop-by-hop headers, the ones ``Connection`` names, ``Proxy``, ``Proxy-*``
    and ``Expect`` are dropped.
    """
    kept: Headers = []
    host: bytes | None = None
    earlier_for: list[bytes] = []
    earlier_forwarded: list[bytes] = []
    named: set[bytes] | None = None
    rules = _REQUEST_RULES
    for name, value in headers:
        lower = name.lower()
        rule = rules.get(lower)
        if rule is None:
            if not lower.startswith(b"proxy-"):
                kept.append((name, value))
        elif rule == _HOST:
            host = value
            kept.append((name, value))
        elif rule == _XFF:
            earlier_for.append(value)
        elif rule == _FORWARDED:
            earlier_forwarded.append(value)
        elif rule == _CONNECTION:
            tokens = named_by_connection(value)
            if tokens:
                named = tokens if named is None else named | tokens
    if named:
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    address = origin.address
    if address is not None:
        kept.append((b"X-Forwarded-For", b", ".join([*earlier_for, address]) if earlier_for else address))
        # Apps set up for nginx often trust X-Real-IP; a client must not be able to set it.
        kept.append((b"X-Real-IP", address))
    elif earlier_for:
        kept.append((b"X-Forwarded-For", b", ".join(earlier_for)))
    kept.append((b"X-Forwarded-Proto", proto))
    element = b"for=" + origin.node
    if host is not None:
        kept.append((b"X-Forwarded-Host", host))
        element += b";host=" + forwarded_value(host)
    element += b";proto=" + proto
    kept.append((b"Forwarded", b", ".join([*earlier_forwarded, element]) if earlier_forwarded else element))
    return kept


def response_headers(headers: Sequence[tuple[bytes, bytes]], *, upgrade: bool = False) -> tuple[Headers, bool, bool]:
    """An upstream response's end-to-end headers, and whether it set a ``Date`` and HSTS.

    ``upgrade`` keeps ``Connection`` and ``Upgrade`` (a 101 switching to WebSocket needs both).
    """
    kept: Headers = []
    has_date = has_hsts = False
    named: set[bytes] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower.startswith(b"proxy-"):
            if lower == b"connection":
                tokens = named_by_connection(value)
                if tokens:
                    named = tokens if named is None else named | tokens
            if not upgrade or lower not in (b"connection", b"upgrade"):
                continue
        elif lower == b"date":
            has_date = True
        elif lower == b"strict-transport-security":
            has_hsts = True
        kept.append((name, value))
    if named:
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept, has_date, has_hsts


def join_head(first_line: bytes, headers: Iterable[tuple[bytes, bytes]], extra: bytes = b"") -> bytes:
    """``first_line`` (CRLF included), the header lines, ``extra`` (whole lines) and the blank line."""
    parts = [first_line]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(extra)
    parts.append(b"\r\n")
    return b"".join(parts)


# -- autocert's own answers -------------------------------------------------------------------


_PHRASES: Final = {status.value: status.phrase.encode() for status in HTTPStatus}
_date_second = 0
_date_line = b""


def date_line() -> bytes:
    """``Date: ...\\r\\n`` for now, formatted at most once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_line


def status_line(status: int, reason: bytes | None = None) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _PHRASES.get(status, b"Unknown") if reason is None else reason)


def own_response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
    headers: Iterable[tuple[bytes, bytes]] = (),
    hsts: bool = False,
    close: bool = False,
    head_only: bool = False,
) -> bytes:
    """A whole response autocert writes itself: no ``Server`` banner, ``nosniff``, optional HSTS."""
    extra = [date_line(), OWN_HEADERS, b"Content-Type: ", content_type, b"\r\nContent-Length: %d\r\n" % len(body)]
    if hsts:
        extra.append(b"Strict-Transport-Security: " + HSTS + b"\r\n")
    if close:
        extra.append(b"Connection: close\r\n")
    head = join_head(status_line(status), headers, b"".join(extra))
    return head if head_only else head + body


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


def error_body(status: int, detail: str) -> bytes:
    """A small page of our own: the client learns what failed, never where the upstream is."""
    return _ERROR_PAGE.format(status=status, reason=HTTPStatus(status).phrase, detail=detail).encode()
