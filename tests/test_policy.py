"""The rules in one place: each is a pure function, tested here with values alone."""

from __future__ import annotations

import collections
import heapq
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from autocert._policy import (
    BUDGET_RECHECK,
    PARK_AFTER,
    RETRY_DELAYS,
    STATES,
    RateBudget,
    account_budget_hold,
    ari_next_check,
    budget_with_order_limit,
    certificate_name,
    challenged_address,
    default_budget,
    exempt_from_budgets,
    failure_budget_hold,
    hold_reason,
    is_allowed,
    lease_held,
    name_status,
    next_attempt_after_failure,
    order_budget_hold,
    order_profile,
    rate_limit_hold,
    renewal_time,
    unnamed_route,
    within_cap,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


@dataclass
class State:
    failures: int
    next_attempt_at: datetime | None


@pytest.mark.parametrize(
    ("entry", "name", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "www.example.com", False),
        ("*.example.com", "www.example.com", True),
        ("*.example.com", "example.com", False),  # a pattern does not cover its base
        ("*.example.com", "a.b.example.com", False),  # nor more than one label
        ("*.example.com", "wwwexample.com", False),
        ("*.example.com", "www.example.org", False),
        ("www.example.com", "www.example.com", True),
    ],
)
def test_is_allowed_exactly_or_by_the_one_label_pattern(entry: str, name: str, expected: bool) -> None:
    assert is_allowed(name, {entry}) is expected


def test_a_wildcard_pattern_serves_the_names_under_it_from_its_own_certificate() -> None:
    entries, wildcards = {"*.w.example", "own.w.example", "*.p.example"}, {"*.w.example"}
    assert certificate_name("a.w.example", entries, wildcards) == "*.w.example"
    assert certificate_name("own.w.example", entries, wildcards) == "own.w.example"  # an exact entry keeps its own
    assert certificate_name("a.p.example", entries, wildcards) == "a.p.example"  # a plain pattern: one per name
    assert certificate_name("*.w.example", entries, wildcards) == "*.w.example"
    assert certificate_name("*.p.example", entries, wildcards) is None  # only a wildcard pattern is a certificate
    assert certificate_name("a.b.w.example", entries, wildcards) is None
    assert certificate_name("w.example", entries, wildcards) is None


def test_a_cap_counts_names_ordered_and_names_reserved() -> None:
    assert within_cap("new.example", None, {"a.example", "b.example"}, set())
    assert within_cap("new.example", 3, {"a.example"}, {"b.example"})
    assert not within_cap("new.example", 2, {"a.example"}, {"b.example"})
    assert within_cap("a.example", 2, {"a.example"}, {"b.example"}), "a name already counted keeps its place"
    assert within_cap("b.example", 2, {"a.example"}, {"b.example"})


def test_retry_delays_grow_then_repeat_and_a_month_of_failures_parks() -> None:
    assert next_attempt_after_failure(NOW, 1, 1) == NOW + timedelta(minutes=1)
    assert next_attempt_after_failure(NOW, 3, 3) == NOW + timedelta(minutes=5)
    assert next_attempt_after_failure(NOW, 50, 50) == NOW + RETRY_DELAYS[-1]
    assert list(RETRY_DELAYS) == sorted(RETRY_DELAYS)
    # 120 failures in a row of which only 119 fall in the last PARK_AFTER: the first is older.
    assert next_attempt_after_failure(NOW, 120, 119) is None
    assert PARK_AFTER == timedelta(days=30)


def test_hold_reason_is_backoff_parked_or_nothing() -> None:
    assert hold_reason(None, NOW) is None
    assert hold_reason(State(0, None), NOW) is None
    assert hold_reason(State(2, NOW + timedelta(seconds=1)), NOW) == "backoff"
    assert hold_reason(State(2, NOW), NOW) is None, "a backoff that has ended holds nothing"
    assert hold_reason(State(9, None), NOW) == "parked"


def test_budgets_hold_until_the_oldest_counted_failure_leaves_the_window() -> None:
    budget = RateBudget(orders=2, failures_per_name=2, failure_window=timedelta(hours=1))
    first, second = NOW - timedelta(minutes=50), NOW - timedelta(minutes=10)
    assert failure_budget_hold(budget, [second]) is None
    until, why = failure_budget_hold(budget, [first, second])  # type: ignore[misc]
    assert until == first + timedelta(hours=1) and "2 failed validations" in why
    assert order_budget_hold(budget, 1, NOW) is None
    until, why = order_budget_hold(budget, 2, NOW)  # type: ignore[misc]
    assert until == NOW + BUDGET_RECHECK and "2 orders" in why


