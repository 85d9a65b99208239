"""``autocert serve`` end to end against a real Pebble, with real TLS clients."""

from __future__ import annotations

import resource
import signal
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from pebble import free_port, wait_for
from support import ServeProcess, cli_json, client_context, eventually, handshake, openssl_s_client, run_cli, served_certificate


def sans(certificate: x509.Certificate) -> list[str]:
    return certificate.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value.get_values_for_type(x509.DNSName)


def table_counts(db: str) -> dict[str, int]:
    path = db.removeprefix("sqlite:///")
    with sqlite3.connect(path) as connection:
        tables = [row[0] for row in connection.execute("select name from sqlite_master where type='table'")]
        return {table: connection.execute(f"select count(*) from {table}").fetchone()[0] for table in tables}


def test_a_connection_made_while_serve_starts_waits_and_is_served(pebble, root_ca: str, db: str, tmp_path: Path) -> None:
    """The ports are bound before the server's modules load, so a client that connects during
    a start or restart is queued by the kernel and answered, never refused."""
    assert run_cli("allow", "early.example.test", db=db).returncode == 0
    server = ServeProcess(db, pebble, tmp_path).launch()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.process is not None and server.process.poll() is None, server.output()
            try:
                raw = socket.create_connection(("127.0.0.1", server.https_port), timeout=60)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the https port never accepted a connection"
                time.sleep(0.005)
        accepted_before_ready = not server.ready()
        with client_context(root_ca).wrap_socket(raw, server_hostname="early.example.test") as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None and sans(x509.load_der_x509_certificate(der)) == ["early.example.test"]
        assert accepted_before_ready, "the port should accept while the server is still loading"
    finally:
        server.stop()


def test_issue_on_first_contact_serve_and_restart(pebble, root_ca: str, db: str, tmp_path: Path) -> None:
    assert run_cli("allow", "shop.example.test", db=db).returncode == 0
    server = ServeProcess(db, pebble, tmp_path).start()
    try:
        # The very first handshake waits for issuance and gets a certificate that verifies
        # to Pebble's root for exactly this name.
        first = handshake(server.https_port, "shop.example.test", cafile=root_ca, timeout=60)
        assert sans(first) == ["shop.example.test"]

        report = cli_json("status", db=db)["certificates"]
        (entry,) = [item for item in report if item["name"] == "shop.example.test"]
        assert entry["state"] == "valid"
        assert entry["serial"] == format(first.serial_number, "x")
        assert entry["attempts"] == 1 and entry["last_error"] is None
        assert entry["directory"] == pebble.directory_url
        for field in ("not_before", "not_after", "renew_at", "issuer"):
            assert entry[field]

        # The admin listener reports the same data.
        with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/status.json", timeout=10) as response:
            import json

            assert json.load(response)["certificates"] == report
        with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/healthz", timeout=10) as response:
            assert response.status == 200

        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 5, "SIGTERM should stop serve within a few seconds"
    finally:
        server.stop()

    restarted = ServeProcess(db, pebble, tmp_path).start()
    try:
        again = handshake(restarted.https_port, "shop.example.test", cafile=root_ca, timeout=30)
        assert again.serial_number == first.serial_number, "a restart must serve the stored certificate"
        assert cli_json("status", db=db)["certificates"][0]["attempts"] == 1, "no re-issuance after restart"
    finally:
        restarted.stop()


def test_unknown_name_gets_alert_112_and_leaves_no_trace(pebble, db: str, tmp_path: Path) -> None:
    assert run_cli("allow", "known.example.test", db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path) as server:
        # The one row a start writes (the database-wide duties lease) comes a moment after ready.
        wait_for(lambda: table_counts(db).get("leases") == 1, timeout=60, what="the duties lease")
        before = table_counts(db)
        output = openssl_s_client(server.https_port, "unknown.example.test")
        assert "alert number 112" in output, output
        # No SNI at all: an alert too, not a silent close.
        assert "alert number 112" in openssl_s_client(server.https_port, None), "no-SNI client must get alert 112"
        with pytest.raises(Exception, match="UNRECOGNIZED_NAME"):
            handshake(server.https_port, "unknown.example.test")
        assert table_counts(db) == before, "an unknown name must not create any row"
        report = cli_json("status", db=db)["certificates"]
        assert [item["name"] for item in report] == ["known.example.test"]
        assert report[0]["state"] == "pending"
    assert "unknown.example.test" not in pebble.logs()


