"""Renewal timing, the scheduler, forced renewal, revocation and CA trouble, against real Pebble."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from autocert import Manager
from autocert._config import Listen
from autocert._scheduler import Scheduler
from autocert._config import ServeOptions, listening_socket
from autocert._server import listeners
from autocert._policy import RETRY_DELAYS, renewal_time, retry_delay
from support import ServeProcess, acme_args, cli_json, eventually, handshake, openssl_s_client, run_cli, served_certificate

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("lifetime", "remaining"),
    [(timedelta(days=90), timedelta(days=30)), (timedelta(days=45), timedelta(days=15)), (timedelta(days=6), timedelta(days=3)),
     (timedelta(hours=160), timedelta(hours=80))],
)
def test_renewal_time_by_lifetime(lifetime: timedelta, remaining: timedelta) -> None:
    not_after = T0 + lifetime
    assert renewal_time(T0, not_after, jitter=0) == not_after - remaining
    earliest = renewal_time(T0, not_after, jitter=1)
    assert not_after - remaining - min(lifetime * 0.05, timedelta(hours=12)) == earliest
    for _ in range(50):
        chosen = renewal_time(T0, not_after)
        assert earliest <= chosen <= not_after - remaining


def test_retry_delays_grow_and_stay_bounded() -> None:
    delays = [retry_delay(n) for n in range(1, 20)]
    assert delays[0] == timedelta(minutes=1)
    assert delays == sorted(delays)
    assert delays[-1] == RETRY_DELAYS[-1] == timedelta(hours=6)
    assert retry_delay(0) == timedelta(0)


@contextlib.asynccontextmanager
async def running_manager(pebble, db: str, **kwargs) -> AsyncIterator[Manager]:  # type: ignore[no-untyped-def]
    """A Manager with an http-01 listener where Pebble validates."""
    manager = Manager(db=db, directory=pebble.directory_url, ca_bundle=pebble.ca_bundle, agree_tos=True, **kwargs)
    await manager.start()
    options = ServeOptions(https=None, http=Listen("127.0.0.1", pebble.http01_port), admin=None)
    try:
        async with listeners(manager, options, {"http": listening_socket(options.http)}, announce=False):  # type: ignore[arg-type]
            yield manager
    finally:
        await manager.stop()


async def test_a_lease_that_runs_out_unreleased_is_taken_over(pebble, tmp_path: Path) -> None:
    """A holder on another host that vanished mid-order: wait for its lease, then order here."""
    db = f"sqlite:///{tmp_path / 'lease.db'}"
    async with running_manager(pebble, db, renew=False) as manager:
        await manager.allow("orphan.example.test")
        assert await manager.store.try_lease("orphan.example.test", "elsewhere.example:4242:gone", 1.5)
        began = time.monotonic()
        certificate = await asyncio.wait_for(manager.issue("orphan.example.test"), timeout=60)
        assert certificate.name == "orphan.example.test"
        assert time.monotonic() - began >= 1.0, "it waited for the other holder's lease first"
        assert await manager.store.attempt_count("orphan.example.test") == 1


async def test_concurrent_first_contacts_under_a_capped_pattern_order_no_more_than_the_cap(pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cap.db'}"
    async with running_manager(pebble, db, renew=False) as manager:
        await manager.allow("*.capped.example.test", cap=2)
        names = [f"t{index}.capped.example.test" for index in range(5)]
        contexts = await asyncio.gather(*(manager.context_for(name, wait=60) for name in names))
        assert sum(context is not None for context in contexts) == 2
        assert len(await manager.store.names_under("*.capped.example.test")) == 2, "the others were never ordered"


async def test_scheduler_renews_due_names_and_parks_disallowed_ones(pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'sched.db'}"
    async with running_manager(pebble, db, renew=False) as manager:
        await manager.allow("keep.example.test", "drop.example.test")
        kept = await manager.issue("keep.example.test")
        dropped = await manager.issue("drop.example.test")
        await manager.disallow("drop.example.test")

        clock = {"now": datetime.now(timezone.utc)}
        scheduler = Scheduler(manager.store, manager.worker, is_allowed=manager.is_allowed, clock=lambda: clock["now"])
        assert await scheduler.run_once() == [], "nothing is due yet"

        clock["now"] = max(kept.renew_at, dropped.renew_at) + timedelta(seconds=1)
        assert await scheduler.run_once() == ["keep.example.test"], "a disallowed name must not be renewed"
        renewed = await manager.worker.issue("keep.example.test")  # joins the renewal started above
        assert renewed.serial != kept.serial
        assert (await manager.store.current_certificate("drop.example.test")).serial == dropped.serial  # type: ignore[union-attr]
        assert await manager.store.attempt_count("drop.example.test") == 1
        (status,) = await manager.status(["drop.example.test"])
        assert status["state"] == "disallowed"


async def test_twenty_certificates_despite_half_the_nonces_rejected(pebble_factory, tmp_path: Path) -> None:
    chaotic = pebble_factory(PEBBLE_WFE_NONCEREJECT="50")
    db = f"sqlite:///{tmp_path / 'chaos.db'}"
    names = [f"n{i}.chaos.example.test" for i in range(20)]
    async with running_manager(chaotic, db, renew=False) as manager:
        await manager.allow(*names)
        certificates = await asyncio.gather(*(manager.issue(name) for name in names))
        assert sorted(c.name for c in certificates) == sorted(names)
        assert len({c.serial for c in certificates}) == 20
        for name in names:
            assert await manager.store.attempt_count(name) == 1, "badNonce must be retried inside one attempt"


def test_renew_force_is_served_without_restart_and_revoke_stops_serving(pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'renew.db'}"
    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    assert run_cli("allow", "renew.example.test", db=db).returncode == 0
    with ServeProcess(db, pebble, tmp_path) as server:
        first = handshake(server.https_port, "renew.example.test", cafile=str(root), timeout=60)
        # Nothing is due: a plain renew does nothing.
        idle = run_cli("renew", "--http", f"127.0.0.1:{server.http_port}", *acme_args(pebble), db=db)
        assert idle.returncode == 0, idle.stderr
        assert "nothing is due" in idle.stdout

        forced = run_cli("renew", "renew.example.test", "--force", "--http", f"127.0.0.1:{server.http_port}", *acme_args(pebble), db=db)
        assert forced.returncode == 0, forced.stderr
        new_serial = cli_json("status", "renew.example.test", db=db)["certificates"][0]["serial"]
        assert new_serial != format(first.serial_number, "x")

        def serves_new() -> bool:
            return format(handshake(server.https_port, "renew.example.test", cafile=str(root)).serial_number, "x") == new_serial

        eventually(serves_new, timeout=5, what="the renewed certificate to be served")

        revoked = run_cli("revoke", "renew.example.test", "--reason", "superseded", *acme_args(pebble), db=db)
        assert revoked.returncode == 0, revoked.stderr
        assert pebble.cert_status(new_serial).get("Status") == "Revoked"

        def stopped_serving_revoked() -> bool:
            try:
                serial = format(handshake(server.https_port, "renew.example.test", cafile=str(root)).serial_number, "x")
            except OSError:
                return True
            return serial != new_serial

        eventually(stopped_serving_revoked, timeout=10, what="the revoked certificate to stop being served")


def test_ca_outage_keeps_serving_and_recovers_by_itself(pebble_factory, tmp_path: Path) -> None:
    ca = pebble_factory()
    db = f"sqlite:///{tmp_path / 'outage.db'}"
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem())
    assert run_cli("allow", "up.example.test", "later.example.test", db=db).returncode == 0
    with ServeProcess(db, ca, tmp_path) as server:
        served = handshake(server.https_port, "up.example.test", cafile=str(root), timeout=60)
        ca.stop()

        # Existing certificates keep being served while the CA is down.
        assert handshake(server.https_port, "up.example.test", cafile=str(root)).serial_number == served.serial_number
        # A new name fails, and status says why and when it will be tried again.
        assert "alert number 112" in openssl_s_client(server.https_port, "later.example.test")

        def failed_entry() -> dict | None:  # type: ignore[type-arg]
            (entry,) = cli_json("status", "later.example.test", db=db)["certificates"]
            return entry if entry["state"] == "failed" else None

        entry = eventually(failed_entry, timeout=30, what="the failure to be recorded")
        assert entry["attempts"] >= 1 and entry["last_error"]
        next_attempt = datetime.fromisoformat(entry["next_attempt_at"].replace("Z", "+00:00"))
        assert timedelta(seconds=30) < next_attempt - datetime.now(timezone.utc) <= timedelta(minutes=1, seconds=5)
        # Handshakes during the backoff neither order again nor hang.
        assert "alert number 112" in openssl_s_client(server.https_port, "later.example.test")
        assert cli_json("status", "later.example.test", db=db)["certificates"][0]["attempts"] == entry["attempts"]

        ca.start()  # same ports, a fresh CA that knows nothing of our account
        new_root = tmp_path / "root2.pem"
        new_root.write_bytes(ca.root_pem())
        certificate = served_certificate(server.https_port, "later.example.test", str(new_root), timeout=150)
        assert certificate.serial_number
        (entry,) = cli_json("status", "later.example.test", db=db)["certificates"]
        assert entry["state"] == "valid" and entry["last_error"] is None and entry["next_attempt_at"] is None
        assert "Traceback" not in server.stderr_path.read_text()


def test_sigkill_during_issuance_then_restart_ends_valid_without_duplicates(pebble_factory, tmp_path: Path) -> None:
    import signal
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    slow = pebble_factory(PEBBLE_VA_NOSLEEP="0")  # Pebble waits up to seconds before validating
    db = f"sqlite:///{tmp_path / 'crash.db'}"
    root = tmp_path / "root.pem"
    root.write_bytes(slow.root_pem())
    names = [f"c{i}.crash.example.test" for i in range(5)]
    assert run_cli("allow", *names, db=db).returncode == 0
    server = ServeProcess(db, slow, tmp_path).start()
    try:
        with ThreadPoolExecutor(max_workers=5) as pool:
            for name in names:
                pool.submit(lambda n=name: openssl_s_client(server.https_port, n))
            path = db.removeprefix("sqlite:///")

            def pending_orders() -> dict[str, str]:
                with sqlite3.connect(path) as connection:
                    return dict(connection.execute("select name, order_url from name_states where order_url is not null").fetchall())

            # Four orders run at once (the worker's concurrency); the fifth waits its turn.
            eventually(lambda: len(pending_orders()) >= 4, timeout=30, what="orders to be placed and stored")
            interrupted = pending_orders()
            server.signal(signal.SIGKILL)
            assert server.process is not None
            server.process.wait(timeout=10)

    finally:
        server.stop()  # already killed unless something above failed

    restarted = ServeProcess(db, slow, tmp_path).start()
    try:
        for name in names:
            served_certificate(restarted.https_port, name, str(root), timeout=120)
    finally:
        restarted.stop()
    with sqlite3.connect(path) as connection:
        counts = dict(connection.execute("select name, count(*) from certificates group by name").fetchall())
        order_urls = dict(connection.execute("select name, order_url from certificates").fetchall())
    # Each interrupted order was resumed, or (if Pebble tried to validate it while no server
    # answered, which makes it invalid) replaced by exactly one new order.
    assert interrupted and all(name in order_urls for name in interrupted)
    assert pending_orders() == {}
    assert counts == {name: 1 for name in names}, f"no duplicate certificates: {counts}"


async def test_renewal_info_window_sets_renew_at_and_the_renewal_sends_replaces(pebble, tmp_path: Path) -> None:
    from ari_double import AriDouble, RenewalWindow

    from autocert._crypto import ari_certificate_id

    with AriDouble(pebble) as double:
        # The double relays to Pebble, so challenges are still validated on Pebble's ports.
        async with running_manager(pebble, f"sqlite:///{tmp_path / 'ari.db'}", renew=False) as manager:
            manager.worker.directory = double.directory_url
            await manager.allow("ari.example.test")
            first = await manager.issue("ari.example.test")
            certificate_id = ari_certificate_id(first.chain_pem)
            assert "replaces" not in double.orders[-1]

            real_now = datetime.now(timezone.utc)
            clock = {"now": real_now}
            double.window = RenewalWindow(start=real_now + timedelta(days=2), end=real_now + timedelta(days=3), retry_after=21600)
            scheduler = Scheduler(manager.store, manager.worker, is_allowed=manager.is_allowed, clock=lambda: clock["now"])
            assert await scheduler.check_renewal_info() == 1
            assert double.renewal_info_requests == [certificate_id]
            stored = await manager.store.current_certificate("ari.example.test")
            assert stored is not None
            assert double.window.start <= stored.renew_at <= double.window.end, "renew_at must lie in the CA's window"
            assert stored.ari_next_check_at == real_now + timedelta(seconds=21600), "Retry-After decides the next check"
            assert await scheduler.check_renewal_info() == 0, "not fetched again before Retry-After"
            assert await scheduler.run_once() == [], "nothing due before the window"

            # The CA moves the window into the past (e.g. an incident): renew now, naming the old one.
            clock["now"] = real_now + timedelta(hours=7)
            double.window = RenewalWindow(start=real_now - timedelta(days=1), end=real_now, retry_after=None)
            assert await scheduler.run_once() == ["ari.example.test"]
            renewed = await manager.worker.issue("ari.example.test")
            assert renewed.serial != first.serial
            assert double.orders[-1]["replaces"] == certificate_id


async def test_replaces_refused_with_409_falls_back_to_a_plain_order(pebble, tmp_path: Path) -> None:
    from ari_double import AriDouble

    from autocert._crypto import ari_certificate_id

    with AriDouble(pebble, refuse_replaces=True) as double:
        async with running_manager(pebble, f"sqlite:///{tmp_path / 'ari409.db'}", renew=False) as manager:
            manager.worker.directory = double.directory_url
            await manager.allow("replaced.example.test")
            first = await manager.issue("replaced.example.test")
            results = await manager.renew(["replaced.example.test"], force=True)
            renewed = results["replaced.example.test"]
            assert not isinstance(renewed, BaseException), renewed
            assert renewed.serial != first.serial
            assert double.orders[-2].get("replaces") == ari_certificate_id(first.chain_pem)
            assert "replaces" not in double.orders[-1]
            assert await manager.store.attempt_count("replaced.example.test") == 2


async def test_without_renewal_info_the_lifetime_rule_stands(pebble, tmp_path: Path) -> None:
    async with running_manager(pebble, f"sqlite:///{tmp_path / 'noari.db'}", renew=False) as manager:
        await manager.allow("plain.example.test")
        issued = await manager.issue("plain.example.test")
        scheduler = Scheduler(manager.store, manager.worker, is_allowed=manager.is_allowed)
        assert await scheduler.check_renewal_info() == 0
        stored = await manager.store.current_certificate("plain.example.test")
        assert stored is not None and stored.renew_at == issued.renew_at and stored.ari_next_check_at is None
        lifetime = issued.not_after - issued.not_before
        assert issued.not_after - lifetime / 3 - timedelta(hours=12) <= issued.renew_at <= issued.not_after - lifetime / 3


async def test_rate_budgets_hold_orders_back_without_contacting_the_ca(pebble, tmp_path: Path) -> None:
    from autocert._errors import IssuanceError
    from autocert._policy import RateBudget

    budget = RateBudget(orders=2, failures_per_name=4)
    async with running_manager(pebble, f"sqlite:///{tmp_path / 'budget.db'}", renew=False, budget=budget) as manager:
        await manager.allow("flaky.example.test", "a.example.test", "b.example.test", "c.example.test")
        # Four failed validations in the last hour: the fifth order is not placed.
        for _ in range(4):
            attempt = await manager.store.start_attempt("flaky.example.test", manager.directory)
            await manager.store.finish_attempt(attempt, "failed", "urn:ietf:params:acme:error:connection", "refused")
        first_failure = (await manager.store.attempts("flaky.example.test"))[-1].started_at
        with pytest.raises(IssuanceError, match="rate limits"):
            await manager.issue("flaky.example.test")
        assert await manager.store.attempt_count("flaky.example.test") == 4, "no order may be placed"
        state = await manager.store.name_state("flaky.example.test")
        assert state is not None and state.next_attempt_at == first_failure + timedelta(hours=1)

        # The account-wide budget: the four failures above count as orders too, so the budget
        # of 2 is already spent and a healthy name is held back as well, with a short recheck.
        with pytest.raises(IssuanceError, match="orders in the last"):
            await manager.issue("a.example.test")
        assert await manager.store.attempt_count("a.example.test") == 0
        (held,) = await manager.status(["a.example.test"])
        assert held["last_error"].startswith("held back until ") and "orders in the last" in held["last_error"]
        assert held["next_attempt_at"] is not None, "status shows why and until when"

    roomy = RateBudget(orders=6, failures_per_name=4)
    async with running_manager(pebble, f"sqlite:///{tmp_path / 'budget.db'}", renew=False, budget=roomy) as manager:
        assert (await manager.issue("a.example.test")).serial
        assert (await manager.issue("b.example.test")).serial
        with pytest.raises(IssuanceError, match="orders in the last"):
            await manager.issue("c.example.test")


async def test_a_name_failing_for_over_30_days_is_parked(pebble, tmp_path: Path) -> None:
    import sqlite3

    from autocert._errors import IssuanceError

    path = tmp_path / "park.db"
    pebble.add_a("dead.example.test", "127.0.0.2")  # nothing listens there: validation fails
    try:
        async with running_manager(pebble, f"sqlite:///{path}", renew=False) as manager:
            await manager.allow("dead.example.test")
            # A failure streak that began 40 days ago (written as an old process would have).
            for days in (40, 35, 31):
                attempt = await manager.store.start_attempt("dead.example.test", manager.directory)
                await manager.store.finish_attempt(attempt, "failed", "urn:ietf:params:acme:error:connection", "refused")
                with sqlite3.connect(path) as connection:
                    # The store keeps naive UTC text on SQLite so that text order is time order.
                    started = (datetime.now(timezone.utc) - timedelta(days=days)).replace(tzinfo=None).isoformat(sep=" ")
                    connection.execute("update attempts set started_at = ? where id = ?", (started, attempt))
            with pytest.raises(IssuanceError):
                await manager.issue("dead.example.test")  # an explicit attempt still tries
            state = await manager.store.name_state("dead.example.test")
            assert state is not None and state.failures == 4 and state.next_attempt_at is None
            scheduler = Scheduler(manager.store, manager.worker, is_allowed=manager.is_allowed,
                                  clock=lambda: datetime.now(timezone.utc) + timedelta(days=1))
            assert await scheduler.run_once() == [], "a parked name is not retried automatically"
            assert await manager.context_for("dead.example.test", wait=5) is None, "nor on a handshake"
            assert await manager.store.attempt_count("dead.example.test") == 4
            (status,) = await manager.status(["dead.example.test"])
            assert status["state"] == "failed" and status["next_attempt_at"] is None and status["last_error"]
    finally:
        pebble.clear_a("dead.example.test")


async def test_profile_is_ordered_stored_and_reused_on_renewal(pebble, tmp_path: Path) -> None:
    from ari_double import AriDouble

    from autocert._errors import IssuanceError

    profiles = {"classic": "90 days", "shortlived": "160 hours"}
    db = f"sqlite:///{tmp_path / 'profile.db'}"
    with AriDouble(pebble, profiles=profiles) as double:
        async with running_manager(pebble, db, renew=False, profile="shortlived") as manager:
            manager.worker.directory = double.directory_url
            await manager.allow("short.example.test", "nope.example.test")
            issued = await manager.issue("short.example.test")
            assert double.orders[-1]["profile"] == "shortlived"
            assert issued.profile == "shortlived"
        # A later run configured without a profile renews with the one the certificate has.
        async with running_manager(pebble, db, renew=False) as manager:
            manager.worker.directory = double.directory_url
            results = await manager.renew(["short.example.test"], force=True)
            assert not isinstance(results["short.example.test"], BaseException)
            assert double.orders[-1]["profile"] == "shortlived"
            assert results["short.example.test"].profile == "shortlived"  # type: ignore[union-attr]
        async with running_manager(pebble, db, renew=False, profile="weekly") as manager:
            manager.worker.directory = double.directory_url
            with pytest.raises(IssuanceError, match="does not offer the profile 'weekly'"):
                await manager.issue("nope.example.test")


async def test_an_interrupted_order_is_resumed_from_its_stored_url(pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'resume.db'}"
    async with running_manager(pebble, db, renew=False) as manager:
        await manager.allow("resume.example.test")
        answering = asyncio.Event()

        async def never_answers(*_args: object) -> None:
            answering.set()
            await asyncio.Event().wait()  # the process "dies" before the challenge is answered

        manager.challenges.present = never_answers  # type: ignore[method-assign]
        task = asyncio.ensure_future(manager.issue("resume.example.test"))
        await asyncio.wait_for(answering.wait(), 30)
        pending = await manager.store.pending_order("resume.example.test", manager.directory)
        assert pending is not None, "the order and its key are stored before any challenge is answered"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async with running_manager(pebble, db, renew=False) as manager:
        certificate = await manager.issue("resume.example.test")
        assert certificate.order_url == pending.order_url, "the stored order is resumed, not re-created"
        assert certificate.key_pem == pending.key_pem
        assert await manager.store.pending_order("resume.example.test", manager.directory) is None


async def test_the_scheduler_sweeps_http01_answers_a_killed_order_left_behind(pebble, tmp_path: Path) -> None:
    """An order that ends without withdrawing its answer (the process was killed) must not
    leave it in the database for ever; an answer younger than an hour may be a live order's."""
    manager = Manager(db=f"sqlite:///{tmp_path / 'sweep.db'}", directory=pebble.directory_url, ca_bundle=pebble.ca_bundle, renew=False)
    async with manager:
        await manager.store.put_challenge("left-behind", "gone.example.test", "left-behind.key")
        clock = {"now": datetime.now(timezone.utc) + timedelta(minutes=59)}
        scheduler = Scheduler(manager.store, manager.worker, is_allowed=manager.is_allowed, clock=lambda: clock["now"])
        await scheduler.run_once()
        assert await manager.store.get_challenge("left-behind") == "left-behind.key", "younger than an hour: kept"
        clock["now"] += timedelta(hours=1, minutes=2)
        await scheduler.run_once()
        assert await manager.store.get_challenge("left-behind") is None