def test_a_lease_is_held_until_it_runs_out() -> None:
    assert lease_held("host:1:a", NOW + timedelta(seconds=1), NOW)
    assert not lease_held("host:1:a", NOW, NOW)
    assert not lease_held(None, NOW + timedelta(hours=1), NOW)


@pytest.mark.parametrize(
    ("allowed", "expires_in", "ordering", "failures", "expected"),
    [
        (False, 30, False, 0, "disallowed"),
        (True, 30, False, 0, "valid"),
        (True, 30, True, 0, "renewing"),
        (True, -1, False, 0, "expired"),
        (True, -1, True, 0, "renewing"),
        (True, None, True, 3, "issuing"),
        (True, None, False, 3, "failed"),
        (True, None, False, 0, "pending"),
    ],
)
def test_name_status(allowed: bool, expires_in: int | None, ordering: bool, failures: int, expected: str) -> None:
    not_after = None if expires_in is None else NOW + timedelta(days=expires_in)
    state = name_status(allowed=allowed, not_after=not_after, ordering=ordering, failures=failures, now=NOW)
    assert state == expected and state in STATES


def test_renewal_information_is_fetched_again_within_bounds() -> None:
    rng = random.Random(7)
    assert ari_next_check(NOW, 60, rng) == NOW + timedelta(minutes=30), "a too-eager Retry-After is raised"
    assert ari_next_check(NOW, 7 * 86400, rng) == NOW + timedelta(days=1), "a too-lazy one is capped"
    assert ari_next_check(NOW, 7200, rng) == NOW + timedelta(hours=2)
    assert timedelta(hours=10.8) <= ari_next_check(NOW, None, rng) - NOW <= timedelta(hours=13.2)


def test_budgets_follow_the_ca() -> None:
    assert default_budget("https://acme-v02.api.letsencrypt.org/directory") == RateBudget()
    assert default_budget("https://acme-staging-v02.api.letsencrypt.org/directory") == RateBudget()
    assert default_budget("https://127.0.0.1:14000/dir") is None, "other CAs: their own rateLimited answers decide"
    lets_encrypt = budget_with_order_limit("https://acme-v02.api.letsencrypt.org/directory", (300, timedelta(hours=3)))
    assert lets_encrypt == RateBudget(orders=300, order_window=timedelta(hours=3), failures_per_name=4)
    other = budget_with_order_limit("https://ca.example/dir", (50, timedelta(minutes=30)))
    assert other == RateBudget(orders=50, order_window=timedelta(minutes=30), failures_per_name=None)
    assert budget_with_order_limit("https://acme-v02.api.letsencrypt.org/directory", None) is None


def test_when_the_budget_binds_renewals_go_first_and_exempt_renewals_are_never_held() -> None:
    budget = RateBudget(orders=10)
    assert order_budget_hold(budget, 7, NOW, reserved=2) is None
    until, why = order_budget_hold(budget, 8, NOW, reserved=2)  # type: ignore[misc]
    assert "2 kept for renewals" in why, "a new name leaves room for the renewals due"
    assert order_budget_hold(budget, 8, NOW) is None, "a renewal uses that room"
    assert exempt_from_budgets(renewing=True, sends_replaces=True, ca_has_renewal_info=True)
    assert not exempt_from_budgets(renewing=True, sends_replaces=True, ca_has_renewal_info=False)
    assert not exempt_from_budgets(renewing=False, sends_replaces=False, ca_has_renewal_info=True)


def test_a_ca_rate_limit_holds_the_name_or_the_whole_account() -> None:
    account = "too many new orders (300) from this account in the last 3h0m0s, retry after 2026-11-27 15:00:00 UTC"
    assert rate_limit_hold(account, 600, NOW) == (NOW + timedelta(minutes=10), True)
    assert rate_limit_hold("too many certificates (5) already issued for this exact set of identifiers", 3600, NOW) == (
        NOW + timedelta(hours=1), False)
    assert rate_limit_hold(account, None, NOW) is None, "without Retry-After the usual backoff applies"


