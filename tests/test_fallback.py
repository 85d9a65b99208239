"""CA fallback: several ACME directories tried in order, against real Pebbles.

An order moves to the next CA at once when the CA is why it failed (unreachable, 5xx,
rate-limited, over the budget kept there), never when the name is (validation failed). Renewals
start at the primary again, and only the CA that issued a certificate hears it named in
``replaces``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from ari_double import AriDouble, RenewalWindow
from pebble import Pebble, free_port
from support import acme_args, cli_json, run_cli

from autocert import Manager
from autocert._config import Listen, ServeOptions, listening_socket
from autocert._crypto import ari_certificate_id
from autocert._errors import ACME_ERROR_PREFIX, ConfigError, IssuanceError
from autocert._issuers import Issuer, ca_label, directories_from, parse_directories
from autocert._policy import RateBudget, budget_for, tries_next_ca
from autocert._scheduler import Scheduler
from autocert._server import listeners
from autocert.web import status_app

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
OTHER_CA = "https://acme.example.test/directory"


def closed_directory() -> str:
    """A directory URL on a loopback port nothing listens on: a CA that is down."""
    return f"https://127.0.0.1:{free_port()}/dir"


@contextlib.asynccontextmanager
async def fallback_manager(db: str, cas: Sequence[tuple[str, Pebble]], *, unanswered: Pebble | None = None) -> AsyncIterator[Manager]:
    """A Manager ordering from each directory in turn, trusting its Pebble's listener, with an
    http-01 listener wherever one of them validates (but where ``unanswered`` does)."""
    issuers = [Issuer(directory, ca_bundle=ca.ca_bundle) for directory, ca in cas]
    manager = Manager(db=db, issuers=issuers, agree_tos=True, renew=False)
    await manager.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            for port in dict.fromkeys(ca.http01_port for _, ca in cas if ca is not unanswered):
                options = ServeOptions(https=(), http=(Listen("127.0.0.1", port),), admin=None)
                await stack.enter_async_context(listeners(manager, options, {"http": [listening_socket(options.http[0])]}, announce=False))
            yield manager
    finally:
        await manager.stop()


@contextlib.asynccontextmanager
async def troubled_primary(pebble: Pebble, fallback: Pebble, db: str, **trouble: object) -> AsyncIterator[tuple[AriDouble, Manager]]:
    """``pebble`` behind a relay that answers new orders as ``trouble`` says is the primary CA;
    ``fallback`` the next one."""
    with AriDouble(pebble, **trouble) as primary:  # type: ignore[arg-type]
        async with fallback_manager(db, [(primary.directory_url, pebble), (fallback.directory_url, fallback)]) as manager:
            yield primary, manager


async def history(manager: Manager, name: str) -> list[tuple[str, str]]:
    """(directory, result) of every attempt for ``name``, oldest first."""
    return [(attempt.directory, attempt.result) for attempt in reversed(await manager.store.attempts(name))]


# -- the rules, with values only ------------------------------------------------------------


@pytest.mark.parametrize("problem", ["unauthorized", "dns", "connection", "incorrectResponse", "tls", "caa", "rejectedIdentifier"])
def test_a_failure_that_is_the_names_own_stays_at_the_ca(problem: str) -> None:
    assert not tries_next_ca(ACME_ERROR_PREFIX + problem)


@pytest.mark.parametrize("problem", [None, "serverInternal", "rateLimited", "badNonce", "malformed", "userActionRequired",
                                     "externalAccountRequired", "unsupportedIdentifier"])
def test_a_failure_that_is_the_cas_moves_to_the_next(problem: str | None) -> None:
    assert tries_next_ca(None if problem is None else ACME_ERROR_PREFIX + problem)


def test_budgets_are_kept_per_ca() -> None:
    assert budget_for(Issuer(LETS_ENCRYPT)) == RateBudget(), "Let's Encrypt's limits, for its directory"
    assert budget_for(Issuer(OTHER_CA)) is None, "another CA says rateLimited itself"
    limited = budget_for(Issuer(OTHER_CA, order_limit=(10, timedelta(hours=1))))
    assert limited is not None and (limited.orders, limited.order_window, limited.failures_per_name) == (10, timedelta(hours=1), None)
    assert budget_for(Issuer(LETS_ENCRYPT, order_limit=None)) is None, "--order-limit none"
    assert budget_for(Issuer(LETS_ENCRYPT), RateBudget(orders=5)) == RateBudget(orders=5), "one budget set for every CA wins"


def test_directories_come_from_the_options_the_environment_or_the_default() -> None:
    assert directories_from(["https://a.test/dir", "https://b.test/dir"], {}, LETS_ENCRYPT) == ("https://a.test/dir", "https://b.test/dir")
    env = {"AUTOCERT_DIRECTORY": " https://a.test/dir , https://b.test:8443/dir "}
    assert directories_from(None, env, LETS_ENCRYPT) == ("https://a.test/dir", "https://b.test:8443/dir")
    assert directories_from(["https://c.test/dir"], env, LETS_ENCRYPT) == ("https://c.test/dir",), "the command line wins"
    assert directories_from(None, {}, LETS_ENCRYPT) == (LETS_ENCRYPT,)
    assert ca_label("https://b.test:8443/dir") == "b.test:8443" and ca_label(LETS_ENCRYPT) == "acme-v02.api.letsencrypt.org"
    for bad, message in ((["ftp://a.test/dir"], "--directory 'ftp://a.test/dir'"), (["https://a.test/x", "https://a.test/x"], "given twice"),
                         (["https:///dir"], "--directory 'https:///dir'")):
        with pytest.raises(ConfigError, match=message):
            parse_directories(bad)
    with pytest.raises(ConfigError, match="AUTOCERT_DIRECTORY ''"):
        directories_from(None, {"AUTOCERT_DIRECTORY": "https://a.test/dir,"}, LETS_ENCRYPT)


def test_a_bad_directory_is_refused_in_one_line_before_anything_is_written(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'bad.db'}"
    result = run_cli("issue", "x.example.test", "--directory", "https://127.0.0.1:9/dir", "--directory", "acme.example.test", db=db)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["autocert: error: --directory 'acme.example.test': expected the https:// URL of an ACME directory"]
    assert not (tmp_path / "bad.db").exists()


# -- against real CAs --------------------------------------------------------------------------


def test_an_unreachable_primary_falls_back_and_status_shows_which_ca_issued(pebble: Pebble, tmp_path: Path) -> None:
    """Through the command line, with the CAs listed in the environment as users write them."""
    db = f"sqlite:///{tmp_path / 'down.db'}"
    down = closed_directory()
    assert run_cli("allow", "down.example.test", db=db).returncode == 0
    other = [arg for arg in acme_args(pebble) if arg != "--directory" and arg != pebble.directory_url]
    issued = run_cli("issue", "down.example.test", *other, "--http", f"127.0.0.1:{pebble.http01_port}", db=db,
                     env={"AUTOCERT_DIRECTORY": f"{down},{pebble.directory_url}"})
    assert issued.returncode == 0, issued.stderr
    assert f"CA {ca_label(down)} failed (" in issued.stderr and f"trying {ca_label(pebble.directory_url)}" in issued.stderr

    (status,) = cli_json("status", "down.example.test", db=db)["certificates"]
    assert status["state"] == "valid" and status["ca"] == pebble.directory_url and status["last_error"] is None
    assert status["attempts"] == 2, "the attempt at the CA that was down is on record too"
    table = run_cli("status", db=db)
    header, row = table.stdout.splitlines()
    assert "  CA  " in header and f"  {ca_label(pebble.directory_url)}  " in row


async def test_a_primary_answering_5xx_falls_back_at_once(pebble: Pebble, pebble_factory, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    second = pebble_factory()
    caplog.set_level(logging.WARNING, logger="autocert.worker")
    async with troubled_primary(pebble, second, f"sqlite:///{tmp_path / '5xx.db'}", order_error=(500, "serverInternal")) as (primary, manager):
        await manager.allow("five.example.test")
        certificate = await manager.issue("five.example.test")
        assert certificate.directory == second.directory_url
        assert len(primary.orders) == 1
        assert await history(manager, "five.example.test") == [(primary.directory_url, "failover"), (second.directory_url, "valid")]
        assert f"CA {ca_label(primary.directory_url)} failed ({ACME_ERROR_PREFIX}serverInternal" in caplog.text
        (status,) = await manager.status(["five.example.test"])
        assert status["ca"] == second.directory_url and status["state"] == "valid"
        assert (await manager.store.name_state("five.example.test")).failures == 0  # type: ignore[union-attr]

        async with TestClient(TestServer(status_app(manager))) as client:
            page = await (await client.get("/")).text()
            name_page = await (await client.get("/name/five.example.test")).text()
        assert f"falling back on {second.directory_url}" in page
        row = page[page.index('data-name="five.example.test"'):]
        assert f'title="issued through the ACME directory {second.directory_url}">{ca_label(second.directory_url)}<' in row
        attempts = name_page[name_page.index('id="attempts"'):]
        assert attempts.index(ca_label(second.directory_url)) < attempts.index(ca_label(primary.directory_url)), "newest first"
        assert ">failover<" in attempts


async def test_a_rate_limited_primary_holds_no_order_at_the_next_ca(pebble: Pebble, pebble_factory, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    second = pebble_factory()
    caplog.set_level(logging.WARNING, logger="autocert.worker")
    limit = ("too many new orders (300) from this account in the last 3h0m0s", 3600)
    async with troubled_primary(pebble, second, f"sqlite:///{tmp_path / 'limited.db'}", rate_limit=limit) as (primary, manager):
        await manager.allow("one.example.test", "two.example.test")
        assert (await manager.issue("one.example.test")).directory == second.directory_url
        assert len(primary.orders) == 1
        # The primary holds the whole account for an hour: the next order goes straight on.
        assert (await manager.issue("two.example.test")).directory == second.directory_url
        assert len(primary.orders) == 1, "the rate-limited CA was not asked again"
        assert await history(manager, "two.example.test") == [(second.directory_url, "valid")]
        assert f"CA {ca_label(primary.directory_url)} holds new orders until" in caplog.text
        (status,) = await manager.status(["two.example.test"])
        assert status["next_attempt_at"] is None and status["last_error"] is None


async def test_an_order_budget_counted_in_the_database_is_kept_per_ca(pebble: Pebble, pebble_factory, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The primary's budget (one order an hour) is counted from the attempts recorded against
    its directory, in the transaction that starts the attempt; the next CA's orders are not
    counted there, and the primary is not contacted once its budget is spent."""
    second = pebble_factory()
    caplog.set_level(logging.WARNING, logger="autocert.worker")
    with AriDouble(pebble) as primary:
        issuers = [Issuer(primary.directory_url, ca_bundle=pebble.ca_bundle, order_limit=(1, timedelta(hours=1))),
                   Issuer(second.directory_url, ca_bundle=second.ca_bundle, order_limit=(1, timedelta(hours=1)))]
        manager = Manager(db=f"sqlite:///{tmp_path / 'budget.db'}", issuers=issuers, agree_tos=True, renew=False)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(manager)
            for port in dict.fromkeys((pebble.http01_port, second.http01_port)):
                options = ServeOptions(https=(), http=(Listen("127.0.0.1", port),), admin=None)
                await stack.enter_async_context(listeners(manager, options, {"http": [listening_socket(options.http[0])]}, announce=False))
            await manager.allow("b1.example.test", "b2.example.test", "b3.example.test")
            assert (await manager.issue("b1.example.test")).directory == primary.directory_url
            assert (await manager.issue("b2.example.test")).directory == second.directory_url
            ordered_at_primary = {identifier["value"] for order in primary.orders for identifier in order["identifiers"]}
            assert ordered_at_primary == {"b1.example.test"}, "the primary's spent budget held the order without contacting it"
            assert await history(manager, "b2.example.test") == [(second.directory_url, "valid")]
            assert f"CA {ca_label(primary.directory_url)} holds new orders until" in caplog.text
            with pytest.raises(IssuanceError, match="held back"):
                await manager.issue("b3.example.test")  # both budgets spent: held, nothing placed
            assert await history(manager, "b3.example.test") == []
            assert "b3.example.test" not in {identifier["value"] for order in primary.orders for identifier in order["identifiers"]}
            assert await manager.store.orders_since(primary.directory_url, datetime.now(UTC) - timedelta(hours=1)) == 1


