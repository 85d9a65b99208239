"""The ClientHello front of ``autocert serve`` against a real Pebble, on uvloop and on asyncio.

Every test runs real ``autocert serve`` processes and real TLS clients: the front's job is to
read the ClientHello before TLS starts, so only real handshakes show whether it routes right.
"""

from __future__ import annotations

import socket
import sqlite3
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier
from pebble import Pebble
from support import (
    ServeProcess,
    cli_json,
    eventually,
    handshake,
    openssl_s_client,
    run_cli,
    served_certificate,
)

#: The tls-alpn-01 ``acmeIdentifier`` extension (RFC 8737) that marks a challenge certificate.
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
BROWSER_ALPN = ["h2", "http/1.1"]


@pytest.fixture(params=["uvloop", "asyncio"])
def event_loop_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """``serve`` picks uvloop unless told otherwise; every TLS path must work on both."""
    return {"AUTOCERT_EVENT_LOOP": request.param}


@pytest.fixture()
def serve(pebble: Pebble, db: str, tmp_path: Path, event_loop_env: dict[str, str]) -> Iterator[ServeFactory]:
    started: list[ServeProcess] = []

    def start(*extra: str) -> ServeProcess:
        server = ServeProcess(db, pebble, tmp_path, extra=list(extra), env=event_loop_env)
        started.append(server)
        server.start()
        assert_event_loop(server, event_loop_env["AUTOCERT_EVENT_LOOP"])
        return server

    yield start
    for server in reversed(started):
        server.stop()
        assert "Traceback" not in server.stderr_path.read_text(), server.output()


class ServeFactory(Protocol):
    """The ``serve`` fixture: starts ``autocert serve`` with extra arguments on the chosen loop."""

    def __call__(self, *extra: str) -> ServeProcess: ...


def assert_event_loop(server: ServeProcess, wanted: str) -> None:
    """uvloop's extension module is mapped into the process exactly when it runs uvloop."""
    assert server.process is not None
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert ("uvloop/loop." in maps) == (wanted == "uvloop"), f"serve is not running on {wanted}"


def sans(certificate: x509.Certificate) -> list[str]:
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def is_challenge_certificate(certificate: x509.Certificate) -> bool:
    return any(extension.oid == ACME_IDENTIFIER for extension in certificate.extensions)


def pebble_issued(certificate: x509.Certificate, pebble: Pebble) -> bool:
    intermediate = x509.load_pem_x509_certificate(pebble.intermediate_pem())
    return certificate.issuer == intermediate.subject and not is_challenge_certificate(certificate)


