"""The admin listener of ``autocert serve`` against real Pebble: the HTML status page, its
detail view, ``/status.json``, ``/metrics``, ``/healthz``, the bearer token, JSON event logs,
the terminal table, and the page as a real browser renders it.

One server runs for the whole module with three allowed names: one that Pebble validates
(``good``), one whose validation cannot connect (``bad`` resolves to 127.0.0.2, where nothing
listens) and one whose challenge answer is HTML (``evil`` resolves to 127.0.0.3, where a tiny
server answers every request with markup), so that Pebble's problem detail carries ``<``,
``>`` and quotes into the page and the page must escape them.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from support import (
    REPO,
    ServeProcess,
    cli_json,
    eventually,
    free_port,
    handshake,
    openssl_s_client,
    run_cli,
)

GOOD, BAD, EVIL = "good.example.test", "bad.example.test", "evil.example.test"
#: What the fake server at 127.0.0.3 answers instead of the key authorization.
EVIL_BODY = '<script>alert("pwned")</script>'
PROBLEM_PREFIX = "urn:ietf:params:acme:error:"


class _EvilHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = EVIL_BODY.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Fleet:
    server: ServeProcess
    db: str
    root_ca: str
    good_cert: x509.Certificate
    workdir: Path
    directory: str

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.admin_port}{path}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
        return http_get(self.url(path), headers)


def raw_status(port: int, path: str, header_lines: bytes) -> int:
    """The status code of a GET sent as raw bytes, for headers an HTTP library would refuse to send."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + header_lines + b"\r\n")
        answer = b""
        while b"\r\n" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


