"""Name normalisation: what is accepted, its canonical form, and every reason for refusal."""

from __future__ import annotations

import pytest

from autocert._errors import InvalidName
from autocert._names import (
    address_of_reverse_name,
    address_of_socket,
    is_address,
    is_pattern,
    normalize_entry,
    normalize_name,
    pattern_for,
)

LONG_LABEL = "a" * 63
# 3 labels of 63 + one of 61, with 3 dots: exactly 253 octets.
MAX_NAME = ".".join([LONG_LABEL] * 3 + ["b" * 61])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.com", "example.com"),
        ("EXAMPLE.Com", "example.com"),
        ("example.com.", "example.com"),
        ("  example.com  ", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("Bücher.Example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("faß.de", "xn--fa-hia.de"),  # non-transitional: ß is kept, not mapped to ss
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("a\u3002b\uff0ec", "a.b.c"),  # ideographic and full-width full stops are dots
        ("Ⅻ.example", "xii.example"),  # UTS 46 mapping
        ("localhost", "localhost"),
        ("LOCALHOST.", "localhost"),
        ("a-b.example", "a-b.example"),
        ("1a.example", "1a.example"),
        ("www.123.example", "www.123.example"),
        (f"{LONG_LABEL}.example", f"{LONG_LABEL}.example"),
        (MAX_NAME, MAX_NAME),
        (MAX_NAME + ".", MAX_NAME),
        # IP addresses (RFC 8738), in one canonical spelling
        ("203.0.113.7", "203.0.113.7"),
        (" 127.0.0.1 ", "127.0.0.1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("::1", "::1"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # IPv4-mapped: the IPv4 address itself
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ],
)
def test_normalize_name_accepts(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected
    assert normalize_name(expected) == expected  # idempotent


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty name"),
        ("   ", "empty name"),
        (".", "empty name"),
        ("a..b", "empty label"),
        (".example.com", "empty label"),
        ("example.com..", "empty label"),
        ("1.2.3.4.", "malformed IPv4 address"),
        ("1.2.3.256", "malformed IPv4 address"),
        ("1.2.3", "malformed IPv4 address"),
        ("01.2.3.4", "malformed IPv4 address"),
        ("2001:db8:::1", "malformed IPv6 address"),
        ("2001:db8::g", "malformed IPv6 address"),
        ("fe80::1%eth0", "zone index"),
        ("[example.com]", "brackets"),
        ("[1.2.3.4]", "brackets"),
        ("127.1", "IPv4"),
        ("example.123", "IPv4"),
        ("example.com:443", "':'"),
        (f"{LONG_LABEL}a.example", "over the 63-octet limit"),
        ("ü" * 60 + ".example", "over the 63-octet limit"),  # A-label length counts, not characters
        (MAX_NAME + "b", "over the 253-octet limit"),
        ("a." * 600 + "com", "over the 253-octet limit"),
        ("under_score.example", "not valid IDNA"),
        ("space here.example", "not valid IDNA"),
        ("-leading.example", "not valid IDNA"),
        ("trailing-.example", "not valid IDNA"),
        ("ab--cd.example", "not valid IDNA"),
        ("xn--zz.example", "not valid IDNA"),
        ("exa\u200dmple.com", "not valid IDNA"),  # a joiner outside its allowed context
        ("a/b.example", "not valid IDNA"),
        ("*.example.com", "wildcard"),
        ("*", "wildcard"),
        ("a.*.example", "wildcard"),
        ("f*o.example", "wildcard"),
    ],
)
def test_normalize_name_rejects(raw: str, reason: str) -> None:
    with pytest.raises(InvalidName) as caught:
        normalize_name(raw)
    assert caught.value.name == raw
    assert reason in caught.value.reason
    assert "\n" not in caught.value.reason


def test_invalid_name_is_a_value_error_with_the_input_in_the_message() -> None:
    with pytest.raises(ValueError, match="a..b"):
        normalize_name("a..b")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.com", "example.com"),
        ("*.example.com", "*.example.com"),
        ("*.EXAMPLE.com.", "*.example.com"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
        ("*.a.b.example", "*.a.b.example"),
        (" *.example.com ", "*.example.com"),
    ],
)
def test_normalize_entry_accepts(raw: str, expected: str) -> None:
    assert normalize_entry(raw) == expected
    assert normalize_entry(expected) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("*", "wildcard"),
        ("*.", "empty name"),
        ("*.com", "at least two labels"),
        ("*.localhost", "at least two labels"),
        ("*.*.example.com", "wildcard"),
        ("**.example.com", "wildcard"),
        ("a*.example.com", "wildcard"),
        ("a.*.example.com", "wildcard"),
        ("example.*", "wildcard"),
        ("*.1.2.3.4", "not IP addresses"),
        ("*.1.2.3", "not IP addresses"),
        ("*.::1", "not IP addresses"),
        ("*.a..example", "empty label"),
        ("*." + MAX_NAME, "over the 253-octet limit"),
        ("*.under_score.example", "not valid IDNA"),
        ("", "empty name"),
        ("1.2.3.4.5", "malformed IPv4 address"),
    ],
)
def test_normalize_entry_rejects(raw: str, reason: str) -> None:
    with pytest.raises(InvalidName) as caught:
        normalize_entry(raw)
    assert caught.value.name == raw
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    ("entry", "expected"),
    [("*.example.com", True), ("example.com", False), ("a.example.com", False)],
)
def test_is_pattern(entry: str, expected: bool) -> None:
    assert is_pattern(entry) is expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.b.c", "*.b.c"),
        ("www.example.com", "*.example.com"),
        ("x.y.example.com", "*.y.example.com"),
        ("example.com", None),
        ("localhost", None),
    ],
)
def test_pattern_for(name: str, expected: str | None) -> None:
    assert pattern_for(name) == expected


def test_an_address_is_an_allowlist_entry_in_its_canonical_form() -> None:
    assert normalize_entry("2001:DB8::0:1") == "2001:db8::1"
    assert normalize_entry("203.0.113.7") == "203.0.113.7"
    assert [is_address(n) for n in ("203.0.113.7", "2001:db8::1", "a1.example", "1a.example", "localhost")] == [
        True, True, False, False, False]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("7.113.0.203.in-addr.arpa", "203.0.113.7"),
        ("1.0.0.127.in-addr.arpa", "127.0.0.1"),
        ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "2001:db8::1"),
        ("1" + ".0" * 31 + ".ip6.arpa", "::1"),
        ("113.0.203.in-addr.arpa", None),  # a network, not an address
        ("7.113.0.256.in-addr.arpa", None),
        ("1.0.ip6.arpa", None),
        ("10.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", None),
        ("example.com", None),
    ],
)
def test_address_of_reverse_name(name: str, expected: str | None) -> None:
    assert address_of_reverse_name(name) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", "127.0.0.1"), ("::ffff:127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("fe80::1%lo", "fe80::1"), ("", None)],
)
def test_address_of_socket(host: str, expected: str | None) -> None:
    """A dual-stack listener reports IPv4 clients' local address IPv4-mapped: the same name."""
    assert address_of_socket(host) == expected
