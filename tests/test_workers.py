"""``serve --workers``: a supervisor, worker processes sharing the listeners, one admin view,
and the duties lease, end to end with real processes, real TLS clients and Pebble."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pebble import Pebble, free_port, wait_for
from support import Requests, ServeProcess, client_context, run_cli, served_certificate

from autocert._board import FIGURES, Board
from autocert._config import Listen, ServeOptions, bind_worker_listeners, close_sockets
from autocert._duties import DUTIES_LEASE, DUTIES_LEASE_SECONDS
from autocert._proxy_protocol import proxy_header

NAME = "cores.example.test"
#: Ordered with tls-alpn-01 on first contact: the CA's validation reaches whichever worker the
#: kernel picks, which must answer for an order another worker placed.
FIRST_CONTACTS = [NAME, "a.cores.example.test", "b.cores.example.test", "c.cores.example.test"]


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rss_kib(pid: int) -> int:
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1])


def metrics(server: ServeProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/metrics", timeout=30) as response:
        return response.read().decode()


def value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} missing from /metrics"
    return float(match.group(1))


def per_worker(text: str) -> dict[int, float]:
    """Handshakes per worker pid, from ``autocert_worker_handshakes_total``."""
    found = re.findall(r'^autocert_worker_handshakes_total\{pid="(\d+)",worker="\d+"\} (\S+)$', text, re.MULTILINE)
    return {int(pid): float(count) for pid, count in found}


def duties_holder(db: str) -> int | None:
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:
        row = connection.execute("select lease_owner from leases where name = ? and lease_owner is not null", (DUTIES_LEASE,)).fetchone()
    return int(row[0].split(":")[1]) if row else None


class Workers(ServeProcess):
    #: Pebble's root, which verifies what the server presents.
    root_ca: str


@pytest.fixture(scope="module")
def workers(pebble: Pebble, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    """One `serve --workers 2` with no http listener for the tests below, with certificates for
    FIRST_CONTACTS already served."""
    workdir = tmp_path_factory.mktemp("workers")
    db = f"sqlite:///{workdir / 'workers.db'}"
    assert run_cli("allow", *FIRST_CONTACTS, db=db).returncode == 0
    root = workdir / "pebble-root.pem"
    root.write_bytes(pebble.root_pem())
    server = Workers(db, pebble, workdir, extra=["--workers", "2", "--http", "none"])
    server.root_ca = str(root)
    server.start(timeout=120)
    try:
        assert server.process is not None
        wait_for(lambda: len(children(server.process.pid)) == 2, timeout=60, what="two workers")
        try:
            for name in FIRST_CONTACTS:
                served_certificate(server.https_port, name, str(root))
        except TimeoutError:
            raise AssertionError(server.output()) from None
        yield server
    finally:
        server.stop(timeout=60)


def test_the_kernel_spreads_handshakes_over_the_workers_and_the_admin_listener_sums_them(workers: Workers, pebble: Pebble) -> None:
    before = metrics(workers)
    total_before = value(before, 'autocert_handshakes_total{outcome="served"}')
    assert value(before, "autocert_workers") == 2
    with urllib.request.urlopen(f"http://127.0.0.1:{workers.admin_port}/healthz", timeout=30) as response:
        assert response.status == 200
    assert value(before, "autocert_context_cache_capacity") == 10000, "--cache-size is the whole server's, split among the workers"
    count = 600
    with Requests(workers.https_port, NAME, workers.root_ca, threads=6, get=False) as clients:
        clients.more(count, f"{count} handshakes", timeout=180)
    assert not clients.failures, clients.failures[:5]
    done = clients.ok

    def summed() -> bool:
        text = metrics(workers)
        return value(text, 'autocert_handshakes_total{outcome="served"}') >= total_before + done

    wait_for(summed, timeout=30, what="every worker's handshakes in the admin listener's sum")
    text = metrics(workers)
    totals = per_worker(text)
    assert len(totals) == 2
    assert sum(totals.values()) == sum(value(text, f'autocert_handshakes_total{{outcome="{o}"}}')
                                       for o in ("served", "unknown_name", "held", "pending", "challenge"))
    started = per_worker(before)
    shares = {pid: count - started.get(pid, 0) for pid, count in totals.items()}  # this test's own
    print(f"handshakes per worker: {shares}")
    assert min(shares.values()) >= 0.4 * sum(shares.values()), f"one worker did most of the handshakes: {shares}"


def test_a_killed_worker_is_replaced_at_once_while_the_other_keeps_serving(workers: Workers, pebble: Pebble) -> None:
    assert workers.process is not None
    supervisor = workers.process.pid
    before = children(supervisor)
    threads = 4
    with Requests(workers.https_port, NAME, workers.root_ca, threads=threads, get=False) as clients:
        clients.more(50, "clients under way")
        victim = max(before)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(supervisor) - before) == 1, timeout=30, what="a replacement worker")
        replaced_in = time.monotonic() - killed
        clients.more(200, "handshakes after the replacement")
    print(f"replacement started {replaced_in * 1000:.0f} ms after the kill; {len(clients.failures)} handshakes failed")
    assert replaced_in < 1.0, f"the replacement started {replaced_in:.2f} s after the kill"
    # Only connections the killed worker was in the middle of can fail: at most one per client thread.
    assert len(clients.failures) <= threads, f"{len(clients.failures)} handshakes failed"
    assert all(at - killed < 1.0 for at, _ in clients.failures), f"a handshake failed long after the kill: {clients.failures}"
    replacement = (children(supervisor) - before).pop()
    wait_for(lambda: replacement in per_worker(metrics(workers)), timeout=60, what="the replacement in /metrics")


def test_another_worker_takes_the_duties_lease_when_its_holder_is_killed(workers: Workers) -> None:
    assert workers.process is not None
    wait_for(lambda: duties_holder(workers.db) is not None, timeout=60, what="a holder of the duties lease")
    holder = duties_holder(workers.db)
    assert holder in children(workers.process.pid)
    killed = time.monotonic()
    os.kill(holder, signal.SIGKILL)

    def taken_over() -> bool:
        now = duties_holder(workers.db)
        return now is not None and now != holder and alive(now)

    wait_for(taken_over, timeout=60, what="another worker to take the duties lease")
    took = time.monotonic() - killed
    print(f"duties lease taken over {took:.1f} s after the kill")
    assert took <= DUTIES_LEASE_SECONDS, f"the duties lease was taken over after {took:.1f} s"
    assert duties_holder(workers.db) in children(workers.process.pid)


def test_sighup_replaces_every_worker_while_clients_keep_being_served(workers: Workers) -> None:
    assert workers.process is not None
    supervisor = workers.process.pid
    before = children(supervisor)
    with Requests(workers.https_port, NAME, workers.root_ca, threads=4) as clients:
        clients.more(50, "clients under way")
        os.kill(supervisor, signal.SIGHUP)

        def replaced() -> bool:
            now = children(supervisor)
            return len(now) == 2 and not now & before

        wait_for(replaced, timeout=120, what="every worker replaced")
        clients.more(100, "requests after the replacement")
    assert not clients.failures, f"{len(clients.failures)} requests failed during the replacement: {clients.failures[:5]}"
    assert value(metrics(workers), "autocert_workers") == 2


def test_workers_stop_when_their_supervisor_is_killed(workers: Workers) -> None:
    """Orphaned workers would hold the ports against the next start: they stop by themselves.
    (The last test of the shared server.)"""
    assert workers.process is not None
    pids = children(workers.process.pid)
    workers.process.kill()
    workers.process.wait()
    try:
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=60, what="the orphaned workers to stop")
    except TimeoutError:
        raise AssertionError(f"still running: {[pid for pid in pids if alive(pid)]}\n{workers.output()[-4000:]}") from None


def test_workers_still_starting_when_their_supervisor_is_killed_stop_too(pebble: Pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'early.db'}"
    server = ServeProcess(db, pebble, tmp_path, extra=["--workers", "2"], https_port=free_port(), http_port=free_port()).launch()
    assert server.process is not None
    supervisor = server.process.pid
    pids: set[int] = set()
    try:
        wait_for(lambda: len(children(supervisor)) == 2, timeout=60, what="two workers spawned")
        pids = children(supervisor)
        server.process.kill()  # before the workers are ready: they are still importing
        server.process.wait()
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=120, what="the orphaned workers to stop")
    finally:
        server.process.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "the supervisor (pid %d) is gone" % supervisor in server.output()


def test_sigterm_to_the_supervisor_drains_every_worker_and_it_stays_small(pebble: Pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'drain.db'}"
    server = ServeProcess(db, pebble, tmp_path, extra=["--workers", "2"], https_port=free_port(), http_port=free_port()).start(timeout=120)
    assert server.process is not None
    pids = children(server.process.pid)
    assert len(pids) == 2
    supervisor_kib = rss_kib(server.process.pid)
    print(f"supervisor RSS {supervisor_kib / 1024:.1f} MiB; workers {[round(rss_kib(pid) / 1024, 1) for pid in pids]} MiB")
    assert supervisor_kib < 40 * 1024
    assert server.stop(timeout=60) == 0
    assert not any(alive(pid) for pid in pids)
    stops = [line for line in server.output().splitlines() if "shutting down" in line]
    assert sorted(re.search(r"\[worker (\d+)\] ", line).group(1) for line in stops) == ["0", "1"], stops  # type: ignore[union-attr]


def test_json_log_lines_of_a_worker_say_which_it_is() -> None:
    import json
    import logging

    from autocert._console import JsonLogFormatter

    record = logging.LogRecord("autocert.server", logging.INFO, __file__, 1, "shutting down", None, None)
    assert json.loads(JsonLogFormatter(worker=1).format(record))["worker"] == 1
    assert "worker" not in json.loads(JsonLogFormatter().format(record))


def test_a_worker_that_cannot_start_stops_the_server_with_its_status(tmp_path: Path) -> None:
    """A database that cannot be opened fails every worker before it is ready: the supervisor
    stops and reports it rather than restarting them forever."""
    (tmp_path / "data").write_text("a file where the database's directory should be")
    result = run_cli("serve", "--workers", "2", "--https", f"127.0.0.1:{free_port()}", "--http", "none", "--admin", "none",
                     "--directory", "https://127.0.0.1:9/dir", db=f"sqlite:///{tmp_path / 'data' / 'a.db'}", timeout=120)
    assert result.returncode not in (0, None), result.stderr
    assert "cannot create database file" in result.stderr
    assert "before it was ready" in result.stderr


def test_the_board_sums_workers_and_keeps_the_counts_of_those_that_exited() -> None:
    board = Board.create(2)
    first = Board(board.fd, 2, slot=0)
    board.started(0, 101)
    board.started(1, 102)
    first.publish([1.0] * len(FIGURES))
    second = Board(board.fd, 2, slot=1)
    second.publish([2.0] * len(FIGURES))
    assert board.running() == 2
    assert board.total()["handshakes:served"] == 3.0
    assert board.total()["cache_size"] == 3.0
    board.retire(1)
    assert board.running() == 1
    totals = board.total()
    assert totals["handshakes:served"] == 3.0, "an exited worker's counters stay in the sum"
    assert totals["cache_size"] == 1.0, "its gauges do not"
    assert [slot for slot, _, _ in board.per_worker()] == [0]
    assert board.health() == "1 of 2 workers running"
    board.started(1, 103)
    assert board.health() is None
    os.close(board.fd)


def test_every_listener_gets_one_reuseport_socket_per_worker() -> None:
    """Several --https, the dual-stack [::] default and --http: each is bound once per worker,
    all of a listener's sockets on one port; the admin listener once, for the first worker."""
    options = ServeOptions(https=(Listen("127.0.0.1", 0), Listen("::", 0)), http=(Listen("::", 0),), admin=Listen("127.0.0.1", 0))
    bound = bind_worker_listeners(options, 3)
    try:
        assert len(bound) == 3
        assert [sorted(sockets) for sockets in bound] == [["admin", "http", "https"], ["http", "https"], ["http", "https"]]
        for label in ("https", "http"):
            ports = {tuple(sock.getsockname()[1] for sock in sockets[label]) for sockets in bound}
            assert len(ports) == 1, f"every worker's {label} sockets share the same ports: {ports}"
        for sockets in bound:
            for sock in sockets["https"] + sockets["http"]:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            dual = [sock for sock in sockets["https"] + sockets["http"] if sock.family == socket.AF_INET6]
            assert dual and all(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0 for sock in dual)
        assert bound[0]["admin"][0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
    finally:
        for sockets in bound:
            close_sockets(sockets)


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.headers.get("X-Forwarded-For", "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _forwarded_for(host: str, port: int, header: bytes, root_ca: str, *, source: str | None = None) -> str:
    """An https GET through ``header`` (a PROXY header, or none): the X-Forwarded-For the upstream saw."""
    with socket.create_connection((host, port), timeout=30, source_address=(source, 0) if source else None) as raw:
        raw.sendall(header)
        with client_context(root_ca).wrap_socket(raw, server_hostname=NAME) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
            response = b""
            while chunk := tls.recv(65536):
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def test_workers_serve_every_https_listener_and_read_proxy_headers(pebble: Pebble, db: str, tmp_path: Path, root_ca: str) -> None:
    """`serve --workers 2` with two https listeners (one the dual-stack ``:PORT``) behind a
    trusted balancer: every worker reads the PROXY header, on either listener, from IPv4
    and IPv6 clients alike."""
    upstream = ThreadingHTTPServer(("127.0.0.1", free_port()), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    balancer = "127.0.0.3"
    first, second = free_port(), free_port()
    assert run_cli("allow", NAME, db=db).returncode == 0
    extra = ["--workers", "2", "--https", f"127.0.0.1:{first}", "--https", f":{second}", "--trusted-proxies", f"{balancer}/32",
             "--upstream", f"http://127.0.0.1:{upstream.server_address[1]}"]
    try:
        with ServeProcess(db, pebble, tmp_path, extra=extra, https_port=first) as server:
            assert server.stdout_path.read_text().count("https listening on") == 2
            served_certificate(first, NAME, root_ca)
            for port in (first, second):
                for index in range(6):  # a few, so that both workers are likely to answer some
                    client = f"203.0.113.{index + 1}"
                    header = proxy_header(1, (client, 40000 + index), ("192.0.2.1", 443))
                    assert _forwarded_for("127.0.0.1", port, header, root_ca, source=balancer) == client
                assert _forwarded_for("127.0.0.1", port, b"", root_ca) == "127.0.0.1"
            assert _forwarded_for("::1", second, b"", root_ca) == "::1", "the dual-stack listener takes IPv6 clients too"
            assert len(children(server.process.pid)) == 2, server.output()
    finally:
        upstream.shutdown()
        upstream.server_close()