async def test_a_validation_failure_is_not_tried_at_the_next_ca(pebble: Pebble, pebble_factory, tmp_path: Path) -> None:
    """Nothing answers http-01 where the primary validates: the name's fault, not the CA's."""
    second = pebble_factory()
    cas = [(pebble.directory_url, pebble), (second.directory_url, second)]
    async with fallback_manager(f"sqlite:///{tmp_path / 'invalid.db'}", cas, unanswered=pebble) as manager:
        await manager.allow("unanswered.example.test")
        with pytest.raises(IssuanceError, match="connection"):
            await manager.issue("unanswered.example.test")
        assert await history(manager, "unanswered.example.test") == [(pebble.directory_url, "failed")]
        (status,) = await manager.status(["unanswered.example.test"])
        assert status["state"] == "failed" and status["ca"] is None and status["next_attempt_at"] is not None


async def test_a_renewal_starts_at_the_primary_again_and_names_what_it_replaces_only_there(
    pebble: Pebble, pebble_factory, tmp_path: Path
) -> None:
    second = pebble_factory()
    async with troubled_primary(pebble, second, f"sqlite:///{tmp_path / 'back.db'}", order_error=(503, "serverInternal")) as (primary, manager):
        await manager.allow("back.example.test")
        first = await manager.issue("back.example.test")
        assert first.directory == second.directory_url

        primary.order_error = None  # the primary is back
        renewed = (await manager.renew(["back.example.test"], force=True))["back.example.test"]
        assert not isinstance(renewed, BaseException), renewed
        assert renewed.directory == primary.directory_url
        assert "replaces" not in primary.orders[-1], "the primary never issued the certificate being replaced"
        (status,) = await manager.status(["back.example.test"])
        assert status["ca"] == primary.directory_url and status["serial"] == renewed.serial



