"""Events and notifications: the event bus, the expiry monitor, webhook and command delivery
(retries, rate limits, never blocking), JSON event log lines, and ``serve --webhook`` /
``--on-event`` end to end against real Pebble."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import sys
import threading
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support import ServeProcess, eventually, free_port, handshake, run_cli

import autocert
from autocert._console import JsonLogFormatter
from autocert._events import Event, EventBus, log_event
from autocert._monitor import ExpiryMonitor
from autocert._policy import is_expiring
from autocert._notify import Notifier

GOOD, BAD = "notify-good.example.test", "notify-bad.example.test"
PROBLEM_PREFIX = "urn:ietf:params:acme:error:"


# -- a webhook receiver --------------------------------------------------------------------------


class Receiver:
    """A local aiohttp webhook endpoint that records what it is sent.

    ``answers`` is consumed one status per request (then 200), so a test can make the first
    deliveries fail; ``hold`` makes requests wait until it is set.
    """

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.answers: list[int] = []
        self.requests = 0
        self.hold: asyncio.Event | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.hold is not None:
            await self.hold.wait()
        status = self.answers.pop(0) if self.answers else 200
        if status == 200:
            self.received.append(await request.json())
        return web.Response(status=status, text="ok" if status == 200 else "no")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    instance = await Receiver().start()
    yield instance
    await instance.stop()


class ThreadedReceiver:
    """The same receiver on an event loop of its own thread, for tests that block (processes)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.receiver = Receiver()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.start(), self.loop).result(timeout=10)
        return self.receiver

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.receiver.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def event(kind: str = "failed", name: str = "a.example.test", *, at: datetime | None = None, error: str | None = "boom") -> Event:
    state = {"issued": "valid", "renewed": "valid", "expiring": "valid"}.get(kind, kind)
    return Event(kind, name, state, error=error, at=at or datetime.now(timezone.utc))  # type: ignore[arg-type]


FAST = (0.01, 0.02, 0.04)


# -- the event bus -------------------------------------------------------------------------------


async def test_bus_isolates_subscribers_runs_async_ones_as_tasks_and_keeps_a_bounded_ring() -> None:
    bus = EventBus(history=3)
    seen: list[str] = []
    started = asyncio.Event()
    release = asyncio.Event()

    def broken(_event: Event) -> None:
        raise RuntimeError("subscriber bug")

    async def slow(item: Event) -> None:
        started.set()
        await release.wait()
        seen.append(f"async {item.name}")

    bus.subscribe(broken)
    bus.subscribe(slow)
    bus.subscribe(slow)  # a second subscription of the same callback is ignored
    bus.subscribe(lambda item: seen.append(item.name))
    bus.emit(event(name="one"))  # returns although `slow` is still waiting, and `broken` raised
    assert seen == ["one"]
    await started.wait()
    release.set()
    await bus.drain()
    assert seen == ["one", "async one"]
    for name in ("two", "three", "four"):
        bus.emit(event(name=name))
    await bus.drain()
    assert [item.name for item in bus.recent()] == ["four", "three", "two"]
    assert [item.name for item in bus.recent(1)] == ["four"]


def test_event_log_line_carries_json_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="autocert.events")
    log_event(Event("failed", "x.example.test", "failed", error=f"{PROBLEM_PREFIX}dns: no such host", previous="issuing"))
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"failed x.example.test (issuing -> failed): {PROBLEM_PREFIX}dns: no such host"
    line = json.loads(JsonLogFormatter().format(record))
    assert line["event"] == "failed" and line["name"] == "x.example.test" and line["state"] == "failed"
    assert line["error"] == f"{PROBLEM_PREFIX}dns: no such host" and line["logger"] == "autocert.events"


# -- webhook delivery --------------------------------------------------------------------------------


async def test_webhook_is_retried_with_backoff_until_it_answers(receiver: Receiver) -> None:
    receiver.answers = [503, 502]
    notifier = Notifier(webhook=receiver.url, retry_delays=FAST)
    notifier.notify(event("issued", error=None))
    await notifier.drain()
    assert receiver.requests == 3
    assert receiver.received == [
        {"event": "issued", "name": "a.example.test", "state": "valid", "previous": None, "error": None, "at": receiver.received[0]["at"]}
    ]
    assert notifier.delivered == 1 and notifier.abandoned == 0
    await notifier.close()


async def test_webhook_gives_up_on_a_client_error_and_after_the_last_retry(receiver: Receiver) -> None:
    receiver.answers = [400]
    notifier = Notifier(webhook=receiver.url, retry_delays=FAST)
    notifier.notify(event("issued", "one.example.test"))
    await notifier.drain()
    assert receiver.requests == 1, "a 400 cannot get better by sending the same body again"
    receiver.answers = [500] * 10
    notifier.notify(event("issued", "two.example.test"))
    await notifier.drain()
    assert receiver.requests == 1 + len(FAST) + 1
    assert notifier.abandoned == 2 and notifier.delivered == 0
    await notifier.close()