@pytest.fixture(scope="module")
def fleet(pebble, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("status-page")
    db = f"sqlite:///{workdir / 'autocert.db'}"
    root_ca = workdir / "pebble-root.pem"
    root_ca.write_bytes(pebble.root_pem())
    assert run_cli("allow", GOOD, BAD, EVIL, db=db).returncode == 0

    evil = ThreadingHTTPServer(("127.0.0.3", pebble.http01_port), _EvilHandler)
    evil_thread = threading.Thread(target=evil.serve_forever, daemon=True)
    evil_thread.start()
    pebble.add_a(BAD, "127.0.0.2")
    pebble.add_a(EVIL, "127.0.0.3")
    server = ServeProcess(db, pebble, workdir, extra=["--log-format", "json"])
    try:
        server.start()
        good_cert = handshake(server.https_port, GOOD, cafile=str(root_ca), timeout=60)
        # First contact for the failing names: the handshake waits for the order, which
        # fails at validation, so the client is refused and the failure is recorded.
        for name in (BAD, EVIL):
            with pytest.raises((ssl.SSLError, OSError)):
                handshake(server.https_port, name, cafile=str(root_ca), timeout=60)

        def settled() -> bool:
            states = {item["name"]: item["state"] for item in cli_json("status", db=db)["certificates"]}
            return states == {GOOD: "valid", BAD: "failed", EVIL: "failed"}

        eventually(settled, timeout=60, what="one valid and two failed names")
        yield Fleet(server, db, str(root_ca), good_cert, workdir, pebble.directory_url)
    finally:
        server.stop()
        evil.shutdown()
        evil.server_close()
        pebble.clear_a(BAD)
        pebble.clear_a(EVIL)


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- /status.json ------------------------------------------------------------------------------


def test_status_json_is_the_contract_shape_and_matches_the_cli(fleet: Fleet) -> None:
    status, body, headers = fleet.get("/status.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    report = json.loads(body)["certificates"]
    # The CLI knows the CA only from its environment (for names with no certificate yet).
    cli = run_cli("status", "--json", db=fleet.db, env={"AUTOCERT_DIRECTORY": fleet.directory})
    assert report == json.loads(cli.stdout)["certificates"], "the page and the CLI must agree"
    by_name = {item["name"]: item for item in report}
    assert sorted(by_name) == sorted([GOOD, BAD, EVIL])
    required = {"name", "state", "not_before", "not_after", "renew_at", "serial", "issuer", "directory", "attempts", "last_error", "next_attempt_at"}
    for item in report:
        assert required <= set(item), item

    good = by_name[GOOD]
    assert good["state"] == "valid"
    assert good["serial"] == format(fleet.good_cert.serial_number, "x")
    assert parse_time(good["not_before"]) == fleet.good_cert.not_valid_before_utc
    assert parse_time(good["not_after"]) == fleet.good_cert.not_valid_after_utc
    assert parse_time(good["not_before"]) < parse_time(good["renew_at"]) < parse_time(good["not_after"])
    assert "Pebble" in good["issuer"]
    assert good["directory"] == fleet.directory
    assert good["attempts"] == 1 and good["last_error"] is None and good["next_attempt_at"] is None

    now = datetime.now(timezone.utc)
    for name in (BAD, EVIL):
        item = by_name[name]
        assert item["state"] == "failed"
        assert item["attempts"] == 1
        assert item["not_before"] is None and item["not_after"] is None and item["renew_at"] is None
        assert item["serial"] is None and item["issuer"] is None
        assert item["directory"] == good["directory"]
        assert item["last_error"].startswith(PROBLEM_PREFIX), item["last_error"]
        assert parse_time(item["next_attempt_at"]) > now, "a failed name has its retry scheduled"
    assert "127.0.0.2" in by_name[BAD]["last_error"]
    assert EVIL_BODY in by_name[EVIL]["last_error"].replace('\\"', '"')


# -- the HTML pages -----------------------------------------------------------------------------


def rows(page: str) -> dict[str, str]:
    """name -> the <tr> element's opening tag (its classes and data attributes)."""
    return {m.group(2): m.group(0) for m in re.finditer(r'<tr class="([^"]*)" data-name="([^"]+)"[^>]*>', page)}


def test_status_page_lists_every_name_with_its_state_and_escaped_error(fleet: Fleet) -> None:
    status, page, headers = fleet.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert "<script" not in page, "the page needs no JavaScript, and the CA's text must not become markup"
    assert "&lt;script&gt;alert(" in page, "the problem detail is shown, escaped"
    found = rows(page)
    assert set(found) == {GOOD, BAD, EVIL}
    assert 'data-state="valid"' in found[GOOD] and "attention" not in found[GOOD]
    for name in (BAD, EVIL):
        assert 'data-state="failed"' in found[name] and "state-failed" in found[name] and "attention" in found[name]
    # Failing names come first by default: they need attention.
    assert page.index(f'data-name="{GOOD}"') > max(page.index(f'data-name="{BAD}"'), page.index(f'data-name="{EVIL}"'))
    issuer_cn = fleet.good_cert.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert f">{issuer_cn}</span>" in page
    assert fleet.good_cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC") in page
    # The problem types, shown apart from their detail.
    assert f'<span class="ptype">{PROBLEM_PREFIX}connection</span>' in page
    assert f'<span class="ptype">{PROBLEM_PREFIX}unauthorized</span>' in page
    # The recent event log of this process.
    events = page[page.index('id="events"') :]
    assert "issued" in events and "failed" in events and GOOD in events and BAD in events


def test_status_page_filters_and_sorts(fleet: Fleet) -> None:
    _, failed, _ = fleet.get("/?state=failed")
    assert set(rows(failed)) == {BAD, EVIL}
    assert 'aria-current="page">failed' in failed
    _, valid, _ = fleet.get("/?state=valid")
    assert set(rows(valid)) == {GOOD}
    _, none, _ = fleet.get("/?state=expired")
    assert rows(none) == {} and "No name is expired." in none
    _, by_name, _ = fleet.get("/?sort=name")
    assert list(rows(by_name)) == sorted([GOOD, BAD, EVIL])
    _, reversed_, _ = fleet.get("/?sort=-name")
    assert list(rows(reversed_)) == sorted([GOOD, BAD, EVIL], reverse=True)
    # Links keep the other parameter.
    assert 'href="?sort=name&amp;state=failed"' in fleet.get("/?state=failed&sort=name")[1]
    assert fleet.get("/?state=bogus")[0] == 400
    assert fleet.get("/?sort=bogus")[0] == 400


def test_detail_page_shows_the_attempt_history(fleet: Fleet) -> None:
    status, page, _ = fleet.get(f"/name/{BAD}")
    assert status == 200
    assert "<h2" in page and BAD in page
    attempts = page[page.index('id="attempts"') : page.index('id="events"')]
    assert attempts.count('class="result-failed') == 1
    assert f"{PROBLEM_PREFIX}connection" in attempts and "127.0.0.2" in attempts

    status, page, _ = fleet.get(f"/name/{GOOD}")
    assert status == 200
    assert format(fleet.good_cert.serial_number, "x") in page
    assert 'class="result-valid"' in page
    _, evil, _ = fleet.get(f"/name/{EVIL}")
    assert "<script" not in evil and "&lt;script&gt;" in evil
    assert fleet.get("/name/never-seen.example.test")[0] == 404
    assert fleet.get("/name/not..a..name")[0] == 404


# -- /metrics and /healthz -----------------------------------------------------------------------


def scrape(fleet: Fleet) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body, headers = fleet.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_attempts_handshakes_cache_and_expiry(fleet: Fleet) -> None:
    before = scrape(fleet)
    assert before[("autocert_issuance_attempts_total", (("result", "valid"),))] == 1
    assert before[("autocert_issuance_attempts_total", (("result", "failed"),))] == 2
    assert before[("autocert_events_total", (("event", "issued"),))] == 1
    assert before[("autocert_events_total", (("event", "failed"),))] == 2
    assert before[("autocert_handshakes_total", (("outcome", "pending"),))] == 2, "the two refused first contacts"
    assert before[("autocert_handshakes_total", (("outcome", "served"),))] >= 1
    assert before[("autocert_issuance_in_flight", ())] == 0
    assert before[("autocert_context_cache_size", ())] == 1
    assert before[("autocert_certificates", ())] == 1
    remaining = (fleet.good_cert.not_valid_after_utc - datetime.now(timezone.utc)).total_seconds()
    assert abs(before[("autocert_certificate_soonest_expiry_seconds", ())] - remaining) < 120
    assert before[("autocert_acme_request_duration_seconds_count", (("method", "POST"),))] >= 6, "account, order, authz, challenge, finalize, download"
    assert before[("autocert_acme_request_duration_seconds_count", (("method", "GET"),))] >= 1, "the directory"

    # An unknown name costs an alert, and is counted.
    assert "alert number 112" in openssl_s_client(fleet.server.https_port, "unknown.example.test")
    handshake(fleet.server.https_port, GOOD, cafile=fleet.root_ca)
    after = scrape(fleet)
    unknown = ("autocert_handshakes_total", (("outcome", "unknown_name"),))
    served = ("autocert_handshakes_total", (("outcome", "served"),))
    assert after[unknown] == before[unknown] + 1
    assert after[served] == before[served] + 1
    assert after[("autocert_context_cache_hits_total", ())] > before[("autocert_context_cache_hits_total", ())]
    assert 0 < after[("autocert_context_cache_hit_ratio", ())] <= 1


def test_healthz_reports_ok(fleet: Fleet) -> None:
    assert fleet.get("/healthz")[:2] == (200, "ok\n")


# -- logs and the terminal table -----------------------------------------------------------------


def test_event_log_lines_are_json_with_event_fields(fleet: Fleet) -> None:
    lines = [json.loads(line) for line in fleet.server.stderr_path.read_text().splitlines() if line.startswith("{")]
    events = [line for line in lines if "event" in line]
    issued = [line for line in events if line["event"] == "issued"]
    failed = [line for line in events if line["event"] == "failed"]
    assert [(line["name"], line["state"], line["error"]) for line in issued] == [(GOOD, "valid", None)]
    assert sorted(line["name"] for line in failed) == [BAD, EVIL]
    for line in failed:
        assert line["state"] == "failed" and line["error"].startswith(PROBLEM_PREFIX) and line["level"] == "warning"


def run_in_terminal(*args: str, db: str) -> str:
    """Run the CLI with stdout on a pseudo-terminal, as a person at a shell would."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "autocert", "--db", db, *args], stdout=terminal, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, env=env, cwd=REPO)
    os.close(terminal)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=60) == 0, process.stderr.read() if process.stderr else ""
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_status_table_is_aligned_and_coloured_only_on_a_terminal(fleet: Fleet) -> None:
    piped = run_cli("status", db=fleet.db)
    assert piped.returncode == 0 and "\x1b[" not in piped.stdout
    header, *lines = piped.stdout.splitlines()
    assert header.split() == ["NAME", "STATE", "DAYS", "LEFT", "NOT", "AFTER", "RENEW", "AT", "ATTEMPTS", "NEXT", "ATTEMPT", "CA", "LAST", "ERROR"]
    state_column = header.index("STATE")
    assert {line[state_column:].split()[0] for line in lines} == {"valid", "failed"}
    good_line = next(line for line in lines if line.startswith(GOOD))
    days = float(good_line[state_column:].split()[1])
    expected = (fleet.good_cert.not_valid_after_utc - datetime.now(timezone.utc)).total_seconds() / 86400
    assert abs(days - expected) < 1

    coloured = run_in_terminal("status", db=fleet.db)
    assert "\x1b[32mvalid\x1b[0m" in coloured
    assert "\x1b[1;31mfailed\x1b[0m" in coloured
    plain = re.sub(r"\x1b\[[0-9;]*m", "", coloured)
    assert plain.splitlines() == piped.stdout.splitlines(), "colour must not change the alignment"


# -- the admin token and public binding ------------------------------------------------------------


def test_admin_token_is_required_when_set(pebble, fleet: Fleet) -> None:
    # A second server on the same database, with its own listeners (it orders nothing).
    token = "s3cret-token"
    server = ServeProcess(fleet.db, pebble, fleet.workdir, https_port=free_port(), http_port=free_port(), extra=["--admin-token", token])
    with server:
        base = f"http://127.0.0.1:{server.admin_port}"
        for path in ("/", "/status.json", "/metrics", "/healthz", f"/name/{GOOD}"):
            status, body, headers = http_get(base + path)
            assert status == 401 and headers.get("WWW-Authenticate") == "Bearer", path
            assert http_get(base + path, {"Authorization": "Bearer wrong"})[0] == 401
            assert http_get(base + path, {"Authorization": token})[0] == 401, "the Bearer scheme is required"
            assert raw_status(server.admin_port, path, b"Authorization: Bearer \xff\xfe\r\n") == 401, "a header that is not UTF-8"
            status, body, _ = http_get(base + path, {"Authorization": f"Bearer {token}"})
            assert status == 200, (path, body)
        assert GOOD in http_get(base + "/", {"Authorization": f"Bearer {token}"})[1]


def test_public_admin_without_token_is_refused(fleet: Fleet) -> None:
    result = run_cli("serve", "--admin", f"0.0.0.0:{free_port()}", "--https", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}",
                     db=fleet.db, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "--admin-token" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "listening" not in result.stdout


# -- in a real browser ---------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    argv = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_status_page_in_a_browser(fleet: Fleet, tmp_path: Path) -> None:
    dom = chromium(tmp_path, "--dump-dom", fleet.url("/"))
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    found = rows(html)
    assert set(found) == {GOOD, BAD, EVIL}
    assert "attention" in found[BAD] and "attention" not in found[GOOD]
    assert "<script" not in html, "the CA's text stays text after the browser parsed the page"
    # Pebble quotes the body Go-style: alert(\"pwned\").
    assert '&lt;script&gt;alert(\\"pwned\\")&lt;/script&gt;' in html

    wide = tmp_path / "status-page.png"
    shot = chromium(tmp_path, f"--screenshot={wide}", "--window-size=1400,820", fleet.url("/"))
    assert shot.returncode == 0 and wide.exists(), shot.stderr[-2000:]
    assert png_size(wide) == (1400, 820)
    phone = tmp_path / "status-page-phone.png"
    shot = chromium(tmp_path, f"--screenshot={phone}", "--window-size=390,844", fleet.url("/"))
    assert shot.returncode == 0 and png_size(phone) == (390, 844)
    if os.environ.get("AUTOCERT_UPDATE_SCREENSHOTS"):
        # Refresh the picture in the README only when asked, so test runs leave the tree clean.
        shutil.copyfile(wide, REPO / "docs" / "status-page.png")
        shutil.copyfile(phone, REPO / "docs" / "status-page-phone.png")



# -- /healthz failures, in process --------------------------------------------------------------------


async def test_healthz_is_503_with_the_reason(tmp_path: Path) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    import autocert
    from autocert.web import status_app

    manager = autocert.Manager(db=f"sqlite:///{tmp_path / 'health.db'}", directory="https://127.0.0.1:9/dir", renew=False)
    listener_down: list[str] = []
    app = status_app(manager, checks=[lambda: listener_down[0] if listener_down else None])
    await manager.start()
    try:
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/healthz")
            assert (response.status, await response.text()) == (200, "ok\n")
            listener_down.append("https listener stopped accepting connections")
            response = await client.get("/healthz")
            assert (response.status, await response.text()) == (503, "https listener stopped accepting connections\n")
            listener_down.clear()
            await manager.stop()  # the database is gone
            response = await client.get("/healthz")
            assert response.status == 503 and (await response.text()).startswith("database unavailable:")
    finally:
        await manager.stop()


async def test_status_app_mounts_under_a_prefix_in_an_embedding_app(tmp_path: Path) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    import autocert
    from autocert._monitor import ExpiryMonitor
    from autocert.web import setup, status_app

    manager = autocert.Manager(db=f"sqlite:///{tmp_path / 'embed.db'}", directory="https://127.0.0.1:9/dir", renew=False)
    app = web.Application()
    setup(app, manager)
    app.add_subapp("/autocert/", status_app(manager))
    async with TestClient(TestServer(app)) as client:
        await manager.allow("embedded.example.test")
        response = await client.get("/autocert/")
        page = await response.text()
        assert response.status == 200 and 'data-name="embedded.example.test"' in page
        assert 'href="name/embedded.example.test"' in page and 'href="./status.json"' in page, "links stay under the prefix"
        response = await client.get("/autocert/name/embedded.example.test")
        assert response.status == 200 and 'href="../"' in await response.text()
        assert (await client.get("/autocert/metrics")).status == 200
        assert (await (await client.get("/autocert/status.json")).json())["certificates"][0]["state"] == "pending"
        assert ExpiryMonitor.of(manager)._task is not None, "the expiry monitor runs with the app"
    assert ExpiryMonitor.of(manager)._task is None, "and stops with it"
