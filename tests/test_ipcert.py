"""IP address certificates (RFC 8738) end to end: ``autocert serve`` against Pebble, and real
TLS clients that connect to the address without SNI and verify the certificate for it."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from pebble import Pebble
from support import ServeProcess, cli_json, openssl_s_client, run_cli


def handshake_without_sni(
    host: str, port: int, cafile: str, *, timeout: float = 60
) -> x509.Certificate:
    """Python sends no SNI for an address, and checks the address against the iPAddress SANs."""
    context = ssl.create_default_context(cafile=cafile)
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def assert_issued_for(certificate: x509.Certificate, address: str) -> None:
    san = certificate.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(address)]
    assert san.get_values_for_type(x509.DNSName) == []


def test_an_address_is_issued_over_http01_and_served_without_sni(
    pebble: Pebble, root_ca: str, db: str, tmp_path: Path
) -> None:
    assert run_cli("allow", "127.0.0.1", db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path) as server:
        # The first client waits while the certificate is issued; Pebble validates http-01 at
        # the address itself, on serve's http listener.
        first = handshake_without_sni("127.0.0.1", server.https_port, root_ca)
        assert_issued_for(first, "127.0.0.1")

        (entry,) = cli_json("status", "127.0.0.1", db=db)["certificates"]
        assert (entry["name"], entry["state"], entry["attempts"]) == (
            "127.0.0.1",
            "valid",
            1,
        )
        assert entry["serial"] == format(first.serial_number, "x")
        admin = f"http://127.0.0.1:{server.admin_port}"
        with urllib.request.urlopen(f"{admin}/status.json", timeout=10) as response:
            assert [item["name"] for item in json.load(response)["certificates"]] == [
                "127.0.0.1"
            ]
        with urllib.request.urlopen(f"{admin}/name/127.0.0.1", timeout=10) as response:
            assert entry["serial"] in response.read().decode()

        again = handshake_without_sni(
            "127.0.0.1", server.https_port, root_ca, timeout=10
        )
        assert again.serial_number == first.serial_number, (
            "served from memory, not ordered again"
        )
        # A client that sends SNI is routed by it, as before: an unknown name is refused.
        assert "alert number 112" in openssl_s_client(
            server.https_port, "unknown.example.test"
        )


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_an_address_is_issued_over_tls_alpn01(
    pebble: Pebble, root_ca: str, db: str, tmp_path: Path, address: str
) -> None:
    """With no http listener the CA validates over tls-alpn-01, sending the address's
    reverse-DNS name as SNI (RFC 8738 section 6); the challenge certificate holds the address."""
    assert run_cli("allow", address, db=db).returncode == 0
    listen = f"[{address}]" if ":" in address else address
    extra = ["--https", f"{listen}:{pebble.tlsalpn01_port}", "--http", "none"]
    with ServeProcess(db, pebble, tmp_path, extra=extra) as server:
        certificate = handshake_without_sni(address, server.https_port, root_ca)
        assert_issued_for(certificate, address)
    (entry,) = cli_json("status", db=db)["certificates"]
    assert (entry["name"], entry["state"]) == (address, "valid")


def test_allow_takes_addresses_in_one_spelling_and_refuses_malformed_ones(
    db: str,
) -> None:
    result = run_cli("allow", "2001:DB8:0::1", "[2001:db8::2]", "203.0.113.7", db=db)
    assert result.returncode == 0, result.stderr
    assert [entry["name"] for entry in cli_json("list", db=db)["allowed"]] == [
        "2001:db8::1",
        "2001:db8::2",
        "203.0.113.7",
    ]
    for bad in (
        "203.0.113.256",
        "*.1.2.3",
    ):  # every other malformed form: tests/test_names.py
        refused = run_cli("allow", "198.51.100.1", bad, db=db)
        assert refused.returncode == 2, (bad, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and bad in lines[0], (bad, refused.stderr)
    assert len(cli_json("list", db=db)["allowed"]) == 3, (
        "one bad address writes nothing"
    )