def simulate(*, names: int, days: int, ca_has_renewal_info: bool, new_names_per_window: int) -> tuple[int, int, int]:
    """A population of short-lived certificates (Let's Encrypt's ``shortlived`` profile, 160 h)
    renewed under Let's Encrypt's budget by the same rules the worker applies, with new names
    asking for certificates all along. Returns (renewals, new names issued, certificates that
    ran past their expiry). Clock only: every order succeeds at once."""
    budget = default_budget("https://acme-v02.api.letsencrypt.org/directory")
    assert budget is not None
    lifetime, step = timedelta(hours=160), timedelta(minutes=10)
    rng = random.Random(1)
    expiry: dict[int, datetime] = {}
    due: list[tuple[datetime, int]] = []  # (renew_at, name), a heap
    counted: collections.deque[datetime] = collections.deque()  # orders that count, in the window
    renewals = issued_new = expired = 0
    now = NOW

    def issue(name: int) -> None:
        not_before = now
        expiry[name] = not_before + lifetime
        heapq.heappush(due, (renewal_time(not_before, not_before + lifetime), name))

    for name in range(names):  # a population issued over the week before
        now = NOW - timedelta(hours=rng.uniform(0, 150))
        issue(name)
    now, waiting, next_name = NOW, 0, names
    end = NOW + timedelta(days=days)
    while now < end:
        while counted and counted[0] <= now - budget.order_window:
            counted.popleft()
        expired += sum(1 for moment in expiry.values() if moment <= now) if now.minute == 0 and now.hour % 6 == 0 else 0
        renewals_due = sum(1 for renew_at, _ in due if renew_at <= now + budget.order_window) if not ca_has_renewal_info else 0
        while due and due[0][0] <= now:
            _, name = due[0]
            exempt = exempt_from_budgets(renewing=True, sends_replaces=True, ca_has_renewal_info=ca_has_renewal_info)
            if account_budget_hold(budget, renewing=True, exempt=exempt, ca_has_renewal_info=ca_has_renewal_info,
                                   counted_orders=len(counted), renewals_due=renewals_due, now=now):
                break
            heapq.heappop(due)
            issue(name)
            renewals += 1
            if not exempt:
                counted.append(now)
        waiting += new_names_per_window * step / budget.order_window
        while waiting >= 1:
            if account_budget_hold(budget, renewing=False, exempt=False, ca_has_renewal_info=ca_has_renewal_info,
                                   counted_orders=len(counted), renewals_due=renewals_due, now=now):
                break
            issue(next_name)
            next_name += 1
            issued_new += 1
            counted.append(now)
            waiting -= 1
        now += step
    return renewals, issued_new, expired


def test_short_lived_certificates_never_expire_while_the_budget_binds() -> None:
    # 10,000 names need ~375 renewals every 3 hours, more than the whole budget of 270: only
    # because the CA exempts renewals that send `replaces` does nothing expire, while new
    # names still get the whole budget.
    renewals, issued_new, expired = simulate(names=10_000, days=14, ca_has_renewal_info=True, new_names_per_window=400)
    assert expired == 0
    assert renewals > 10_000 * 3
    assert issued_new >= 270 * 8 * 14 * 0.95, "new names use the whole budget"


def test_where_renewals_count_they_go_before_new_names() -> None:
    # 3,000 names renew about 112 times every 3 hours: with new names asking for more than the
    # budget, renewals still never wait behind them.
    renewals, issued_new, expired = simulate(names=3_000, days=14, ca_has_renewal_info=False, new_names_per_window=400)
    assert expired == 0
    assert renewals > 3_000 * 3
    assert issued_new > 0


def test_addresses_are_ordered_short_lived_where_the_ca_offers_it() -> None:
    """Let's Encrypt issues IP address certificates only under ``shortlived``; a profile the
    user chose (or the renewed certificate had) always wins."""
    offered = {"classic": "90 days", "shortlived": "160 hours"}
    assert order_profile(None, ["203.0.113.7"], offered) == "shortlived"
    assert order_profile(None, ["2001:db8::1"], offered) == "shortlived"
    assert order_profile("classic", ["203.0.113.7"], offered) == "classic"
    assert order_profile(None, ["shop.example.com"], offered) is None
    assert order_profile(None, ["203.0.113.7"], {"classic": "90 days"}) is None
    assert order_profile(None, ["203.0.113.7"], {}) is None


def test_a_client_without_sni_is_served_the_address_it_connected_to() -> None:
    allowed = {"203.0.113.7", "2001:db8::1", "shop.example.com"}
    assert unnamed_route("203.0.113.7", None, allowed) == "203.0.113.7"
    assert unnamed_route("::ffff:203.0.113.7", None, allowed) == "203.0.113.7"
    assert unnamed_route("2001:db8::1", "shop.example.com", allowed) == "2001:db8::1"
    assert unnamed_route("198.51.100.1", "shop.example.com", allowed) == "shop.example.com"
    assert unnamed_route("198.51.100.1", None, allowed) == ""
    assert unnamed_route(None, None, allowed) == ""


def test_tls_alpn_01_for_an_address_arrives_under_its_reverse_name() -> None:
    allowed = {"203.0.113.7", "*.example.com"}
    assert challenged_address("7.113.0.203.in-addr.arpa", allowed) == "203.0.113.7"
    assert challenged_address("8.113.0.203.in-addr.arpa", allowed) is None, "not allowed"
    assert challenged_address("shop.example.com", allowed) is None