def test_http_listener_redirects_and_answers_challenges(pebble, db: str, tmp_path: Path) -> None:
    with ServeProcess(db, pebble, tmp_path) as server:
        request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/some/path?q=1", headers={"Host": "www.example.test"})

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                return None

        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as caught:
            opener.open(request, timeout=10)
        assert caught.value.code == 308
        assert caught.value.headers["Location"] == f"https://www.example.test:{server.https_port}/some/path?q=1"

        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/.well-known/acme-challenge/nope", timeout=10)
        assert missing.value.code == 404


def test_issue_command_while_serve_runs_is_picked_up_without_restart(pebble, root_ca: str, db: str, tmp_path: Path) -> None:
    """The CLI orders while serve holds the ports: serve answers the stored http-01 token and
    the next handshake gets the new certificate."""
    assert run_cli("allow", "cli.example.test", db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path) as server:
        result = run_cli("issue", "cli.example.test", "--wait", "60", "--http", f"127.0.0.1:{server.http_port}",
                         "--directory", pebble.directory_url, "--ca-bundle", pebble.ca_bundle, "--agree-tos", db=db)
        assert result.returncode == 0, result.stderr
        serial = cli_json("status", "cli.example.test", db=db)["certificates"][0]["serial"]
        certificate = served_certificate(server.https_port, "cli.example.test", root_ca)
        assert format(certificate.serial_number, "x") == serial


def test_sigint_stops_cleanly(pebble, db: str, tmp_path: Path) -> None:
    server = ServeProcess(db, pebble, tmp_path).start()
    server.signal(signal.SIGINT)
    assert server.process is not None
    assert server.process.wait(timeout=10) == 0
    assert "Traceback" not in server.stderr_path.read_text()


def test_disallow_stops_serving_without_restart(pebble, root_ca: str, db: str, tmp_path: Path) -> None:
    assert run_cli("allow", "gone.example.test", db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path) as server:
        handshake(server.https_port, "gone.example.test", cafile=root_ca, timeout=60)
        assert run_cli("disallow", "gone.example.test", db=db).returncode == 0

        def refused() -> bool:
            return "alert number 112" in openssl_s_client(server.https_port, "gone.example.test")

        eventually(refused, timeout=5, what="the disallowed name to be refused")
        state = cli_json("status", "gone.example.test", db=db)["certificates"][0]["state"]
        assert state == "disallowed"


