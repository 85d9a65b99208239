"""What every context autocert serves from offers: TLS 1.2 and 1.3, and on TLS 1.2 only AEAD
suites with forward secrecy (no CBC, which testssl.sh rates LOW for LUCKY13)."""

from __future__ import annotations

import ssl

import pytest
import trustme

from autocert._tls import TLS12_SUITE_IDS, new_server_context


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> str:
    """A whole handshake between two in-memory ends; returns the suite agreed."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    client = client_context.wrap_bio(client_in, client_out, server_hostname="shop.example.test")
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, end in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    end.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return client.cipher()[0]  # type: ignore[index]
    raise AssertionError("the handshake did not finish")


@pytest.fixture(scope="module", params=["ec", "rsa"])
def contexts(request: pytest.FixtureRequest) -> tuple[ssl.SSLContext, trustme.CA]:
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA if request.param == "ec" else trustme.KeyType.RSA)
    server = new_server_context()
    ca.issue_cert("shop.example.test").configure_cert(server)
    return server, ca


def client(ca: trustme.CA, *, tls12_suites: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if tls12_suites is not None:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(tls12_suites)
    return context


def test_tls13_and_tls12_aead_suites_are_served(contexts: tuple[ssl.SSLContext, trustme.CA]) -> None:
    server, ca = contexts
    assert handshake(server, client(ca)).startswith("TLS_")
    assert "GCM" in handshake(server, client(ca, tls12_suites="ECDHE+AESGCM"))
    assert "CHACHA20" in handshake(server, client(ca, tls12_suites="ECDHE+CHACHA20"))


@pytest.mark.parametrize("suites", ["ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384", "AES128-SHA256", "AES128-GCM-SHA256", "ECDHE+AES+SHA1"])
def test_cbc_and_static_rsa_suites_are_refused(contexts: tuple[ssl.SSLContext, trustme.CA], suites: str) -> None:
    server, ca = contexts
    with pytest.raises(ssl.SSLError):
        handshake(server, client(ca, tls12_suites=suites))


def test_the_front_knows_exactly_the_tls12_suites_the_contexts_offer() -> None:
    offered = {cipher["id"] & 0xFFFF for cipher in new_server_context().get_ciphers() if cipher["protocol"] == "TLSv1.2"}
    assert offered == TLS12_SUITE_IDS