async def test_webhook_to_a_closed_port_is_retried_then_abandoned() -> None:
    notifier = Notifier(webhook=f"http://127.0.0.1:{free_port()}/hook", retry_delays=FAST)
    notifier.notify(event())
    await notifier.drain()
    assert notifier.abandoned == 1


async def test_notifications_are_rate_limited_per_name_and_event(receiver: Receiver) -> None:
    notifier = Notifier(webhook=receiver.url, retry_delays=FAST)
    start = datetime.now(timezone.utc)
    sent = [
        event("failed", "a.example.test", at=start),
        event("failed", "a.example.test", at=start + timedelta(minutes=59)),  # within the hour: dropped
        event("failed", "b.example.test", at=start + timedelta(minutes=1)),  # another name
        event("failed", "a.example.test", at=start + timedelta(minutes=61)),
        event("expiring", "a.example.test", at=start),
        event("expiring", "a.example.test", at=start + timedelta(hours=23)),  # within the day: dropped
        event("expiring", "a.example.test", at=start + timedelta(hours=25)),
        event("issued", "a.example.test", at=start, error=None),
        event("issued", "a.example.test", at=start, error=None),  # never limited
        event("allowed", "a.example.test", at=start, error=None),  # not a notification at all
        event("disallowed", "a.example.test", at=start, error=None),
    ]
    for item in sent:
        notifier.notify(item)
    await notifier.drain()
    got = sorted((item["event"], item["name"], item["at"]) for item in receiver.received)
    expected = [sent[i].to_dict() for i in (0, 2, 3, 4, 6, 7, 8)]
    assert got == sorted((item["event"], item["name"], item["at"]) for item in expected)
    await notifier.close()


async def test_notify_never_waits_for_a_slow_webhook(receiver: Receiver) -> None:
    receiver.hold = asyncio.Event()
    notifier = Notifier(webhook=receiver.url, retry_delays=FAST)
    for index in range(20):
        notifier.notify(event("issued", f"n{index}.example.test", error=None))
    assert receiver.requests == 0, "notify() only schedules; nothing was sent yet"
    await asyncio.wait_for(_until(lambda: receiver.requests == 4), 10)  # at most 4 in flight
    receiver.hold.set()
    await notifier.drain()
    assert len(receiver.received) == 20


async def test_close_cancels_deliveries_that_outlive_its_bound(receiver: Receiver) -> None:
    receiver.hold = asyncio.Event()
    notifier = Notifier(webhook=receiver.url, retry_delays=FAST)
    notifier.notify(event("issued", error=None))
    await asyncio.wait_for(_until(lambda: receiver.requests == 1), 10)
    await asyncio.wait_for(notifier.close(timeout=0.05), 5)
    receiver.hold.set()
    assert notifier.delivered == 0


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.005)


# -- command delivery -----------------------------------------------------------------------------------


def recorder_command(tmp_path: Path, *, fail_first: int = 0) -> str:
    """A shell command that records its stdin and environment, failing the first N runs."""
    script = tmp_path / "record.py"
    script.write_text(
        "import json, os, sys\n"
        f"out = {str(tmp_path / 'runs.jsonl')!r}\n"
        "payload = json.load(sys.stdin)\n"
        "runs = sum(1 for _ in open(out)) if os.path.exists(out) else 0\n"
        "with open(out, 'a') as f:\n"
        "    f.write(json.dumps({'stdin': payload, 'env': {k: v for k, v in os.environ.items() if k.startswith('AUTOCERT_')}}) + '\\n')\n"
        f"sys.exit(1 if runs < {fail_first} else 0)\n"
    )
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


