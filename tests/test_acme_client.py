"""The ACME client against a real CA (Pebble), plus unit tests for the crypto helpers.

No mocks: issuance, validation failures, nonce rejection and revocation all go over real
sockets on loopback, because the interesting failures live in the wire protocol.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import josepy as jose
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from pebble import Http01Responder, Pebble, TlsAlpn01Responder

from autocert._acme import AcmeClient, IssuedCertificate, parse_retry_after
from autocert._crypto import (
    ACME_IDENTIFIER_OID,
    CertificateInfo,
    generate_private_key,
    leaf_certificate_der,
    make_csr,
    parse_certificate_chain,
    tls_alpn_challenge_certificate,
)
from autocert._errors import AcmeError

ACME_URN = "urn:ietf:params:acme:error:"


def fresh_name(label: str = "t") -> str:
    """A name no earlier test (or earlier run against the same Pebble) has used."""
    return f"{label}-{uuid.uuid4().hex[:12]}.example.com"


async def registered_client(pebble: Pebble, key_kind: str = "ec256", **kwargs: object) -> AcmeClient:
    client = AcmeClient(pebble.directory_url, generate_private_key(key_kind), ca_bundle=pebble.ca_bundle,
                        **kwargs)  # type: ignore[arg-type]
    await client.register("ops@example.com", agree_tos=True)
    return client


def verify_chain(chain_pem: bytes, root_pem: bytes, workdir: Path) -> None:
    """Full chain check with openssl: the root is the only trust anchor, no partial chains."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    assert len(certs) >= 2, "the CA should send the intermediate with the leaf"
    pem = serialization.Encoding.PEM
    (workdir / "leaf.pem").write_bytes(certs[0].public_bytes(pem))
    (workdir / "untrusted.pem").write_bytes(b"".join(c.public_bytes(pem) for c in certs[1:]))
    (workdir / "root.pem").write_bytes(root_pem)
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "untrusted.pem", "leaf.pem"],
        cwd=workdir, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaf.pem: OK" in result.stdout


def leaf_of(issued: IssuedCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificates(issued.chain_pem)[0]


# ---------------------------------------------------------------------------------------------
# crypto.py
# ---------------------------------------------------------------------------------------------


def test_generate_private_key_kinds() -> None:
    ec_pem = generate_private_key()
    assert ec_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    ec_key = serialization.load_pem_private_key(ec_pem, password=None)
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert ec_key.curve.name == "secp256r1"

    rsa_pem = generate_private_key("rsa2048")
    assert rsa_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    rsa_key = serialization.load_pem_private_key(rsa_pem, password=None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert rsa_key.key_size == 2048

    assert generate_private_key() != ec_pem
    with pytest.raises(ValueError, match="unknown key kind"):
        generate_private_key("dsa")


@pytest.mark.parametrize("kind", ["ec256", "rsa2048"])
def test_make_csr_carries_names(kind: str) -> None:
    key_pem = generate_private_key(kind)
    csr = x509.load_der_x509_csr(make_csr(key_pem, ["a.example.com", "b.example.com", "a.example.com"]))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example.com", "b.example.com"]
    assert [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["a.example.com"]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert csr.public_key() == key.public_key()


def test_make_csr_long_first_name_and_bad_input() -> None:
    long_name = ("a" * 60 + ".") * 3 + "example.com"
    csr = x509.load_der_x509_csr(make_csr(generate_private_key(), [long_name]))
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []  # too long for a CN
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [long_name]
    with pytest.raises(ValueError):
        make_csr(generate_private_key(), [])
    with pytest.raises(TypeError):
        make_csr(generate_private_key(), "a.example.com")
    with pytest.raises(ValueError, match="private key"):
        make_csr(b"not a key", ["a.example.com"])


def test_an_address_goes_in_the_san_as_an_ip_address_and_never_in_the_cn() -> None:
    """RFC 8738: an ``ip`` identifier is matched against iPAddress SANs; a CN holding an
    address would be an identifier the order does not have."""
    csr = x509.load_der_x509_csr(make_csr(generate_private_key(), ["2001:db8::1", "a.example.com"]))
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("2001:db8::1")]
    assert san.get_values_for_type(x509.DNSName) == ["a.example.com"]
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []

    cert_pem, _ = tls_alpn_challenge_certificate("203.0.113.7", "token.thumbprint")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.IPAddress(ipaddress.ip_address("203.0.113.7"))]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == []


def _self_signed(serial: int, names: Sequence[str], not_before: dt.datetime, not_after: dt.datetime) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test, Inc."),
        x509.NameAttribute(NameOID.COMMON_NAME, "Test Issuer"),
    ])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_parse_certificate_chain_describes_the_leaf() -> None:
    start = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    end = start + dt.timedelta(days=90)
    leaf = _self_signed(0x0ABCDEF0123, ["a.example.com", "b.example.com"], start, end)
    other = _self_signed(7, ["other.example.com"], start, end)
    info = parse_certificate_chain(leaf + other)
    assert info == CertificateInfo(
        serial="abcdef0123",
        issuer="CN=Test Issuer,O=Test\\, Inc.",
        not_before=start,
        not_after=end,
        names=("a.example.com", "b.example.com", "127.0.0.1"),
    )
    assert info.not_before.tzinfo is not None and info.not_before.utcoffset() == dt.timedelta(0)
    assert leaf_certificate_der(leaf + other) == x509.load_pem_x509_certificate(leaf).public_bytes(
        serialization.Encoding.DER
    )
    assert parse_certificate_chain(_self_signed(1, [], start, end)).names == ()


