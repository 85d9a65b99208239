"""PROXY protocol headers (HAProxy's specification, versions 1 and 2), as a sender writes them.

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

__all__ = ["PP2_TYPE_ALPN", "PP2_TYPE_AUTHORITY", "V2_SIGNATURE", "proxy_header"]

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
