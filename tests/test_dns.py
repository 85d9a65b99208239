"""dns-01 and wildcard certificates end to end: Pebble validating TXT records that autocert
publishes through a command (into challtestsrv's DNS) and through RFC 2136 updates (into a
real Knot DNS server started on loopback), the wait until a record is visible, and the
records cleared after success, after a failed validation and after a crash."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID
from pebble import Pebble, free_port, wait_for
from support import (
    REPO,
    ServeProcess,
    acme_args,
    cli_env,
    cli_json,
    run_cli,
    served_certificate,
)

from autocert._dns import DnsError, DnsLookup, parse_provider
from autocert._dns.command import CommandProvider
from autocert._errors import ConfigError
from autocert._store import Store

pytestmark = pytest.mark.timeout(180)


def sans(certificate: x509.Certificate) -> list[str]:
    return certificate.extensions.get_extension_for_oid(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME
    ).value.get_values_for_type(x509.DNSName)


def allow(db: str, name: str) -> None:
    """Allow in-process: one CLI start less per test (the CLI's allow is tested elsewhere)."""

    async def run() -> None:
        store = await Store.open(db)
        try:
            await store.allow([name])
        finally:
            await store.close()

    asyncio.run(run())


def dns_records(db: str) -> list[tuple[str, str]]:
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:
        return connection.execute("select fqdn, value from dns_records").fetchall()


class ChalltestsrvDns:
    """A second challtestsrv, DNS only: a server Pebble does not ask, to make the CA see
    something other than what autocert checks."""

    def __init__(self, workdir: Path) -> None:
        self.dns_port, self.management_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.management_port}"
        self._log = workdir / "side-challtestsrv.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with self._log.open("wb") as out:
            self._process = subprocess.Popen(
                [
                    "pebble-challtestsrv",
                    "-defaultIPv6",
                    "",
                    "-dns01",
                    f"127.0.0.1:{self.dns_port}",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-management",
                    f"127.0.0.1:{self.management_port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(
            lambda: _answers_soa(self.dns_port, "x.test."),
            timeout=30,
            what="challtestsrv DNS to answer",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None
        self._process.terminate()
        self._process.wait(timeout=10)


def _answers_soa(port: int, zone: str) -> bool:
    import dns.exception
    import dns.message
    import dns.query

    try:
        dns.query.udp(
            dns.message.make_query(zone, "SOA"), "127.0.0.1", port=port, timeout=1
        )
    except (OSError, dns.exception.DNSException):
        return False
    return True


def write_publisher(path: Path, challtestsrv_url: str, log: Path) -> str:
    """An ``exec:`` command that publishes into challtestsrv through its management API, and
    notes each call in ``log``; a file ``FAIL`` beside it makes ``set`` fail."""
    path.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import json, pathlib, sys, urllib.request
        action, fqdn, value = sys.argv[1:4]
        here = pathlib.Path(__file__).parent
        with open({str(log)!r}, "a") as out:
            out.write(f"{{action}} {{fqdn}} {{value}}\\n")
        if action == "set" and (here / "FAIL").exists():
            print("warming up", file=sys.stderr)
            print("zone example.test is locked by another update", file=sys.stderr)
            sys.exit(3)
        body = {{"host": fqdn, "value": value}} if action == "set" else {{"host": fqdn}}
        request = urllib.request.Request({challtestsrv_url!r} + ("/set-txt" if action == "set" else "/clear-txt"),
                                         data=json.dumps(body).encode(), method="POST")
        urllib.request.build_opener(urllib.request.ProxyHandler({{}})).open(request, timeout=10).read()
        """)
    )
    path.chmod(0o755)
    return f"exec:{path}"


def calls(log: Path) -> list[str]:
    return (
        [line.split()[0] for line in log.read_text().splitlines()]
        if log.exists()
        else []
    )


@pytest.fixture
def publisher(pebble: Pebble, tmp_path: Path) -> tuple[list[str], Path]:
    """``--dns`` options publishing into the session Pebble's challtestsrv, and the call log."""
    log = tmp_path / "dns-calls.log"
    spec = write_publisher(tmp_path / "publish", pebble.challtestsrv_url, log)
    return ["--dns", spec, "--dns-resolver", f"127.0.0.1:{pebble.dns_port}"], log


# -- the exec provider, with the session Pebble ------------------------------------------------


def test_plain_name_via_dns01_then_record_cleared(
    pebble: Pebble, db: str, publisher: tuple[list[str], Path]
) -> None:
    options, log = publisher
    allow(db, "plain.dns.test")
    result = run_cli(
        "issue",
        "plain.dns.test",
        *acme_args(pebble),
        "--http",
        "none",
        "--https",
        "none",
        *options,
        db=db,
    )
    assert result.returncode == 0, result.stderr
    assert calls(log) == ["set", "clear"]
    assert (
        log.read_text().split()[1] == "_acme-challenge.plain.dns.test."
    )  # with the trailing dot
    assert pebble.txt_records("_acme-challenge.plain.dns.test.") == []
    assert dns_records(db) == []


def test_wildcard_certificate_serves_every_name_under_it(
    pebble: Pebble,
    root_ca: str,
    db: str,
    tmp_path: Path,
    publisher: tuple[list[str], Path],
) -> None:
    options, log = publisher
    assert (
        run_cli("allow", "*.wild.test", "--wildcard", db=db).returncode == 2
    )  # no --dns: refused, nothing written
    assert (
        run_cli(
            "allow", "*.wild.test", "--wildcard", "--dns", options[1], db=db
        ).returncode
        == 0
    )
    with ServeProcess(db, pebble, tmp_path, extra=options) as server:
        first = served_certificate(server.https_port, "a.wild.test", root_ca)
        second = served_certificate(server.https_port, "b.wild.test", root_ca)
    assert sans(first) == sans(second) == ["*.wild.test"]
    assert first.serial_number == second.serial_number
    assert calls(log) == ["set", "clear"], "one order, one record"
    report = cli_json("status", db=db)["certificates"]
    assert [(item["name"], item["state"], item["attempts"]) for item in report] == [
        ("*.wild.test", "valid", 1)
    ]
    assert dns_records(db) == []
    # Without --dns the server refuses to start, naming the pattern.
    refused = run_cli(
        "serve",
        "--http",
        "none",
        "--https",
        f"127.0.0.1:{free_port()}",
        "--admin",
        "none",
        *acme_args(pebble),
        db=db,
    )
    assert (
        refused.returncode == 2
        and "*.wild.test" in refused.stderr
        and "--dns" in refused.stderr
    )
    assert len(refused.stderr.strip().splitlines()) == 1


# -- failures and leftovers ---------------------------------------------------------------------


def test_failed_validation_and_failing_command_clear_their_records(
    pebble: Pebble, db: str, tmp_path: Path
) -> None:
    """autocert checks one DNS server and the CA asks another, which never has the record:
    the validation fails at the CA, and the record is cleared all the same. A command that
    fails fails the order with its stderr's last line."""
    log = tmp_path / "dns-calls.log"
    allow(db, "invalid.dns.test")
    with ChalltestsrvDns(tmp_path) as side:
        options = [
            "--dns",
            write_publisher(tmp_path / "publish", side.url, log),
            "--dns-resolver",
            f"127.0.0.1:{side.dns_port}",
        ]
        argv = [
            "issue",
            "invalid.dns.test",
            *acme_args(pebble),
            "--http",
            "none",
            "--https",
            "none",
            *options,
        ]
        result = run_cli(*argv, db=db)
        assert result.returncode == 1
        assert "invalid.dns.test" in result.stderr and "dns-01" in result.stderr, (
            result.stderr
        )
        assert calls(log) == ["set", "clear"]
        assert dns_records(db) == []
        (tmp_path / "FAIL").touch()
        result = run_cli(*argv, "--force", db=db)
    assert result.returncode == 1
    assert (
        "exited with status 3: zone example.test is locked by another update"
        in result.stderr
    ), result.stderr
    assert calls(log)[2:] == ["set", "clear"]
    assert dns_records(db) == []


def test_a_record_left_by_a_killed_process_is_cleared_at_restart(
    pebble: Pebble, db: str, tmp_path: Path, publisher: tuple[list[str], Path]
) -> None:
    options, log = publisher
    allow(db, "crash.dns.test")
    silent = f"127.0.0.1:{free_port()}"  # nothing answers there: the wait for the record never ends
    argv = [
        sys.executable,
        "-m",
        "autocert",
        "--db",
        db,
        "issue",
        "crash.dns.test",
        *acme_args(pebble),
        "--http",
        "none",
        "--https",
        "none",
        options[0],
        options[1],
        "--dns-resolver",
        silent,
        "--dns-timeout",
        "300",
    ]
    process = subprocess.Popen(
        argv,
        env=cli_env(),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def published() -> bool:
            # Noted in the database and published by the hook (which logs before it publishes).
            if calls(log) != ["set"] or len(dns_records(db)) != 1:
                return False
            fqdn, value = dns_records(db)[0]
            return value in pebble.txt_records(fqdn)

        wait_for(published, timeout=60, what="the record to be published")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    fqdn, value = dns_records(db)[0]
    assert value in pebble.txt_records(fqdn)
    result = run_cli(
        "issue",
        "crash.dns.test",
        *acme_args(pebble),
        "--http",
        "none",
        "--https",
        "none",
        *options,
        db=db,
    )
    assert result.returncode == 0, result.stderr
    assert calls(log) == ["set", "clear", "set", "clear"], (
        "cleared at start, then the order resumed"
    )
    assert pebble.txt_records(fqdn) == []
    assert dns_records(db) == []


# -- waiting for propagation --------------------------------------------------------------------


class CountingLookup(DnsLookup):
    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.looks = 0

    async def txt_at(self, fqdn: str, server: tuple[str, int]) -> set[str]:
        self.looks += 1
        return await super().txt_at(fqdn, server)


async def test_a_late_record_is_waited_for_and_a_missing_one_fails_in_time(
    pebble: Pebble,
) -> None:
    lookup = CountingLookup([("127.0.0.1", pebble.dns_port)])
    fqdn, value = "_acme-challenge.late.dns.test.", secrets.token_urlsafe(16)
    waiting = asyncio.ensure_future(
        lookup.wait_visible(fqdn, value, timeout=60, interval=0.1)
    )
    try:
        while lookup.looks < 2:  # looked, found nothing, looked again
            assert not waiting.done()
            await asyncio.sleep(0.02)
        await asyncio.to_thread(
            pebble._challtestsrv_post, "/set-txt", {"host": fqdn, "value": value}
        )
        await asyncio.wait_for(waiting, 30)
    finally:
        waiting.cancel()
        await asyncio.to_thread(pebble._challtestsrv_post, "/clear-txt", {"host": fqdn})
    started = time.monotonic()
    with pytest.raises(DnsError) as failure:
        await lookup.wait_visible(
            "_acme-challenge.never.dns.test.", value, timeout=1, interval=0.2
        )
    assert time.monotonic() - started < 10
    message = str(failure.value)
    assert (
        "\n" not in message
        and "_acme-challenge.never.dns.test." in message
        and "within 1 s" in message
    )


async def test_command_failures_and_timeouts_are_one_line(tmp_path: Path) -> None:
    script = tmp_path / "slow"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(DnsError, match=r"did not finish within 1 s; killed"):
        await CommandProvider(str(script), timeout=1).set(
            "_acme-challenge.x.test.", "v"
        )
    assert time.monotonic() - started < 10
    with pytest.raises(DnsError, match=r"could not start"):
        await CommandProvider(str(tmp_path / "missing")).clear(
            "_acme-challenge.x.test.", "v"
        )


# -- lexicon: only what needs no hosted API -----------------------------------------------------


def test_lexicon_provider_is_checked_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_cli(
        "issue",
        "x.test",
        "--dns",
        "lexicon:no-such-dns-host",
        "--http",
        "none",
        "--https",
        "none",
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "autocert: error: --dns lexicon:no-such-dns-host: lexicon has no provider 'no-such-dns-host' (see `lexicon --help`)"
    )
    monkeypatch.setitem(
        sys.modules, "lexicon._private.discovery", None
    )  # as without the extra installed
    with pytest.raises(ConfigError, match=r"pip install 'autocert\[lexicon\]'"):
        parse_provider("lexicon:cloudflare", DnsLookup())


def test_lexicon_gets_the_zone_found_by_soa_and_the_record_to_change() -> None:
    from lexicon.client import Client
    from lexicon.config import ConfigResolver

    provider = parse_provider("lexicon:cloudflare", DnsLookup())
    config = provider.config(
        "create",
        "sub.example.co.uk.",
        "_acme-challenge.www.sub.example.co.uk.",
        "VALUE",
    )  # type: ignore[attr-defined]
    resolved = ConfigResolver().with_dict(config)
    assert [
        resolved.resolve(f"lexicon:{key}")
        for key in ("provider_name", "action", "type", "name", "content", "delegated")
    ] == [
        "cloudflare",
        "create",
        "TXT",
        "_acme-challenge.www.sub.example.co.uk",
        "VALUE",
        "sub.example.co.uk",
    ]
    assert callable(Client.__enter__), "the context-manager API (lexicon >= 3.12)"


# -- RFC 2136 against Knot DNS ---------------------------------------------------------------


@pytest.fixture
def knot(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """Knot DNS, authoritative for ``knot.test`` on a free loopback port, accepting updates
    signed with a fresh TSIG key; yields (port, the key's secret)."""
    if shutil.which("knotd") is None:
        pytest.skip("knotd is not installed (Debian package knot)")
    root = tmp_path / "knot"
    (root / "db").mkdir(parents=True)
    port, secret = free_port(), base64.b64encode(secrets.token_bytes(32)).decode()
    (root / "knot.test.zone").write_text(
        textwrap.dedent("""\
        $ORIGIN knot.test.
        $TTL 60
        @   SOA ns.knot.test. hostmaster.knot.test. 1 3600 600 86400 60
        @   NS  ns.knot.test.
        ns  A   127.0.0.1
        """)
    )
    (root / "knot.conf").write_text(
        textwrap.dedent(f"""\
        server:
            rundir: "{root}"
            listen: 127.0.0.1@{port}
        database:
            storage: "{root / "db"}"
        control:
            listen: "{root / "knot.sock"}"
        log:
          - target: stderr
            any: info
        key:
          - id: autocert.
            algorithm: hmac-sha256
            secret: {secret}
        acl:
          - id: update
            key: autocert.
            action: update
        zone:
          - domain: knot.test
            storage: "{root}"
            file: "knot.test.zone"
            acl: update
        """)
    )
    log = root / "knotd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["knotd", "-c", str(root / "knot.conf")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(
            lambda: process.poll() is None and _answers_soa(port, "knot.test."),
            timeout=30,
            what="knotd to answer",
        )
        yield port, secret
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_rfc2136_updates_knot_and_pebble_validates_through_it(
    knot: tuple[int, str], pebble_factory, db: str
) -> None:
    port, secret = knot
    ca = pebble_factory(dns_server=f"127.0.0.1:{port}")
    assert (
        run_cli(
            "allow", "*.knot.test", "--wildcard", "--dns", "exec:unused", db=db
        ).returncode
        == 0
    )
    spec = f"rfc2136://autocert.:{secret.replace('/', '%2F')}@127.0.0.1:{port}?algorithm=hmac-sha256"
    result = run_cli(
        "issue",
        "*.knot.test",
        *acme_args(ca),
        "--http",
        "none",
        "--https",
        "none",
        "--dns",
        spec,
        "--dns-resolver",
        f"127.0.0.1:{port}",
        "--json",
        db=db,
    )
    assert result.returncode == 0, result.stderr
    [item] = json.loads(result.stdout)["certificates"]
    assert (item["name"], item["state"]) == ("*.knot.test", "valid")
    assert (
        asyncio.run(
            DnsLookup().txt_at("_acme-challenge.knot.test.", ("127.0.0.1", port))
        )
        == set()
    )
    assert dns_records(db) == []


# -- embedded: the sni_callback path ------------------------------------------------------------


async def test_embedded_sni_callback_orders_the_wildcard_not_the_name(
    pebble: Pebble, root_ca: str, db: str, publisher: tuple[list[str], Path]
) -> None:
    from autocert import Manager
    from autocert._dns import DnsSettings, parse_resolvers

    options, log = publisher
    lookup = DnsLookup(parse_resolvers([options[3]]))
    manager = Manager(
        db,
        pebble.directory_url,
        ca_bundle=pebble.ca_bundle,
        agree_tos=True,
        dns=DnsSettings(parse_provider(options[1], lookup), lookup),
    )
    async with manager:
        await manager.allow("*.embed.test", wildcard=True)

        async def close(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            writer.close()

        server = await asyncio.start_server(
            close, "127.0.0.1", 0, ssl=manager.ssl_context()
        )
        port = server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cafile=root_ca)

        async def served(name: str) -> x509.Certificate | None:
            try:
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client, server_hostname=name
                )
            except (ssl.SSLError, ConnectionError):
                return None  # embedded mode refuses the first handshake while it issues
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            return x509.load_der_x509_certificate(der)

        try:
            deadline = time.monotonic() + 60
            while (certificate := await served("one.embed.test")) is None:
                assert time.monotonic() < deadline, "never served"
                await asyncio.sleep(0.1)
            other = await served("two.embed.test")
        finally:
            server.close()
        assert other is not None and sans(certificate) == sans(other) == [
            "*.embed.test"
        ]
        assert [item["name"] for item in await manager.status()] == ["*.embed.test"]
    assert calls(log) == ["set", "clear"]
