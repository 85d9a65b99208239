"""Make the TLS certificate Pebble's ACME listener presents in docker-compose.yml.

autocert reaches Pebble at https://pebble:14000 and checks its certificate against ca.pem
(``--ca-bundle``), so this writes a throw-away CA and a certificate for ``pebble`` and
``localhost`` into the directory given (a volume shared by both containers). It keeps
what is there while it is still valid for a week, so restarts do not change the trust anchor.

This CA only vouches for Pebble's own listener in the demo; it is not the CA that signs the
certificates autocert obtains (that one is Pebble's, new at every start: GET /roots/0 on the
management port). The key is world-readable on purpose: it protects nothing but the demo.
"""

from __future__ import annotations

import datetime
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAMES = ("pebble", "localhost")
LIFETIME = datetime.timedelta(days=365)


def still_valid(path: Path) -> bool:
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    return certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(days=7)


def write(directory: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "autocert demo: Pebble listener CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(name) for name in NAMES] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAMES[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + LIFETIME)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (directory / "key.pem").write_bytes(key_pem)
    (directory / "cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    # ca.pem last: its presence means the set is complete.
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in ("key.pem", "cert.pem", "ca.pem"):
        (directory / name).chmod(0o644)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: pebble_certs.py DIRECTORY", file=sys.stderr)
        return 2
    directory = Path(argv[1])
    if all((directory / name).is_file() for name in ("key.pem", "cert.pem")) and still_valid(directory / "ca.pem") \
            and still_valid(directory / "cert.pem"):
        print(f"pebble_certs: keeping the certificates in {directory}")
        return 0
    write(directory)
    print(f"pebble_certs: wrote ca.pem, cert.pem and key.pem to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