@pytest.mark.parametrize("garbage", [b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_parse_certificate_chain_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(ValueError, match="not a PEM certificate chain"):
        parse_certificate_chain(garbage)


def test_tls_alpn_challenge_certificate() -> None:
    key_authorization = "token-abc.thumbprint-xyz"
    cert_pem, key_pem = tls_alpn_challenge_certificate("a.example.com", key_authorization)
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert cert.public_key() == key.public_key()
    assert cert.issuer == cert.subject  # self-signed

    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    digest = hashlib.sha256(key_authorization.encode()).digest()
    assert ext.value.value == b"\x04\x20" + digest  # DER OCTET STRING of SHA-256(key authorization)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName("a.example.com")]  # exactly one dNSName

    now = dt.datetime.now(dt.timezone.utc)
    assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(days=7)


def test_parse_retry_after() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    assert parse_retry_after(None) is None
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("Tue, 01 Jan 2030 00:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Mon, 31 Dec 2029 23:00:00 GMT", now=now) == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None


# ---------------------------------------------------------------------------------------------
# the ACME client against Pebble
# ---------------------------------------------------------------------------------------------


async def test_issue_http01_two_names(pebble: Pebble, tmp_path: Path) -> None:
    names = [fresh_name("a"), fresh_name("b")]
    key_pem = generate_private_key()
    async with Http01Responder(pebble.http01_port) as responder, await registered_client(pebble) as client:
        issued = await client.issue(names, key_pem, responder)

    assert issued.order_url.startswith(pebble.directory_url.rsplit("/", 1)[0])
    assert set(issued.info.names) == set(names)
    verify_chain(issued.chain_pem, pebble.root_pem(), tmp_path)
    leaf = leaf_of(issued)
    assert format(leaf.serial_number, "x") == issued.info.serial
    assert leaf.issuer.rfc4514_string() == issued.info.issuer
    assert leaf.public_key() == serialization.load_pem_private_key(key_pem, password=None).public_key()
    assert issued.info.not_before <= dt.datetime.now(dt.timezone.utc) < issued.info.not_after
    # Every presented answer was taken down again.
    assert sorted(responder.presented) == sorted(responder.cleaned)
    assert {n for n, _ in responder.presented} == set(names)
    assert responder.answers == {}


async def test_issue_tls_alpn01(pebble: Pebble, tmp_path: Path) -> None:
    name = fresh_name("alpn")
    async with TlsAlpn01Responder(pebble.tlsalpn01_port) as responder, await registered_client(pebble) as client:
        issued = await client.issue([name], generate_private_key(), responder)
    assert issued.info.names == (name,)
    assert responder.handshakes >= 1
    assert responder.presented == responder.cleaned and responder.contexts == {}
    verify_chain(issued.chain_pem, pebble.root_pem(), tmp_path)


async def test_issue_for_an_ipv6_address_over_http01(pebble: Pebble, tmp_path: Path) -> None:
    """An ``ip`` identifier: the CA connects to the address itself, no DNS involved."""
    async with Http01Responder(pebble.http01_port, host="::1") as responder, await registered_client(pebble) as client:
        issued = await client.issue(["::1"], generate_private_key(), responder)
    assert issued.info.names == ("::1",) and responder.hits >= 1
    san = leaf_of(issued).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == []
    verify_chain(issued.chain_pem, pebble.root_pem(), tmp_path)


async def test_prefers_responder_order_and_rsa_keys(pebble: Pebble, tmp_path: Path) -> None:
    """An RSA account (RS256) and RSA certificate key; the first offered preferred type is used."""

    class Both(TlsAlpn01Responder):
        challenge_types = ("tls-alpn-01", "http-01")

    name = fresh_name("rsa")
    async with Both(pebble.tlsalpn01_port) as responder, await registered_client(pebble, "rsa2048") as client:
        issued = await client.issue([name], generate_private_key("rsa2048"), responder)
    assert responder.handshakes >= 1
    assert isinstance(leaf_of(issued).public_key(), rsa.RSAPublicKey)
    verify_chain(issued.chain_pem, pebble.root_pem(), tmp_path)


async def test_account_reuse(pebble: Pebble) -> None:
    key = generate_private_key()
    async with AcmeClient(pebble.directory_url, key, ca_bundle=pebble.ca_bundle) as first:
        url = await first.register("ops@example.com", agree_tos=True)
        assert first.account_url == url
    async with AcmeClient(pebble.directory_url, key, ca_bundle=pebble.ca_bundle) as second:
        assert second.account_url is None
        assert await second.register(None, agree_tos=True) == url
    # A known key needs no new agreement; an unknown one does.
    async with AcmeClient(pebble.directory_url, key, ca_bundle=pebble.ca_bundle) as third:
        assert await third.register(None, agree_tos=False) == url
    async with AcmeClient(pebble.directory_url, generate_private_key(), ca_bundle=pebble.ca_bundle) as fresh:
        with pytest.raises(AcmeError, match="terms of service") as info:
            await fresh.register("ops@example.com", agree_tos=False)
        assert info.value.problem_type is None
        assert fresh.account_url is None
    # An account URL given up front is used as is.
    async with AcmeClient(pebble.directory_url, key, ca_bundle=pebble.ca_bundle, account_url=url) as given:
        assert given.account_url == url
        _, order = await given.new_order([fresh_name()])
        assert order.status.name == "pending"


async def test_operations_need_an_account(pebble: Pebble) -> None:
    async with AcmeClient(pebble.directory_url, generate_private_key(), ca_bundle=pebble.ca_bundle) as client:
        with pytest.raises(AcmeError, match="register"):
            await client.new_order([fresh_name()])


async def test_survives_heavy_nonce_rejection(pebble_factory: Callable[..., Pebble], tmp_path: Path) -> None:
    chaos = pebble_factory(PEBBLE_WFE_NONCEREJECT="50")
    async with Http01Responder(chaos.http01_port) as responder, await registered_client(chaos) as client:
        for _ in range(5):
            name = fresh_name("nonce")
            issued = await client.issue([name], generate_private_key(), responder)
            assert issued.info.names == (name,)
    verify_chain(issued.chain_pem, chaos.root_pem(), tmp_path)


async def test_bad_nonce_retries_are_bounded(pebble_factory: Callable[..., Pebble]) -> None:
    hostile = pebble_factory(PEBBLE_WFE_NONCEREJECT="100")
    async with AcmeClient(hostile.directory_url, generate_private_key(), ca_bundle=hostile.ca_bundle,
                          bad_nonce_retries=3) as client:
        with pytest.raises(AcmeError) as info:
            await client.register(None, agree_tos=True)
    assert info.value.problem_type == ACME_URN + "badNonce"
    assert info.value.status == 400


async def test_wrong_key_authorization_fails_with_problem(pebble: Pebble) -> None:
    class Liar(Http01Responder):
        def answer_for(self, token: str, key_authorization: str) -> str:
            return token + ".not-the-thumbprint"

    name = fresh_name("liar")
    async with Liar(pebble.http01_port) as responder, await registered_client(pebble) as client:
        with pytest.raises(AcmeError) as info:
            await client.issue([name], generate_private_key(), responder)
    assert info.value.problem_type is not None and info.value.problem_type.startswith(ACME_URN)
    assert info.value.problem_type == ACME_URN + "unauthorized"
    assert name in str(info.value)
    assert responder.cleaned == responder.presented != []


async def test_unreachable_address_fails_with_problem(pebble: Pebble) -> None:
    """DNS points the name at 127.0.0.2, where nothing listens (still loopback)."""
    name = fresh_name("unreachable")
    pebble.add_a(name, "127.0.0.2")
    try:
        async with Http01Responder(pebble.http01_port) as responder, await registered_client(pebble) as client:
            with pytest.raises(AcmeError) as info:
                await client.issue([name], generate_private_key(), responder)
    finally:
        pebble.clear_a(name)
    assert info.value.problem_type is not None and info.value.problem_type.startswith(ACME_URN)
    assert responder.hits == 0
    assert responder.cleaned == responder.presented != []


async def test_one_failing_name_fails_the_order_and_cleans_up_all(pebble: Pebble) -> None:
    good, bad = fresh_name("good"), fresh_name("bad")
    pebble.add_a(bad, "127.0.0.2")
    try:
        async with Http01Responder(pebble.http01_port) as responder, await registered_client(pebble) as client:
            with pytest.raises(AcmeError) as info:
                await client.issue([good, bad], generate_private_key(), responder)
    finally:
        pebble.clear_a(bad)
    assert bad in str(info.value)
    assert responder.answers == {}
    assert sorted(responder.cleaned) == sorted(responder.presented)


async def test_no_usable_challenge_type(pebble: Pebble) -> None:
    class DnsOnly(Http01Responder):
        challenge_types = ("dns-account-01",)

    async with DnsOnly(pebble.http01_port) as responder, await registered_client(pebble) as client:
        with pytest.raises(AcmeError, match="no usable challenge") as info:
            await client.issue([fresh_name()], generate_private_key(), responder)
    assert info.value.problem_type is None
    assert responder.presented == []


async def test_unknown_profile_is_refused_before_ordering(pebble: Pebble) -> None:
    async with await registered_client(pebble) as client:
        directory = await client.directory()
        offered = directory.meta.profiles or {}
        assert "no-such-profile" not in offered
        with pytest.raises(AcmeError, match="no-such-profile") as info:
            await client.new_order([fresh_name()], profile="no-such-profile")
    assert info.value.problem_type is None


async def test_revoke(pebble: Pebble) -> None:
    async with Http01Responder(pebble.http01_port) as responder, await registered_client(pebble) as client:
        issued = await client.issue([fresh_name("revoke")], generate_private_key(), responder)
        assert pebble.cert_status(issued.info.serial)["Status"] == "Valid"
        await client.revoke(issued.chain_pem, reason=4)  # superseded
        assert pebble.cert_status(issued.info.serial)["Status"] == "Revoked"
        with pytest.raises(AcmeError) as info:
            await client.revoke(issued.chain_pem)
    assert info.value.problem_type == ACME_URN + "alreadyRevoked"


async def test_low_level_steps(pebble: Pebble) -> None:
    """The pieces issue() is made of, as the renewal code will call them."""
    name = fresh_name("steps")
    key_pem = generate_private_key()
    async with Http01Responder(pebble.http01_port) as responder, await registered_client(pebble) as client:
        order_url, order = await client.new_order([name], replaces="ignored-without-renewalInfo")
        assert order.status.name == "pending" and len(order.authorizations) == 1
        await client.authorize(order.authorizations[0], responder)
        await client.authorize(order.authorizations[0], responder)  # already valid: a no-op
        assert len(responder.presented) == 1
        order = await client.get_order(order_url)
        assert order.status.name == "ready"
        order = await client.finalize(order_url, order, make_csr(key_pem, [name]))
        assert order.status.name == "valid" and order.certificate
        chain = await client.download(order.certificate)
    assert parse_certificate_chain(chain).names == (name,)


async def test_issuance_latency(pebble: Pebble, capsys: pytest.CaptureFixture[str]) -> None:
    """Polling cadence decides latency against a fast CA: no fixed one-second sleeps."""
    durations = []
    async with Http01Responder(pebble.http01_port) as responder, await registered_client(pebble) as client:
        await client.issue([fresh_name("warm")], generate_private_key(), responder)  # connection warm-up
        for _ in range(10):
            started = time.perf_counter()
            await client.issue([fresh_name("lat")], generate_private_key(), responder)
            durations.append(time.perf_counter() - started)
    median = statistics.median(durations)
    with capsys.disabled():
        print(
            f"\n[acme] one issuance against Pebble (1 name, http-01): median {median * 1000:.0f} ms, "
            f"min {min(durations) * 1000:.0f} ms, max {max(durations) * 1000:.0f} ms over {len(durations)}"
        )
    # Generous bound for loaded machines; a client with a fixed 1 s poll needs >= 2 s here.
    assert median < 1.5


# ---------------------------------------------------------------------------------------------
# A scripted CA on loopback, for answers Pebble 2.4 never gives: 429/503 with Retry-After,
# Retry-After on polls, advertised profiles and renewalInfo. It speaks real HTTP; it only skips
# checking signatures, which the Pebble tests above cover.
# ---------------------------------------------------------------------------------------------

Scripted = tuple[int, dict[str, str], object]


class ScriptedCA:
    def __init__(self, meta: dict[str, object] | None = None, *, renewal_info: bool = False) -> None:
        self.meta = meta or {}
        self.renewal_info = renewal_info
        self.script: dict[str, list[Scripted]] = {}
        self.requests: list[tuple[float, str, object]] = []  # (monotonic time, path, JWS payload)
        self.base = ""
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        return self.base + path

    async def __aenter__(self) -> ScriptedCA:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        headers = {"Replay-Nonce": jose.encode_b64jose(uuid.uuid4().bytes)}
        if path == "/dir":
            directory: dict[str, object] = {
                "newNonce": self.url("/nonce"), "newAccount": self.url("/account"),
                "newOrder": self.url("/order"), "revokeCert": self.url("/revoke"), "meta": self.meta,
            }
            if self.renewal_info:
                directory["renewalInfo"] = self.url("/renewal-info")
            return web.json_response(directory)
        if path == "/nonce":
            return web.Response(headers=headers)
        body = await request.json()
        payload = json.loads(jose.decode_b64jose(body["payload"])) if body["payload"] else None
        self.requests.append((time.monotonic(), path, payload))
        status, extra, answer = self.script[path].pop(0)
        content_type = "application/problem+json" if status >= 400 else "application/json"
        return web.Response(status=status, headers={**headers, **extra}, text=json.dumps(answer),
                            content_type=content_type)

    def times(self, path: str) -> list[float]:
        return [t for t, p, _ in self.requests if p == path]


class RecordingResponder:
    challenge_types = ("http-01",)

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def present(self, name: str, challenge_type: str, token: str, key_authorization: str) -> None:
        self.calls.append("present")

    async def cleanup(self, name: str, challenge_type: str, token: str) -> None:
        self.calls.append("cleanup")


def problem(kind: str, detail: str) -> dict[str, str]:
    return {"type": ACME_URN + kind, "detail": detail}


async def test_busy_answer_is_retried_after_retry_after() -> None:
    async with ScriptedCA() as ca:
        ca.script["/account"] = [
            (503, {"Retry-After": "0"}, problem("serverInternal", "busy")),
            (503, {"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}, problem("serverInternal", "busy")),
            (201, {"Location": ca.url("/acct/1")}, {"status": "valid"}),
        ]
        async with AcmeClient(ca.url("/dir"), generate_private_key()) as client:
            assert await client.register(None, agree_tos=True) == ca.url("/acct/1")
        assert len(ca.times("/account")) == 3


async def test_long_retry_after_is_not_waited_out() -> None:
    async with ScriptedCA() as ca:
        ca.script["/account"] = [(429, {"Retry-After": "3600"}, problem("rateLimited", "too many"))]
        started = time.monotonic()
        async with AcmeClient(ca.url("/dir"), generate_private_key()) as client:
            with pytest.raises(AcmeError, match="too many") as info:
                await client.register(None, agree_tos=True)
        assert time.monotonic() - started < 5  # raised for the caller's backoff, not slept on
    assert (info.value.problem_type, info.value.status) == (ACME_URN + "rateLimited", 429)


async def test_polling_honours_retry_after() -> None:
    token = jose.encode_b64jose(b"t" * 16)
    authz: dict[str, object] = {
        "identifier": {"type": "dns", "value": "a.example.com"},
        "challenges": [{"type": "http-01", "url": "", "token": token, "status": "pending"}],
    }
    async with ScriptedCA() as ca:
        authz["challenges"][0]["url"] = ca.url("/chall")  # type: ignore[index]
        ca.script["/authz"] = [
            (200, {}, {**authz, "status": "pending"}),
            (200, {"Retry-After": "1"}, {**authz, "status": "pending"}),
            (200, {}, {**authz, "status": "valid"}),
        ]
        ca.script["/chall"] = [(200, {}, {"type": "http-01", "status": "processing"})]
        responder = RecordingResponder()
        async with AcmeClient(ca.url("/dir"), generate_private_key(), account_url=ca.url("/acct/1"),
                              poll_initial=0.01) as client:
            await client.authorize(ca.url("/authz"), responder)
        first_poll, second_poll = ca.times("/authz")[1:]
        assert first_poll - ca.times("/chall")[0] < 0.5  # starts fast...
        assert second_poll - first_poll >= 0.95  # ...but never sooner than the CA asked
        assert responder.calls == ["present", "cleanup"]


async def test_profile_and_replaces_when_the_directory_offers_them() -> None:
    order = {"status": "pending", "identifiers": [{"type": "dns", "value": "a.example.com"}],
             "authorizations": [], "finalize": ""}
    async with ScriptedCA({"profiles": {"classic": "90 days", "shortlived": "6 days"}}, renewal_info=True) as ca:
        ca.script["/order"] = [(201, {"Location": ca.url("/order/1")}, order)]
        async with AcmeClient(ca.url("/dir"), generate_private_key(), account_url=ca.url("/acct/1")) as client:
            with pytest.raises(AcmeError, match="'tlsserver'.*classic, shortlived"):
                await client.new_order(["a.example.com"], profile="tlsserver")
            url, _ = await client.new_order(["a.example.com"], profile="shortlived", replaces="aki.serial")
        assert url == ca.url("/order/1")
        assert ca.requests[-1][2] == {
            "identifiers": [{"type": "dns", "value": "a.example.com"}],
            "profile": "shortlived",
            "replaces": "aki.serial",
        }


async def test_an_address_is_ordered_as_an_ip_identifier() -> None:
    order = {"status": "pending", "identifiers": [{"type": "ip", "value": "203.0.113.7"}],
             "authorizations": [], "finalize": ""}
    async with ScriptedCA() as ca:
        ca.script["/order"] = [(201, {"Location": ca.url("/order/1")}, order)]
        async with AcmeClient(ca.url("/dir"), generate_private_key(), account_url=ca.url("/acct/1")) as client:
            await client.new_order(["203.0.113.7", "a.example.com"])
        assert ca.requests[-1][2] == {"identifiers": [{"type": "ip", "value": "203.0.113.7"},
                                                      {"type": "dns", "value": "a.example.com"}]}
