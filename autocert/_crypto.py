"""Keys, CSRs, certificate parsing and the tls-alpn-01 challenge certificate.

Everything that touches X.509 lives here so that the rest of the package handles opaque PEM/DER
bytes plus a small :class:`CertificateInfo` summary, and never has to know `cryptography`'s API.
This module sits at the bottom of the import graph: beside `cryptography` and stdlib it imports
only :mod:`autocert._names`, which says which names are IP addresses.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ._names import is_address, normalize_address

__all__ = [
    "ACME_IDENTIFIER_OID",
    "KEY_KINDS",
    "CertificateInfo",
    "generate_private_key",
    "leaf_certificate_der",
    "make_csr",
    "parse_certificate_chain",
    "tls_alpn_challenge_certificate",
]

#: id-pe-acmeIdentifier (RFC 8737 section 6.1).
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")

#: Key kinds accepted by :func:`generate_private_key`; ECDSA P-256 first because it is the default.
KEY_KINDS = ("ec256", "rsa2048")

# X.520 caps commonName at 64 characters; longer names can only live in the SAN.
_CN_MAX = 64
# The challenge certificate only has to survive one validation; a day covers clock skew.
_CHALLENGE_VALIDITY = _dt.timedelta(days=1)
_CLOCK_SKEW = _dt.timedelta(hours=1)


@dataclass(frozen=True)
class CertificateInfo:
    """What the rest of the package needs to know about a leaf certificate.

    Plain values (no `cryptography` objects) so that it can be stored, compared and shown
    without re-parsing.
    """

    serial: str
    """Lower-case hex without colons or leading zeros, as CAs and ``openssl x509 -serial`` show it."""
    issuer: str
    """RFC 4514 string of the issuer DN."""
    not_before: _dt.datetime
    """Timezone-aware UTC."""
    not_after: _dt.datetime
    """Timezone-aware UTC."""
    names: tuple[str, ...]
    """DNS names, then IP addresses (normalised), from the subjectAltName extension."""


def generate_private_key(kind: str = "ec256") -> bytes:
    """A new private key as unencrypted PKCS#8 PEM.

    PKCS#8 rather than the traditional formats so that one loader handles EC and RSA alike.
    """
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if kind == "ec256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif kind == "rsa2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"unknown key kind {kind!r}; expected one of {', '.join(KEY_KINDS)}")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_signing_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"unsupported private key type {type(key).__name__}; use ECDSA or RSA")
    return key


def _unique(names: Sequence[str]) -> list[str]:
    # A repeated name would make the CA reject the order or the CSR; keep the first position.
    return list(dict.fromkeys(names))


def _subject(name: str) -> x509.Name:
    """A CN for tools that still look there: a DNS name that fits, never an address (RFC 8738
    wants addresses in the SAN only, and CAs refuse a CN they cannot match to an identifier)."""
    if len(name) > _CN_MAX or is_address(name):
        return x509.Name([])
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _alt_names(names: Sequence[str]) -> x509.SubjectAlternativeName:
    """The SAN for normalised names: a dNSName for each DNS name, an iPAddress for each address."""
    return x509.SubjectAlternativeName([
        x509.IPAddress(ipaddress.ip_address(n)) if is_address(n) else x509.DNSName(n) for n in names
    ])


def make_csr(key_pem: bytes, names: Sequence[str]) -> bytes:
    """A DER CSR for ``names`` (already normalised A-labels or addresses), signed with ``key_pem``.

    ACME ignores the subject, but the first name goes into the CN for tools that still look
    there; it is left out when it is too long for a CN or is an address.
    """
    if isinstance(names, str):
        raise TypeError("names must be a sequence of names, not a single string")
    unique = _unique(names)
    if not unique:
        raise ValueError("a CSR needs at least one name")
    key = _load_signing_key(key_pem)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(unique[0]))
        .add_extension(_alt_names(unique), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def _load_leaf(chain_pem: bytes) -> x509.Certificate:
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate chain: {exc}") from exc
    if not certs:  # pragma: no cover - cryptography raises on empty input, kept for safety
        raise ValueError("not a PEM certificate chain: no certificate found")
    return certs[0]


def parse_certificate_chain(chain_pem: bytes) -> CertificateInfo:
    """Describe the leaf (first certificate) of a PEM chain as the CA delivered it."""
    leaf = _load_leaf(chain_pem)
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addresses = [normalize_address(str(address)) for address in san.get_values_for_type(x509.IPAddress)]
        names = (*san.get_values_for_type(x509.DNSName), *addresses)
    except x509.ExtensionNotFound:
        names = ()
    return CertificateInfo(
        serial=format(leaf.serial_number, "x"),
        issuer=leaf.issuer.rfc4514_string(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        names=names,
    )


def leaf_certificate_der(chain_pem: bytes) -> bytes:
    """DER of the first certificate of a PEM chain: what ACME revocation requests carry."""
    return _load_leaf(chain_pem).public_bytes(serialization.Encoding.DER)


def _der_octet_string(content: bytes) -> bytes:
    # Short-form length is enough: the content is always a 32-byte digest.
    if len(content) > 127:
        raise ValueError("octet string too long for short-form DER length")
    return bytes([0x04, len(content)]) + content


def tls_alpn_challenge_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """A self-signed certificate that answers tls-alpn-01 for ``name`` (RFC 8737).

    Returns ``(cert_pem, key_pem)``. The validator checks that the only SAN is ``name`` (an
    iPAddress for an address, RFC 8738 section 6) and that the critical acmeIdentifier
    extension holds SHA-256 of the key authorization; a fresh P-256 key each time keeps it
    unrelated to any real certificate key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    subject = _subject(name)
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + _CHALLENGE_VALIDITY)
        .add_extension(_alt_names([name]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, _der_octet_string(digest)), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert_pem, key_pem


def ari_certificate_id(chain_pem: bytes) -> str:
    """The RFC 9773 certificate identifier of the leaf: base64url(AKI keyIdentifier) "."
    base64url(DER serial number bytes), both unpadded. Raises ValueError without an AKI."""
    import base64

    leaf = x509.load_pem_x509_certificate(chain_pem)
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise ValueError("the certificate has no authority key identifier") from None
    if aki.key_identifier is None:
        raise ValueError("the certificate's authority key identifier has no key identifier")
    serial = leaf.serial_number
    # DER INTEGER content octets: big-endian two's complement, with a leading zero when the
    # high bit is set (serials are positive).
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8 or 1, "big")

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    return f"{b64(aki.key_identifier)}.{b64(serial_bytes)}"