def metric(server: ServeProcess, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_first_handshake_is_issued_over_tls_alpn_01_alone(pebble: Pebble, root_ca: str, db: str, serve: ServeFactory) -> None:
    """No http listener at all: Pebble validates through the front on the TLS port, while the
    client's own first handshake waits, and that handshake gets the issued certificate."""
    assert run_cli("allow", "alpn.example.test", db=db).returncode == 0
    server = serve("--http", "none")
    first = handshake(server.https_port, "alpn.example.test", cafile=root_ca, alpn=BROWSER_ALPN, timeout=60)
    assert sans(first) == ["alpn.example.test"]
    assert pebble_issued(first, pebble)
    (entry,) = cli_json("status", "alpn.example.test", db=db)["certificates"]
    assert entry["state"] == "valid" and entry["attempts"] == 1
    assert entry["serial"] == format(first.serial_number, "x")
    assert metric(server, 'autocert_handshakes_total{outcome="challenge"}') >= 1, "Pebble's validation went elsewhere"


def test_browser_alpn_never_sees_a_challenge_certificate(pebble: Pebble, root_ca: str, db: str, serve: ServeFactory) -> None:
    """While tls-alpn-01 runs, the challenge certificate exists for the name; a client offering
    h2/http1.1 must only ever get the real certificate (or the alert while it is pending)."""
    names = [f"n{i}.hammer.example.test" for i in range(3)]
    assert run_cli("allow", "*.hammer.example.test", db=db).returncode == 0
    server = serve("--http", "none", "--first-contact-wait", "0.05")
    seen: list[x509.Certificate] = []
    refused = 0
    stop = threading.Event()
    lock = threading.Lock()

    def hammer(name: str) -> None:
        nonlocal refused
        while not stop.is_set():
            try:
                certificate = handshake(server.https_port, name, alpn=BROWSER_ALPN, timeout=10)
            except (ssl.SSLError, OSError):
                with lock:
                    refused += 1
                continue
            with lock:
                seen.append(certificate)

    threads = [threading.Thread(target=hammer, args=(name,), daemon=True) for name in names for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for name in names:
            served_certificate(server.https_port, name, root_ca, timeout=60)
        # Keep hammering a moment after the last issuance, when the certificates are fresh.
        count = len(seen)
        eventually(lambda: len(seen) >= count + 20, timeout=30, what="more handshakes after issuance")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert refused > 0, "no handshake ran while the names were pending"
    assert metric(server, 'autocert_handshakes_total{outcome="challenge"}') >= len(names)
    assert seen, "no certificate was ever served"
    challenge = [c for c in seen if is_challenge_certificate(c)]
    assert not challenge, f"{len(challenge)} of {len(seen)} h2 handshakes got a tls-alpn-01 challenge certificate"
    assert all(pebble_issued(c, pebble) for c in seen)
    assert {sans(c)[0] for c in seen} == set(names)


def test_no_sni_gets_an_alert_not_eof(db: str, serve: ServeFactory) -> None:
    assert run_cli("allow", "known.example.test", db=db).returncode == 0
    server = serve()
    output = openssl_s_client(server.https_port, None)
    assert "alert number 112" in output, output


def test_default_name_serves_clients_without_sni(pebble: Pebble, db: str, serve: ServeFactory) -> None:
    assert run_cli("allow", "default.example.test", db=db).returncode == 0
    server = serve("--default-name", "default.example.test")
    # The first client without SNI waits for the default name's first issuance, like any name.
    certificate = handshake(server.https_port, None, timeout=60)
    assert sans(certificate) == ["default.example.test"] and pebble_issued(certificate, pebble)
    output = openssl_s_client(server.https_port, None)
    assert "alert number" not in output and "default.example.test" in output, output


def test_zero_first_contact_wait_refuses_then_serves(pebble: Pebble, root_ca: str, db: str, serve: ServeFactory) -> None:
    assert run_cli("allow", "later.example.test", db=db).returncode == 0
    server = serve("--first-contact-wait", "0")
    started = time.monotonic()
    output = openssl_s_client(server.https_port, "later.example.test")
    assert "alert number 112" in output, output
    assert time.monotonic() - started < 5, "a zero wait must not hold the handshake"
    # Issuance went on in the background; a later handshake, same process, gets the certificate.
    certificate = served_certificate(server.https_port, "later.example.test", root_ca, timeout=60)
    assert sans(certificate) == ["later.example.test"]
    (entry,) = cli_json("status", "later.example.test", db=db)["certificates"]
    assert entry["state"] == "valid" and entry["attempts"] == 1


def test_names_outside_normal_form_are_refused_without_a_trace(pebble: Pebble, db: str, serve: ServeFactory) -> None:
    """A pattern allows one label on demand; a literal ``*`` label, or a label the CA would
    refuse, must be turned away before it costs a database row or an order."""
    assert run_cli("allow", "*.tenants.example.test", db=db).returncode == 0
    server = serve()
    for bad in ("*.tenants.example.test", "bad_label.tenants.example.test", "-x.tenants.example.test"):
        assert "alert number 112" in openssl_s_client(server.https_port, bad), bad
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:
        for table in ("certificates", "attempts", "name_states"):
            assert connection.execute(f"select count(*) from {table}").fetchone()[0] == 0, table
    for bad in ("bad_label", "-x.tenants", "*.tenants"):
        assert bad not in pebble.logs()


@pytest.mark.parametrize("event_loop_env", [{"AUTOCERT_EVENT_LOOP": "asyncio"}], ids=["asyncio"])
def test_disallow_refuses_new_handshakes_on_asyncio(root_ca: str, db: str, serve: ServeFactory) -> None:
    """test_serve checks disallow on the default loop (uvloop); this is the same on asyncio."""
    assert run_cli("allow", "gone.example.test", db=db).returncode == 0
    server = serve()
    handshake(server.https_port, "gone.example.test", cafile=root_ca, timeout=60)
    assert run_cli("disallow", "gone.example.test", db=db).returncode == 0
    eventually(lambda: "alert number 112" in openssl_s_client(server.https_port, "gone.example.test"),
               timeout=5, what="the disallowed name to be refused")


def fragmented(hello: bytes, size: int) -> bytes:
    """The ClientHello record re-framed as records of ``size`` bytes of handshake data."""
    body = hello[5:]
    return b"".join(hello[:3] + len(body[i:i + size]).to_bytes(2, "big") + body[i:i + size] for i in range(0, len(body), size))


def handshake_with_fragmented_hello(port: int, name: str, size: int) -> x509.Certificate:
    """A TLS client whose ClientHello arrives in many small records, one TCP send each."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    records = fragmented(outgoing.read(), size)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        offset = 0
        while offset < len(records):
            end = offset + 5 + int.from_bytes(records[offset + 3:offset + 5], "big")
            sock.sendall(records[offset:end])
            offset = end
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    sock.sendall(pending)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                incoming.write(data)
        sock.sendall(outgoing.read())
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_hello_split_over_many_records_is_served(root_ca: str, db: str, serve: ServeFactory) -> None:
    """Legal TLS, and what some anti-censorship tools do: the front must reassemble the
    records and replay them all into TLS."""
    assert run_cli("allow", "split.example.test", db=db).returncode == 0
    server = serve()
    served_certificate(server.https_port, "split.example.test", root_ca, timeout=60)
    certificate = handshake_with_fragmented_hello(server.https_port, "split.example.test", 16)
    assert sans(certificate) == ["split.example.test"]


def test_hello_in_hundreds_of_records_is_dropped_at_once(db: str, serve: ServeFactory) -> None:
    """A hello sliced into one-byte records would make every new segment a re-parse of the
    whole buffer; the front refuses it instead of waiting for the hello timeout."""
    server = serve()
    started = time.monotonic()
    with pytest.raises((ConnectionError, ssl.SSLError)):
        handshake_with_fragmented_hello(server.https_port, "split.example.test", 1)
    assert time.monotonic() - started < 3


def test_a_client_with_nothing_in_common_gets_an_alert_not_a_bare_close(db: str, serve: ServeFactory) -> None:
    """TLS 1.2 with only CBC suites, or TLS 1.1: the front answers with the alert OpenSSL would
    have sent (handshake_failure, protocol_version) instead of closing without a word."""
    assert run_cli("allow", "old.example.test", db=db).returncode == 0
    server = serve()
    cbc_only = openssl_s_client(server.https_port, "old.example.test", extra=["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256:AES128-SHA256"])
    assert "alert number 40" in cbc_only, cbc_only
    old = openssl_s_client(server.https_port, "old.example.test", extra=["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
    assert "alert number 70" in old or "alert protocol version" in old, old
