"""Host name normalisation: the single definition of "the same name" across autocert.

Every name that reaches the allowlist, the database, the SNI cache or the CA goes through
:func:`normalize_name` (or :func:`normalize_entry` for allowlist patterns) first. Doing it in
one place is what makes ``Bücher.Example.`` in a command line, ``xn--bcher-kva.example`` in a
ClientHello and the row in the database compare equal, and what keeps input the CA would
refuse (wildcards, over-long labels, malformed addresses) from ever becoming an order.

A "name" may also be an IP address (RFC 8738): it is kept in one canonical spelling
(:func:`normalize_address`), so ``2001:DB8:0::1`` on a command line, the address a client
connected to and the row in the database compare equal as well.
"""

from __future__ import annotations

import functools
import ipaddress

import idna

from autocert._errors import InvalidName

__all__ = [
    "address_of_reverse_name",
    "address_of_socket",
    "is_address",
    "is_host_name",
    "is_pattern",
    "normalize_address",
    "normalize_entry",
    "normalize_name",
    "pattern_for",
]

PATTERN_PREFIX = "*."
MAX_NAME_OCTETS = 253
MAX_LABEL_OCTETS = 63
# Anything much longer than a DNS name cannot shrink to one (UTS 46 only drops a few
# ignorable code points); refusing it early keeps hostile input from costing CPU.
_MAX_RAW_CHARS = 1024

_WILDCARD_REASON = "a wildcard is allowed only as the whole first label of a pattern, as in *.example.com"


def normalize_name(raw: str) -> str:
    """Return the canonical A-label form of a host name, or raise :class:`InvalidName`.

    The result is what the CA will put in the certificate and what clients send in SNI:
    IDNA 2008 A-labels after UTS 46 mapping (non-transitional, so ``ß`` stays distinct),
    lower case, without the trailing root dot. Single-label names such as ``localhost`` are
    accepted because private CAs issue for them; public CAs refuse them on their own.
    An IP address is a name too, in the form :func:`normalize_address` gives it.
    """
    if not isinstance(raw, str):
        raise InvalidName(repr(raw), "a host name must be a string")
    text = raw.strip()
    if not text:
        raise InvalidName(raw, "empty name")
    if len(text) > _MAX_RAW_CHARS:
        raise InvalidName(raw, f"name is over the {MAX_NAME_OCTETS}-octet limit")
    if "*" in text:
        raise InvalidName(raw, "a wildcard is not a host name (patterns like *.example.com belong in the allowlist)")
    if _looks_like_address(text):
        return normalize_address(raw)

    try:
        mapped = idna.uts46_remap(text, std3_rules=False, transitional=False)
    except idna.IDNAError as exc:
        raise InvalidName(raw, f"character outside IDNA: {exc}") from None
    mapped = mapped.removesuffix(".")
    if not mapped:
        raise InvalidName(raw, "empty name")

    labels = mapped.split(".")
    if any(not label for label in labels):
        raise InvalidName(raw, "empty label (a leading dot or two dots in a row)")
    a_labels = [_a_label(raw, label) for label in labels]
    if a_labels[-1].isdigit():
        raise InvalidName(raw, "numeric last label: looks like an IPv4 address, not a DNS name")

    name = ".".join(a_labels)
    if len(name) > MAX_NAME_OCTETS:
        raise InvalidName(raw, f"name is {len(name)} octets, over the {MAX_NAME_OCTETS}-octet limit")
    return name


def normalize_entry(raw: str) -> str:
    """Normalise an allowlist entry: a host name, or ``*.base`` covering one label under base.

    Patterns need a base of at least two labels so that nobody allows a whole top-level
    domain (``*.com``) by mistake; the base is normalised exactly like a host name so that
    :func:`autocert._policy.is_allowed` can compare strings.
    """
    if not isinstance(raw, str):
        raise InvalidName(repr(raw), "an allowlist entry must be a string")
    text = raw.strip()
    if not text.startswith(PATTERN_PREFIX):
        if "*" in text:
            raise InvalidName(raw, _WILDCARD_REASON)
        return normalize_name(raw)

    base_raw = text[len(PATTERN_PREFIX):]
    if "*" in base_raw:
        raise InvalidName(raw, _WILDCARD_REASON)
    if _looks_like_address(base_raw):
        raise InvalidName(raw, "a pattern covers DNS names, not IP addresses")
    try:
        base = normalize_name(base_raw)
    except InvalidName as exc:
        raise InvalidName(raw, exc.reason) from None
    if base.count(".") < 1:
        raise InvalidName(raw, "a pattern needs at least two labels after '*.', as in *.example.com")
    entry = PATTERN_PREFIX + base
    if len(entry) > MAX_NAME_OCTETS:
        raise InvalidName(raw, f"pattern is {len(entry)} octets, over the {MAX_NAME_OCTETS}-octet limit")
    return entry