def test_concurrent_orders_after_the_ca_forgot_the_account_are_all_issued(pebble_factory, tmp_path: Path) -> None:
    """A CA that forgot the account (Pebble restarted) fails every order in flight at once:
    one re-registration serves them all, and no order loses its connection to a client that
    another order replaced."""
    ca = pebble_factory()
    db = f"sqlite:///{tmp_path / 'forgot.db'}"
    names = [f"n{i}.forgot.example.test" for i in range(10)]
    assert run_cli("allow", "first.forgot.example.test", *names, db=db).returncode == 0
    listen = ["--http", f"127.0.0.1:{ca.http01_port}"]
    first = run_cli("issue", "first.forgot.example.test", *acme_args(ca), *listen, db=db, timeout=120)
    assert first.returncode == 0, first.stderr
    ca.stop()
    ca.start()  # Pebble keeps nothing: the account is gone
    result = run_cli("issue", *names, *acme_args(ca), *listen, "--json", db=db, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Unclosed" not in result.stderr, result.stderr
    assert result.stderr.count("registering the same key again") >= 1


def test_issue_again_reports_the_valid_certificate_unless_forced(pebble, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'again.db'}"
    name = "again.example.test"
    listen = ["--http", f"127.0.0.1:{pebble.http01_port}"]
    assert run_cli("allow", name, db=db).returncode == 0
    first = cli_json("issue", name, *acme_args(pebble), *listen, db=db)["certificates"][0]
    again = run_cli("issue", name, *acme_args(pebble), *listen, "--json", db=db)
    assert again.returncode == 0, again.stderr
    reported = json.loads(again.stdout)["certificates"][0]
    assert reported["serial"] == first["serial"] and reported["state"] == "valid" and reported["attempts"] == 1, "nothing ordered"
    forced = cli_json("issue", name, "--force", *acme_args(pebble), *listen, db=db)["certificates"][0]
    assert forced["serial"] != first["serial"] and forced["attempts"] == 2


async def test_a_restart_closes_attempts_left_running_as_interrupted(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'restart.db'}"
    first = Manager(db=db, directory="https://127.0.0.1:9/dir", renew=False)
    async with first:
        attempt = await first.store.start_attempt("killed.example.test", first.directory)  # then the process dies
    async with Manager(db=db, directory="https://127.0.0.1:9/dir", renew=False) as restarted:
        (closed,) = await restarted.store.attempts("killed.example.test")
        assert (closed.id, closed.result, closed.detail) == (attempt, "failed", "interrupted")


async def test_300_first_contacts_at_once_are_all_issued_by_a_ca_without_a_budget_of_ours(pebble, tmp_path: Path) -> None:
    """Let's Encrypt's limits are kept for Let's Encrypt only: another CA (Pebble here) is
    trusted to say rateLimited itself, so a burst of first contacts is not held back."""
    names = [f"n{i}.burst.example.test" for i in range(300)]
    async with running_manager(pebble, f"sqlite:///{tmp_path / 'burst.db'}", renew=False, concurrency=16) as manager:
        assert manager.budget is None
        await manager.allow(*names)
        contexts = await asyncio.gather(*(manager.context_for(name, wait=240) for name in names))
        missing = [name for name, context in zip(names, contexts) if context is None]
        assert not missing, f"{len(missing)} not issued, e.g. {missing[:3]}"


async def test_a_ca_rate_limit_holds_the_name_or_the_account_and_exempt_renewals_still_pass(pebble, tmp_path: Path) -> None:
    from ari_double import AriDouble

    from autocert._errors import IssuanceError

    with AriDouble(pebble) as double:
        async with running_manager(pebble, f"sqlite:///{tmp_path / 'limited.db'}", renew=False) as manager:
            manager.worker.directory = double.directory_url
            await manager.allow("kept.example.test", "one.example.test", "two.example.test", "three.example.test")
            await manager.issue("kept.example.test")

            double.rate_limit = ("too many certificates (5) already issued for this exact set of identifiers", 3600)
            with pytest.raises(IssuanceError, match="rateLimited"):
                await manager.issue("one.example.test")
            state = await manager.store.name_state("one.example.test")
            assert state is not None and state.next_attempt_at is not None
            assert state.next_attempt_at >= datetime.now(timezone.utc) + timedelta(minutes=59), "the CA's Retry-After, not a 1-minute retry"

            double.rate_limit = ("too many new orders (300) from this account in the last 3h0m0s", 1800)
            with pytest.raises(IssuanceError, match="rateLimited"):
                await manager.issue("two.example.test")
            double.rate_limit = None
            placed = len(double.orders)
            with pytest.raises(IssuanceError, match="rate-limited this account"):
                await manager.issue("three.example.test")
            assert len(double.orders) == placed, "held for the whole account without placing an order"

            renewed = (await manager.renew(["kept.example.test"], force=True))["kept.example.test"]
            assert not isinstance(renewed, BaseException), renewed
            assert "replaces" in double.orders[-1], "a renewal naming what it replaces is exempt"


async def test_an_address_is_ordered_short_lived_where_the_ca_offers_it(pebble, tmp_path: Path) -> None:
    """Let's Encrypt issues IP address certificates only under ``shortlived``: without a
    configured profile an address gets it (names keep the CA's default), and it is stored,
    so renewals keep it too."""
    from ari_double import AriDouble

    db = f"sqlite:///{tmp_path / 'address-profile.db'}"
    with AriDouble(pebble, profiles={"classic": "90 days", "shortlived": "160 hours"}) as double:
        async with running_manager(pebble, db, renew=False) as manager:
            manager.worker.directory = double.directory_url
            await manager.allow("127.0.0.1", "plain.example.test")
            issued = await manager.issue("127.0.0.1")
            assert double.orders[-1]["identifiers"] == [{"type": "ip", "value": "127.0.0.1"}]
            assert double.orders[-1]["profile"] == "shortlived" and issued.profile == "shortlived"
            plain = await manager.issue("plain.example.test")
            assert "profile" not in double.orders[-1] and plain.profile is None
