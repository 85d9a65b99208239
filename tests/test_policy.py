"""The rules in one place: each is a pure function, tested here with values alone."""

from __future__ import annotations

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
    ari_next_check,
    failure_budget_hold,
    hold_reason,
    is_allowed,
    lease_held,
    name_status,
    next_attempt_after_failure,
    order_budget_hold,
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