def is_host_name(name: str) -> bool:
    """Whether an SNI name is a name we could ever order: only its normal form qualifies."""
    try:
        return normalize_name(name) == name
    except InvalidName:
        return False


def is_pattern(entry: str) -> bool:
    """True for a normalised ``*.base`` allowlist entry."""
    return entry.startswith(PATTERN_PREFIX)


def pattern_for(name: str) -> str | None:
    """The one pattern that would allow ``name`` (``a.b.c`` → ``*.b.c``), or None.

    Patterns cover exactly one label, so a name is allowed by at most one pattern: the SNI
    check is then two set look-ups, whatever the size of the allowlist.
    """
    first, sep, rest = name.partition(".")
    if not sep or not first or "." not in rest:
        return None
    return PATTERN_PREFIX + rest


def normalize_address(raw: str) -> str:
    """Return the canonical form of an IP address, or raise :class:`InvalidName`.

    IPv6 is compressed and lower case (RFC 5952, what the CA writes in the certificate);
    an IPv4-mapped IPv6 address is the IPv4 address it maps, because a dual-stack socket
    reports IPv4 clients that way. Brackets around IPv6 are accepted, a zone index is not:
    it names an interface of this host, which no certificate can.
    """
    text = raw.strip()
    bracketed = text.startswith("[") and text.endswith("]")
    candidate = text[1:-1] if bracketed else text
    if "%" in candidate:
        raise InvalidName(raw, "an IPv6 zone index (%...) names a local interface; no certificate can carry it")
    if text.startswith("[") and ":" not in candidate:
        raise InvalidName(raw, "brackets are only valid around an IPv6 address")
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        if ":" in candidate:
            raise InvalidName(raw, "malformed IPv6 address (and ':' is not allowed in a host name: a port?)") from None
        raise InvalidName(raw, "malformed IPv4 address (a DNS name cannot end in a numeric label)") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def is_address(name: str) -> bool:
    """Whether a normalised name is an IP address: the CA gets an ``ip`` identifier for it and
    its certificate an iPAddress SAN. Exact on normal forms, since no DNS name ends in a
    numeric label or holds a ':'."""
    return _looks_like_address(name)


@functools.lru_cache(maxsize=256)
def address_of_socket(host: str) -> str | None:
    """The normal form of a socket's own address (``getsockname()[0]``), for a client that sent
    no SNI: whatever it connected to is the name it wants. Cached because a server has only a
    few addresses, and the no-SNI path should cost little more than a refusal."""
    try:
        return normalize_address(host.partition("%")[0])  # a link-local zone says nothing of the name
    except InvalidName:
        return None


_REVERSE_V4 = ".in-addr.arpa"
_REVERSE_V6 = ".ip6.arpa"


def address_of_reverse_name(name: str) -> str | None:
    """The address whose reverse-DNS name (``7.113.0.203.in-addr.arpa``, or 32 nibbles under
    ``ip6.arpa``) ``name`` is, or None. A CA validating an address over tls-alpn-01 sends
    this name as SNI (RFC 8738 section 6)."""
    try:
        if name.endswith(_REVERSE_V4):
            octets = name[: -len(_REVERSE_V4)].split(".")
            if len(octets) == 4:
                return normalize_address(".".join(reversed(octets)))
        elif name.endswith(_REVERSE_V6):
            nibbles = name[: -len(_REVERSE_V6)].split(".")
            if len(nibbles) == 32 and all(len(nibble) == 1 for nibble in nibbles):
                hexdigits = "".join(reversed(nibbles))
                return normalize_address(":".join(hexdigits[i : i + 4] for i in range(0, 32, 4)))
    except InvalidName:
        return None
    return None


def _looks_like_address(text: str) -> bool:
    """IPv6 (a ':', or brackets) or IPv4 (only digits and dots): what a DNS name can never be."""
    return ":" in text or text.startswith("[") or (text[:1].isdigit() and not text.strip("0123456789."))


def _a_label(raw: str, label: str) -> str:
    """Encode one mapped label, checking its wire length before IDNA has a chance to."""
    octets = len(label) if label.isascii() else len("xn--") + len(label.encode("punycode"))
    if octets > MAX_LABEL_OCTETS:
        shown = label if len(label) <= 20 else label[:17] + "..."
        raise InvalidName(raw, f"label {shown!r} is {octets} octets, over the {MAX_LABEL_OCTETS}-octet limit")
    try:
        return idna.encode(label, uts46=False).decode("ascii")
    except idna.IDNAError as exc:
        raise InvalidName(raw, f"label {label!r} is not valid IDNA: {exc}") from None