async def test_renewal_windows_are_asked_of_the_ca_that_issued_each_certificate(pebble: Pebble, pebble_factory, tmp_path: Path) -> None:
    """A CA without renewal information (Pebble 2.4) no longer stops the checks of certificates
    from a CA that has it."""
    db = f"sqlite:///{tmp_path / 'ari.db'}"
    second = pebble_factory()
    with AriDouble(second) as with_ari:
        now = datetime.now(UTC)
        with_ari.window = RenewalWindow(start=now + timedelta(days=2), end=now + timedelta(days=3))
        async with fallback_manager(db, [(pebble.directory_url, pebble)]) as manager:
            await manager.allow("plain.example.test", "ari.example.test")
            plain = await manager.issue("plain.example.test")
        async with fallback_manager(db, [(with_ari.directory_url, second)]) as manager:
            windowed = await manager.issue("ari.example.test")
        async with fallback_manager(db, [(pebble.directory_url, pebble), (with_ari.directory_url, second)]) as manager:
            assert plain.id < windowed.id, "the certificate from the CA without renewal information is looked at first"
            scheduler = Scheduler(manager.store, manager.worker, is_allowed=manager.is_allowed)
            assert await scheduler.check_renewal_info() == 1
            assert with_ari.renewal_info_requests == [ari_certificate_id(windowed.chain_pem)]
            stored = await manager.store.current_certificate("ari.example.test")
            assert stored is not None and with_ari.window.start <= stored.renew_at <= with_ari.window.end
            assert await scheduler.check_renewal_info() == 0, "neither is due again"
            assert (await manager.store.current_certificate("plain.example.test")).renew_at == plain.renew_at  # type: ignore[union-attr]