def runs(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_command_gets_the_event_on_stdin_and_in_its_environment_and_is_retried(tmp_path: Path) -> None:
    notifier = Notifier(command=recorder_command(tmp_path, fail_first=1), retry_delays=FAST)
    notifier.notify(event("failed", "c.example.test", error=f"{PROBLEM_PREFIX}connection: refused"))
    await notifier.drain()
    first, second = runs(tmp_path)
    assert first == second, "the retry sends the same event"
    assert second["stdin"]["event"] == "failed" and second["stdin"]["name"] == "c.example.test"
    assert second["stdin"]["error"] == f"{PROBLEM_PREFIX}connection: refused"
    assert second["env"]["AUTOCERT_EVENT"] == "failed" and second["env"]["AUTOCERT_NAME"] == "c.example.test"
    assert second["env"]["AUTOCERT_STATE"] == "failed"
    assert notifier.delivered == 1


async def test_a_hanging_command_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    command = f"sleep 600 & echo $! > {shlex.quote(str(pid_file))}; wait"
    notifier = Notifier(command=command, retry_delays=(), command_timeout=0.5)
    notifier.notify(event())
    await asyncio.wait_for(notifier.drain(), 30)
    assert notifier.abandoned == 1
    child = int(pid_file.read_text())
    await asyncio.wait_for(_until(lambda: not _alive(child)), 10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# -- the expiry monitor ---------------------------------------------------------------------------------


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[autocert.Manager]:
    instance = autocert.Manager(db=f"sqlite:///{tmp_path / 'monitor.db'}", directory="https://127.0.0.1:9/dir", renew=False)
    await instance.start()
    yield instance
    await instance.stop()


async def store_certificate(manager: autocert.Manager, name: str, not_before: datetime, not_after: datetime) -> None:
    lifetime = not_after - not_before
    await manager.store.save_certificate(
        name=name, names=[name], key_pem=b"-", chain_pem=b"-", serial=f"{abs(hash(name)):x}", issuer="CN=Test CA",
        not_before=not_before, not_after=not_after, renew_at=not_after - lifetime / 3, directory=manager.directory,
    )


def test_expiring_means_a_third_of_the_lifetime_left_and_renewal_overdue() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    end = start + timedelta(days=90)
    renew_at = end - timedelta(days=30)
    assert not is_expiring(start, end, renew_at, start + timedelta(days=59))
    assert not is_expiring(start, end, renew_at, renew_at + timedelta(minutes=30)), "renewal gets a moment of grace"
    assert is_expiring(start, end, renew_at, renew_at + timedelta(hours=2))
    assert not is_expiring(start, end, renew_at, end), "past not_after it is expired, not expiring"
    # A 6-day certificate renews at half its life; past a third left, it is expiring.
    short_end = start + timedelta(days=6)
    assert is_expiring(start, short_end, start + timedelta(days=3), short_end - timedelta(days=1))


async def test_monitor_emits_expiring_and_expired_once_a_day_and_notifies(manager: autocert.Manager, receiver: Receiver) -> None:
    now = datetime.now(timezone.utc)
    await manager.allow("fresh.example.test", "expiring.example.test", "expired.example.test", "gone.example.test")
    await store_certificate(manager, "fresh.example.test", now - timedelta(days=1), now + timedelta(days=89))
    await store_certificate(manager, "expiring.example.test", now - timedelta(days=70), now + timedelta(days=20))
    await store_certificate(manager, "expired.example.test", now - timedelta(days=91), now - timedelta(days=1))
    await store_certificate(manager, "gone.example.test", now - timedelta(days=89), now + timedelta(days=1))
    await manager.disallow("gone.example.test")  # nobody needs a warning about a name they removed

    notifier = Notifier(webhook=receiver.url, retry_delays=FAST)
    notifier.attach(manager.events)
    monitor = ExpiryMonitor(manager)
    events = await monitor.check(now)
    assert sorted((item.kind, item.name, item.state) for item in events) == [
        ("expired", "expired.example.test", "expired"),
        ("expiring", "expiring.example.test", "valid"),
    ]
    expiring = next(item for item in events if item.kind == "expiring")
    assert expiring.error is not None and "20.0 days left" in expiring.error and "not been renewed" in expiring.error
    assert monitor.soonest == now - timedelta(days=1)
    assert monitor.certified == 3, "fresh, expiring and expired; not the disallowed one"

    assert await monitor.check(now + timedelta(minutes=10)) == [], "the next scan does not repeat them"
    again = await monitor.check(now + timedelta(days=1, minutes=1))
    assert sorted(item.kind for item in again) == ["expired", "expiring"], "a daily reminder"

    await notifier.drain()
    assert sorted((item["event"], item["name"]) for item in receiver.received) == [
        ("expired", "expired.example.test"), ("expired", "expired.example.test"),
        ("expiring", "expiring.example.test"), ("expiring", "expiring.example.test"),
    ]
    assert all(item["error"] for item in receiver.received)
    await notifier.close()

    # A renewal stops the warnings: the newer certificate is the current one.
    await store_certificate(manager, "expiring.example.test", now, now + timedelta(days=90))
    later = await monitor.check(now + timedelta(days=2, minutes=2))
    assert [item.name for item in later] == ["expired.example.test"]


async def test_monitor_runs_at_start_and_stops_with_its_last_user(manager: autocert.Manager) -> None:
    now = datetime.now(timezone.utc)
    await manager.allow("late.example.test")
    await store_certificate(manager, "late.example.test", now - timedelta(days=91), now - timedelta(hours=1))
    seen: list[Event] = []
    manager.events.subscribe(seen.append)
    monitor = ExpiryMonitor.of(manager)
    assert ExpiryMonitor.of(manager) is monitor
    await monitor.start()
    await monitor.start()
    await asyncio.wait_for(_until(lambda: any(item.kind == "expired" for item in seen)), 10)
    await monitor.stop()
    assert monitor._task is not None, "still one user"
    await monitor.stop()
    assert monitor._task is None


# -- serve --webhook / --on-event end to end ---------------------------------------------------------------


@pytest.fixture()
def notify_root_ca(pebble, tmp_path: Path) -> str:
    path = tmp_path / "pebble-root.pem"
    path.write_bytes(pebble.root_pem())
    return str(path)


def test_serve_sends_issued_and_failed_to_the_webhook_and_the_command(pebble, notify_root_ca: str, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'autocert.db'}"
    assert run_cli("allow", GOOD, BAD, db=db).returncode == 0
    pebble.add_a(BAD, "127.0.0.2")  # nothing listens there: validation fails
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    try:
        with ThreadedReceiver() as receiver:
            server = ServeProcess(db, pebble, tmp_path, extra=["--webhook", receiver.url],
                                  env={"AUTOCERT_ON_EVENT": recorder_command(hooks)})
            with server:
                handshake(server.https_port, GOOD, cafile=notify_root_ca, timeout=60)
                with pytest.raises(OSError):  # ssl.SSLError is an OSError
                    handshake(server.https_port, BAD, cafile=notify_root_ca, timeout=60)

                def delivered() -> bool:
                    return len(receiver.received) >= 2 and len(runs(hooks)) >= 2

                eventually(delivered, timeout=30, what="issued and failed at the webhook and the command")
            by_event = {item["event"]: item for item in receiver.received}
            assert sorted(by_event) == ["failed", "issued"]
            assert (by_event["issued"]["name"], by_event["issued"]["state"], by_event["issued"]["error"]) == (GOOD, "valid", None)
            failed = by_event["failed"]
            assert (failed["name"], failed["state"]) == (BAD, "failed")
            assert failed["error"].startswith(f"{PROBLEM_PREFIX}connection") and "127.0.0.2" in failed["error"]
            command_runs = {run["env"]["AUTOCERT_EVENT"]: run for run in runs(hooks)}
            assert command_runs["issued"]["env"]["AUTOCERT_NAME"] == GOOD
            assert command_runs["failed"]["env"]["AUTOCERT_NAME"] == BAD
            assert command_runs["failed"]["stdin"] == failed
    finally:
        pebble.clear_a(BAD)


def test_serve_rejects_a_webhook_that_is_not_a_url(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'autocert.db'}"
    result = run_cli("serve", "--webhook", "ftp://example.test/hook", "--https", f"127.0.0.1:{free_port()}",
                     "--http", f"127.0.0.1:{free_port()}", "--admin", "none", db=db, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["autocert: error: --webhook 'ftp://example.test/hook': not an http:// or https:// URL"]
    assert not (tmp_path / "autocert.db").exists(), "nothing written on bad input"


# -- the worker's events, in process --------------------------------------------------------------------


async def test_issue_then_forced_renewal_emit_issued_then_renewed(pebble, tmp_path: Path) -> None:
    from autocert._metrics import Metrics
    from autocert.web import middleware

    manager = autocert.Manager(db=f"sqlite:///{tmp_path / 'events.db'}", directory=pebble.directory_url,
                               ca_bundle=pebble.ca_bundle, agree_tos=True, renew=False)
    metrics = Metrics.of(manager)  # before start: the ACME client picks up its latency hook
    seen: list[Event] = []
    manager.events.subscribe(seen.append)
    app = web.Application(middlewares=[middleware(manager)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", pebble.http01_port).start()
    try:
        async with manager:
            await manager.allow("renew-me.example.test")
            first = await manager.issue("renew-me.example.test")
            results = await manager.renew(["renew-me.example.test"], force=True)
            second = results["renew-me.example.test"]
            assert not isinstance(second, BaseException) and second.serial != first.serial
            text = (await metrics.render()).decode()
    finally:
        await runner.cleanup()
    kinds = [(item.kind, item.name, item.state, item.previous) for item in seen if item.kind in ("issued", "renewed", "failed")]
    assert kinds == [
        ("issued", "renew-me.example.test", "valid", "issuing"),
        ("renewed", "renew-me.example.test", "valid", "renewing"),
    ]
    assert [(item.kind, item.state) for item in seen if item.kind == "allowed"] == [("allowed", "pending")]
    assert 'autocert_issuance_attempts_total{result="valid"} 2.0' in text
    assert 'autocert_events_total{event="renewed"} 1.0' in text
    assert re.search(r'autocert_acme_request_duration_seconds_count\{method="POST"\} (\d+)', text)
