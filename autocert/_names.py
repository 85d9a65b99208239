"""Host name normalisation: the single definition of "the same name" across autocert.

Every name that reaches the allowlist, the database, the SNI cache or the CA goes through
:func:`normalize_name` (or :func:`normalize_entry` for allowlist patterns) first. Doing it in
one place is what makes ``Bücher.Example.`` in a command line, ``xn--bcher-kva.example`` in a
ClientHello and the row in the database compare equal, and what keeps input the CA would
refuse (IP addresses, wildcards, over-long labels) from ever becoming an order.
"""

from __future__ import annotations

import ipaddress

import idna

from autocert._errors import InvalidName

__all__ = ["authority_host", "is_pattern", "normalize_entry", "normalize_name", "pattern_for"]

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
    _reject_ip_address(raw, text)

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


def authority_host(authority: str) -> str | None:
    """The host of a ``Host`` header or URL authority in the form SNI routing uses, or None.

    The port goes, and so do case, a trailing dot and Unicode (IDNA, as :func:`normalize_name`
    does it), so ``Shop.Example.:8443`` and ``shop.example`` are the same host; an IP literal
    becomes its canonical text (brackets dropped). None for anything that names no host.
    """
    text = authority.rpartition("@")[2]
    if text.startswith("["):
        address, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
        try:
            return str(ipaddress.IPv6Address(address))
        except ValueError:
            return None
    host, colon, port = text.rpartition(":")
    if not colon:
        host = text
    elif port and not port.isdigit():
        return None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        return normalize_name(host)
    except InvalidName:
        return None


def _reject_ip_address(raw: str, text: str) -> None:
    """Refuse IP literals: CAs cannot validate them via DNS names and SNI never carries them."""
    candidate = text
    bracketed = candidate.startswith("[") and candidate.endswith("]")
    if bracketed:
        candidate = candidate[1:-1]
    try:
        ipaddress.ip_address(candidate.rstrip(".") if not bracketed else candidate)
    except ValueError:
        if bracketed:
            raise InvalidName(raw, "brackets are only valid around an IPv6 address, which is not a DNS name") from None
        if ":" in text:
            raise InvalidName(raw, "':' is not allowed in a host name (a port, or an IPv6 address?)") from None
        return
    raise InvalidName(raw, "an IP address, not a DNS name")


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