def test_concurrent_first_contacts_share_one_order(pebble, root_ca: str, db: str, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    assert run_cli("allow", "*.crowd.example.test", db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path) as server:
        with ThreadPoolExecutor(max_workers=8) as pool:
            certificates = list(pool.map(lambda _: handshake(server.https_port, "one.crowd.example.test", cafile=root_ca, timeout=60), range(8)))
        assert len({c.serial_number for c in certificates}) == 1, "all first contacts must get the same certificate"
        (entry,) = cli_json("status", "one.crowd.example.test", db=db)["certificates"]
        assert entry["attempts"] == 1 and entry["state"] == "valid"


def test_pattern_cap_limits_on_demand_names(pebble, root_ca: str, db: str, tmp_path: Path) -> None:
    assert run_cli("allow", "*.tenants.example.test", "--cap", "2", db=db).returncode == 0
    listed = cli_json("list", db=db)["allowed"]
    assert listed == [{"name": "*.tenants.example.test", "added_at": listed[0]["added_at"], "cap": 2, "wildcard": False}]
    with ServeProcess(db, pebble, tmp_path) as server:
        for tenant in ("one", "two"):
            handshake(server.https_port, f"{tenant}.tenants.example.test", cafile=root_ca, timeout=60)
        assert "alert number 112" in openssl_s_client(server.https_port, "three.tenants.example.test")
        handshake(server.https_port, "one.tenants.example.test", cafile=root_ca)  # names within the cap stay served
    names = [item["name"] for item in cli_json("status", db=db)["certificates"]]
    assert names == ["one.tenants.example.test", "two.tenants.example.test"], "the third name must not be ordered"


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_stop_signal_at_any_moment_exits_cleanly(pebble, db: str, tmp_path: Path, loop: str) -> None:
    """SIGTERM or SIGINT while serve starts (imports, binding, opening the database, the first
    scans) or runs: exit 0, with no traceback and no error in the log. Only a signal that lands
    while the interpreter itself is still starting, before ``python -m autocert`` has run a line
    of its own, ends the process Python's default way (killed by it; for SIGINT, Python's
    own KeyboardInterrupt report from inside its start-up imports)."""
    assert run_cli("allow", "clean.example.test", db=db).returncode == 0
    moments: list[float | str] = [0.0, 0.15, 0.4, 0.8, "ready", "ready"]
    for index, moment in enumerate(moments):
        signum = signal.SIGTERM if index % 2 == 0 else signal.SIGINT
        server = ServeProcess(db, pebble, tmp_path, env={"AUTOCERT_EVENT_LOOP": loop}, https_port=free_port(),
                              http_port=free_port())
        server.launch()
        assert server.process is not None
        if moment == "ready":
            wait_for(server.ready, timeout=60, what="serve to listen")
        else:
            time.sleep(float(moment))  # where in start-up the signal lands: a probe, nothing is waited for
        server.signal(signum)
        code = server.process.wait(timeout=60)
        log = server.stderr_path.read_text()
        where = f"{signal.Signals(signum).name} at {moment}: exit {code}\n{server.output()}"
        before_autocert = not log or (log.rstrip().endswith("KeyboardInterrupt") and "_cli.py" not in log and "autocert." not in log)
        if code == -signum and before_autocert and "listening" not in server.stdout_path.read_text():
            continue  # the interpreter was still starting: nothing of autocert's had begun
        assert code == 0, where
        assert "Traceback" not in log and " ERROR " not in log, where


def test_serve_raises_its_open_file_limit_to_the_hard_limit(pebble, db: str, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"the hard open-file limit here ({hard}) leaves nothing to raise")
    server = ServeProcess(db, pebble, tmp_path, https_port=free_port(), http_port=free_port())
    server.launch(open_files=(256, hard))
    try:
        wait_for(server.ready, timeout=60, what="serve to listen")
        limits = Path(f"/proc/{server.process.pid}/limits").read_text()
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)], line
    finally:
        assert server.stop() == 0


def accept_queue(port: int) -> int:
    """Connections waiting in the kernel for the listener on ``port`` to accept them."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


def test_a_connection_accepted_before_sigterm_gets_its_handshake_and_a_response(pebble, root_ca: str, db: str, tmp_path: Path) -> None:
    """A stop (or a worker's replacement) drops no connection it had accepted: one whose
    ClientHello comes after the signal is still answered, then closed."""
    assert run_cli("allow", "drain.example.test", db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path) as server:
        assert server.process is not None
        served_certificate(server.https_port, "drain.example.test", root_ca)
        raw = socket.create_connection(("127.0.0.1", server.https_port), timeout=30)
        wait_for(lambda: accept_queue(server.https_port) == 0, timeout=30, what="serve to accept the connection")
        server.signal(signal.SIGTERM)
        wait_for(lambda: "shutting down" in server.output(), timeout=30, what="serve to start its drain")
        with client_context(root_ca).wrap_socket(raw, server_hostname="drain.example.test") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: drain.example.test\r\n\r\n")
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
        head = response.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 200"), response[:300]
        assert b"connection: close" in head
        assert server.process.wait(timeout=60) == 0
