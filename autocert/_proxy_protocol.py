"""PROXY protocol headers (HAProxy's specification, versions 1 and 2): written for
pass-through upstreams, and read from trusted balancers in front of ``serve``.

A pass-through upstream sees connections from autocert, not from the client. The header that
starts each upstream connection tells it the client's address and port (the source) and the
address and port the client connected to (the destination); version 2 can also carry what the
TLS layer learnt, as TLVs: the SNI name (``PP2_TYPE_AUTHORITY``) and the negotiated ALPN
protocol (``PP2_TYPE_ALPN``).

Addresses are what ``getpeername``/``getsockname`` return. An IPv4 client on a dual-stack
listener shows as an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``); it is sent as the IPv4
address it is. Anything that is not an IP pair (a UNIX socket, a peer already gone) is sent
as ``UNKNOWN`` (version 1) or ``AF_UNSPEC`` (version 2), which receivers accept and treat as
"no address".
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

__all__ = [
    "PP2_TYPE_ALPN", "PP2_TYPE_AUTHORITY", "V2_SIGNATURE", "NotProxyHeader", "is_trusted", "parse_proxy_header", "proxy_header", "starts_proxy_header",
]

#: The 12 bytes every version 2 header starts with.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: Version 2, command PROXY (the connection was relayed on behalf of the source).
_V2_PROXY: Final = 0x21
#: Address family and transport: TCP over IPv4, TCP over IPv6, unspecified.
_V2_TCP4: Final = 0x11
_V2_TCP6: Final = 0x21
_V2_UNSPEC: Final = 0x00

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02

_V1_UNKNOWN: Final = b"PROXY UNKNOWN\r\n"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def proxy_header(version: int, peer: object, local: object, *, authority: str | None = None, alpn: str | None = None) -> bytes:
    """The header for a connection from ``peer`` to ``local`` (socket address tuples).

    ``authority`` (the client's SNI name) and ``alpn`` (the protocol negotiated with it) are
    sent as TLVs in version 2; version 1 has no room for them.
    """
    pair = _address_pair(peer, local)
    if version == 1:
        if pair is None:
            return _V1_UNKNOWN
        (source, source_port), (destination, destination_port) = pair
        protocol = "TCP4" if source.version == 4 else "TCP6"
        return f"PROXY {protocol} {source} {destination} {source_port} {destination_port}\r\n".encode("ascii")
    if version != 2:
        raise ValueError(f"PROXY protocol version {version}: only 1 and 2 exist")
    if pair is None:
        family, addresses = _V2_UNSPEC, b""
    else:
        (source, source_port), (destination, destination_port) = pair
        family = _V2_TCP4 if source.version == 4 else _V2_TCP6
        addresses = source.packed + destination.packed + struct.pack(">HH", source_port, destination_port)
    tlvs = b""
    if alpn:
        tlvs += _tlv(PP2_TYPE_ALPN, alpn.encode("ascii"))
    if authority:
        tlvs += _tlv(PP2_TYPE_AUTHORITY, authority.encode("utf-8"))
    body = addresses + tlvs
    return V2_SIGNATURE + struct.pack(">BBH", _V2_PROXY, family, len(body)) + body


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack(">BH", kind, len(value)) + value


def _address_pair(peer: object, local: object) -> tuple[tuple[Address, int], tuple[Address, int]] | None:
    """Both ends as (address, port) of one IP version, or None when that cannot be said."""
    source, destination = _ip_and_port(peer), _ip_and_port(local)
    if source is None or destination is None:
        return None
    if source[0].version != destination[0].version:
        return None
    return source, destination


def _ip_and_port(address: object) -> tuple[Address, int] | None:
    if not isinstance(address, tuple) or len(address) < 2:
        return None
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # no IPv6 zone: it means nothing to the receiver
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


# -- the receiving side -----------------------------------------------------------------------

#: A version 1 header is one line of at most 107 bytes (the specification's bound).
_V1_MAX = 107
_V1_PREFIX: Final = b"PROXY "
_V2_HEADER = struct.Struct(">BBH")

Source = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NotProxyHeader(ValueError):
    """The bytes can never become a PROXY header; the connection should be dropped."""


def parse_proxy_header(data: bytes | bytearray) -> tuple[int, Source | None] | None:
    """Read the PROXY header (version 1 or 2) at the start of ``data``.

    Returns None while more bytes are needed, else the header's length and the client's
    address and port it carries (None for ``UNKNOWN``, ``LOCAL`` and address families other
    than TCP over IP: the connection is then the balancer's own). Raises
    :class:`NotProxyHeader` for anything else.
    """
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data:
        raise NotProxyHeader("no PROXY header")
    return None


def _parse_v1(data: bytes | bytearray) -> tuple[int, Source | None] | None:
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX or not _V1_PREFIX.startswith(bytes(data[:6])):
            raise NotProxyHeader("malformed PROXY v1 header")
        return None
    if not data.startswith(_V1_PREFIX):
        raise NotProxyHeader("malformed PROXY v1 header")
    fields = bytes(data[6:end]).split(b" ")
    if fields[0] == b"UNKNOWN":
        return end + 2, None
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise NotProxyHeader("malformed PROXY v1 header")
    try:
        source = ipaddress.ip_address(fields[1].decode("ascii"))
        ipaddress.ip_address(fields[2].decode("ascii"))
        port = int(fields[3])
        int(fields[4])
    except (UnicodeDecodeError, ValueError):
        raise NotProxyHeader("malformed PROXY v1 header") from None
    if source.version != (4 if fields[0] == b"TCP4" else 6) or not 0 <= port <= 65535:
        raise NotProxyHeader("malformed PROXY v1 header")
    return end + 2, (str(source), port)


def _parse_v2(data: bytes | bytearray) -> tuple[int, Source | None] | None:
    if len(data) < 16:
        if not V2_SIGNATURE.startswith(bytes(data[:12])):
            raise NotProxyHeader("malformed PROXY v2 header")
        return None
    if data[:12] != V2_SIGNATURE:
        raise NotProxyHeader("malformed PROXY v2 header")
    version_command, family, length = _V2_HEADER.unpack_from(data, 12)
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        raise NotProxyHeader("unsupported PROXY v2 version or command")
    end = 16 + length
    if len(data) < end:
        return None
    if version_command & 0x0F == 0:  # LOCAL: the balancer's own connection (a health check)
        return end, None
    if family == _V2_TCP4 and length >= 12:
        return end, (str(ipaddress.IPv4Address(bytes(data[16:20]))), data[24] << 8 | data[25])
    if family == _V2_TCP6 and length >= 36:
        return end, (str(ipaddress.IPv6Address(bytes(data[16:32]))), data[48] << 8 | data[49])
    return end, None


def starts_proxy_header(data: bytes | bytearray) -> bool | None:
    """Whether ``data`` starts with a PROXY header's signature (None: too short to tell)."""
    head = bytes(data[:12])
    if head.startswith(_V1_PREFIX) or head == V2_SIGNATURE:
        return True
    if (len(head) < 6 and _V1_PREFIX.startswith(head)) or (len(head) < 12 and V2_SIGNATURE.startswith(head)):
        return None
    return False


def is_trusted(peer: object, networks: tuple[Network, ...]) -> bool:
    """Whether a socket's peer address (as ``getpeername`` gives it) is in ``networks``."""
    found = _ip_and_port(peer)
    return found is not None and any(found[0] in network for network in networks)
