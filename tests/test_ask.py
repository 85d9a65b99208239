"""The ask endpoint (``--ask``), end to end: ``autocert serve`` in front of Pebble asks a real
HTTP endpoint on loopback about names off the allowlist, with real TLS clients."""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from ask_endpoint import AskEndpoint
from pebble import Pebble, wait_for
from support import ServeProcess, cli_json, handshake, openssl_s_client, served_certificate
from test_cli import snapshot

from autocert._ask import AskGate


@pytest.fixture(scope="module")
def endpoint() -> Iterator[AskEndpoint]:
    with AskEndpoint() as instance:
        yield instance


@pytest.fixture(scope="module")
def root(pebble: Pebble, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ask-root") / "root.pem"
    path.write_bytes(pebble.root_pem())
    return str(path)


@pytest.fixture(scope="module")
def server(pebble: Pebble, endpoint: AskEndpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    workdir = tmp_path_factory.mktemp("ask-serve")
    # A long ask timeout: the merge test holds an ask open while its handshakes arrive.
    extra = ["--ask", endpoint.url, "--ask-timeout", "30", "--first-contact-wait", "60"]
    with ServeProcess(f"sqlite:///{workdir / 'autocert.db'}", pebble, workdir, extra=extra) as process:
        yield process


def refused(port: int, name: str) -> bool:
    """Whether a handshake for ``name`` ends in the unrecognized_name alert."""
    try:
        handshake(port, name, timeout=60)
    except ssl.SSLError as exc:
        assert "UNRECOGNIZED_NAME" in str(exc), exc
        return True
    return False


def handshakes_asked(server: ServeProcess) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    found = re.search(r'^autocert_handshakes_total\{outcome="asked"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def test_an_allowed_name_is_ordered_on_first_contact_and_asked_once(server: ServeProcess, endpoint: AskEndpoint, root: str) -> None:
    name = "shop.ask.test"
    endpoint.allowed.add(name)
    certificate = served_certificate(server.https_port, name, root)
    assert name in str(certificate.subject) or name in str(certificate.extensions)
    for _ in range(20):
        handshake(server.https_port, name, cafile=root)
    assert endpoint.calls[name] == 1
    assert "token=t&domain=shop.ask.test" in endpoint.queries, "the endpoint's own query is kept"
    # Status, read from the database by another process, shows it allowed and served.
    states = {item["name"]: item["state"] for item in cli_json("status", db=server.db)["certificates"]}
    assert states[name] == "valid", states
    assert cli_json("status", "--state", "valid", db=server.db)["certificates"][0]["name"] == name


def test_a_refused_name_gets_alert_112_and_the_answer_is_cached(server: ServeProcess, endpoint: AskEndpoint) -> None:
    name = "refused.ask.test"
    assert all(refused(server.https_port, name) for _ in range(20))
    assert "alert number 112" in openssl_s_client(server.https_port, name)
    assert endpoint.calls[name] == 1


def test_max_age_decides_when_a_name_is_asked_again(server: ServeProcess, endpoint: AskEndpoint) -> None:
    name = "brief.ask.test"
    endpoint.max_age[name] = 1
    assert refused(server.https_port, name)
    first = time.monotonic()
    assert refused(server.https_port, name)
    if time.monotonic() - first < 1:
        assert endpoint.calls[name] == 1, "not asked again within max-age"
    wait_for(lambda: refused(server.https_port, name) and endpoint.calls[name] == 2, timeout=30, what="a second ask", interval=0.2)
    assert time.monotonic() - first >= 1.0


def test_concurrent_handshakes_for_one_name_make_one_ask(server: ServeProcess, endpoint: AskEndpoint) -> None:
    name = "merged.ask.test"
    endpoint.held.add(name)
    before = handshakes_asked(server)
    outcomes: list[bool] = []
    clients = [threading.Thread(target=lambda: outcomes.append(refused(server.https_port, name))) for _ in range(10)]
    for client in clients:
        client.start()
    wait_for(lambda: handshakes_asked(server) - before >= 10, timeout=60, what="ten handshakes waiting for the ask", interval=0.1)
    endpoint.held.discard(name)
    for client in clients:
        client.join(timeout=60)
    assert outcomes == [True] * 10
    assert endpoint.calls[name] == 1


def test_refused_names_leave_no_trace_in_the_database(server: ServeProcess, endpoint: AskEndpoint) -> None:
    # The serving process renews its duties lease (table leases) every few seconds, whatever
    # its clients do: that row is its own, not a trace of any name.
    before = snapshot(server.db, skip=("leases",))
    for index in range(40):
        assert refused(server.https_port, f"made-up-{index}.ask.test")
    assert snapshot(server.db, skip=("leases",)) == before
    assert endpoint.calls["made-up-39.ask.test"] == 1


async def test_the_gate_bounds_asks_in_flight_and_refuses_beyond_at_once(endpoint: AskEndpoint) -> None:
    names = [f"flood-{index}.ask.test" for index in range(10)]
    endpoint.held.update(names)
    gate = AskGate(endpoint.url, timeout=60, max_in_flight=4)
    try:
        asks = [asyncio.ensure_future(gate.ask(name)) for name in names]
        await asyncio.sleep(0)
        started = time.monotonic()
        beyond = await asyncio.gather(*asks[4:])
        assert beyond == [False] * 6 and time.monotonic() - started < 1, "refused at once, without a request"
        assert gate.answer("another.ask.test") is False, "the handshake path refuses from memory too"
        await asyncio.to_thread(wait_for, lambda: endpoint.in_flight == 4, timeout=30, what="four asks at the endpoint")
        endpoint.held.difference_update(names)
        assert await asyncio.gather(*asks[:4]) == [False] * 4
        assert sum(endpoint.calls[name] for name in names) == 4 and gate.outcomes["flood"] == 7
        assert gate.answer(names[9]) is None, "a flood refusal is not remembered"
    finally:
        endpoint.held.difference_update(names)
        await gate.close()


async def test_an_ask_that_times_out_refuses(endpoint: AskEndpoint) -> None:
    name = "slow.ask.test"
    endpoint.held.add(name)
    gate = AskGate(endpoint.url, timeout=0.5)
    try:
        started = time.monotonic()
        assert await gate.ask(name) is False
        assert time.monotonic() - started < 10 and gate.outcomes["failed"] == 1
    finally:
        endpoint.held.discard(name)
        await gate.close()
