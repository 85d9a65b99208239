"""The rules autocert follows, and nothing else: who may be served, who may be ordered now,
when to renew, retry and park, and what state a name is in.

Pure functions and small value types, no I/O and no clock of their own: callers read the
database and the time, and ask here what to do. Each rule is written once, so the handshake
path, the worker, the scheduler, the status report and the expiry watch cannot disagree, and
each can be tested with nothing but values.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal, Protocol
from urllib.parse import urlsplit

from ._errors import ACME_ERROR_PREFIX
from ._issuers import Issuer
from ._names import address_of_reverse_name, address_of_socket, is_address, pattern_for

__all__ = [
    "BUDGET_RECHECK",
    "account_budget_hold",
    "ask_answer",
    "EXPIRING_SOON",
    "MAX_CAP",
    "Backoff",
    "HoldReason",
    "PARK_AFTER",
    "RETRY_DELAYS",
    "SEVERITY",
    "STALE_CHALLENGE_AGE",
    "STATES",
    "RateBudget",
    "Route",
    "ari_next_check",
    "budget_for",
    "budget_with_order_limit",
    "certificate_name",
    "challenged_address",
    "default_budget",
    "exempt_from_budgets",
    "expires_soon",
    "expires_soon_from",
    "failure_budget_hold",
    "hold_reason",
    "is_allowed",
    "is_expiring",
    "is_parked",
    "lease_held",
    "name_status",
    "needs_attention",
    "needs_order",
    "next_attempt_after_failure",
    "next_attempt_after_rate_limit",
    "order_budget_hold",
    "order_profile",
    "rate_limit_hold",
    "renewal_time",
    "retry_delay",
    "time_in_window",
    "tries_next_ca",
    "unnamed_route",
    "within_cap",
]


# ---------------------------------------------------------------------------------------------
# Who may be served


def is_allowed(name: str, allowed_entries: Collection[str]) -> bool:
    """Whether the normalised ``name`` is on the allowlist, exactly or by the one pattern
    (``*.base``, one label) that can cover it: two set look-ups, whatever the list's size.
    (:func:`certificate_name` with every pattern counted as a wildcard says the same.)"""
    return certificate_name(name, allowed_entries, allowed_entries) is not None


def allowlist_candidates(names: Collection[str]) -> list[str]:
    """The allowlist entries that could allow ``names`` (see :func:`is_allowed`): the names
    themselves and the one pattern over each, sorted, for a look-up in the database."""
    return sorted({*names, *(pattern for pattern in map(pattern_for, names) if pattern)})


def certificate_name(name: str, allowed_entries: Collection[str], wildcards: Collection[str]) -> str | None:
    """The name of the certificate that serves ``name``: its own, the wildcard certificate
    of the pattern covering it when that pattern is in ``wildcards``, or None when ``name``
    is not allowed. An exact entry keeps its own certificate even under a wildcard pattern;
    a pattern names a certificate only when it is a wildcard entry. At most three set
    look-ups, and no allocation beyond :func:`pattern_for`'s, as it runs on every handshake."""
    if name in allowed_entries:
        return name if not name.startswith("*.") or name in wildcards else None
    pattern = pattern_for(name)
    if pattern is None or pattern not in allowed_entries:
        return None
    return pattern if pattern in wildcards else name


def unnamed_route(local_address: str | None, default_name: str | None, allowed_entries: Collection[str]) -> str:
    """The name a client that sent no SNI is served: the address it connected to when that is
    allowed (its IP certificate, RFC 8738), else the default name, else "" (refused). Only
    exact entries allow addresses, so an unknown one costs a cached parse and a set look-up."""
    address = address_of_socket(local_address) if local_address else None
    if address is not None and address in allowed_entries:
        return address
    return default_name or ""


def challenged_address(server_name: str, allowed_entries: Collection[str]) -> str | None:
    """The allowed address a tls-alpn-01 validation is for, when ``server_name`` is its
    reverse-DNS name (RFC 8738 section 6: SNI cannot carry an address), else None."""
    address = address_of_reverse_name(server_name)
    return address if address is not None and address in allowed_entries else None


#: The largest cap a pattern may have: the database stores it as a 32-bit integer.
MAX_CAP = 2**31 - 1


def within_cap(name: str, cap: int | None, used: Collection[str], reserved: Collection[str]) -> bool:
    """Whether a name allowed only through a pattern may be ordered under the pattern's cap.

    ``used`` are the names ever ordered under the pattern and ``reserved`` those admitted
    but not ordered yet; a name already among them keeps its place.
    """
    if cap is None or name in used or name in reserved:
        return True
    return len(set(used) | set(reserved)) < cap


class Route(enum.Enum):
    """What ``Manager.route`` decided for a handshake (both SNI paths ask it); the value names
    the ``handshakes`` counter the outcome is counted in."""

    #: A cached context: start TLS with it now.
    SERVE = "served"
    #: An ``acme-tls/1`` client: the pending tls-alpn-01 context (None: build it, or refuse).
    CHALLENGE = "challenge"
    #: Allowed, nothing in memory: load the certificate or issue one, then serve.
    LOAD = "pending"
    #: Not allowed, no name, or not started: alert ``unrecognized_name``.
    REFUSE = "unknown_name"
    #: Allowed, but held back (backoff, parked, over its pattern's cap or a budget) and known
    #: to be so from memory: alert ``unrecognized_name`` without touching the database.
    HELD = "held"
    #: Not on the allowlist, and the ask endpoint has no answer for it in memory: ask it
    #: (off the handshake's synchronous path), then refuse or go on as ``LOAD``.
    ASK = "asked"


#: How long an ask endpoint's answer stands when it sends no ``Cache-Control: max-age``: an
#: allowed name is asked again after an hour (and before each renewal), a refused one after
#: five minutes, and a failed ask (timeout, connection error) after ten seconds, so that an
#: endpoint's hiccup neither refuses a name for long nor lets a flood hammer it.
ASK_ALLOWED_TTL = 3600.0
ASK_REFUSED_TTL = 300.0
ASK_FAILED_TTL = 10.0


def ask_answer(status: int | None, cache_control: str | None) -> tuple[bool, float]:
    """An ask endpoint's answer as (allowed, seconds it stands). Any 2xx allows (Caddy's
    rule); every other status, and no answer at all (``status`` None), refuses. The answer's
    own ``max-age`` wins over the defaults; ``no-store``/``no-cache`` mean ask every time."""
    allowed = status is not None and 200 <= status < 300
    if status is None:
        return False, ASK_FAILED_TTL
    for directive in (cache_control or "").lower().split(","):
        key, _, value = directive.strip().partition("=")
        if key in ("no-store", "no-cache"):
            return allowed, 0.0
        if key == "max-age" and value.strip().strip('"').isdigit():
            return allowed, float(value.strip().strip('"'))
    return allowed, ASK_ALLOWED_TTL if allowed else ASK_REFUSED_TTL


# ---------------------------------------------------------------------------------------------
# When to retry, and when to give up

#: The wait before the next attempt, indexed by consecutive failures; the last entry repeats.
#: Grows quickly so a dead name never burns the CA's failed-validation limit (Let's Encrypt:
#: 5 per name per hour); close to CertMagic's table and Let's Encrypt's advice.
RETRY_DELAYS: tuple[timedelta, ...] = (
    #                        failure  next attempt, counted from the first failure
    timedelta(minutes=1),  # 1        1 min
    timedelta(minutes=2),  # 2        3 min
    timedelta(minutes=5),  # 3        8 min
    timedelta(minutes=10),  # 4       18 min
    timedelta(minutes=30),  # 5       48 min
    timedelta(hours=1),  # 6          1 h 48 min
    timedelta(hours=3),  # 7          4 h 48 min
    timedelta(hours=6),  # 8+         10 h 48 min, then every 6 h until PARK_AFTER
)

#: After failing this long without a success a name is parked: no automatic attempts until a
#: manual one (``autocert issue``, ``renew --force``). CertMagic and Let's Encrypt both advise
#: giving up on dead domains rather than retrying forever.
PARK_AFTER = timedelta(days=30)


def retry_delay(failures: int) -> timedelta:
    """The wait after ``failures`` consecutive failed attempts."""
    if failures <= 0:
        return timedelta(0)
    return RETRY_DELAYS[min(failures, len(RETRY_DELAYS)) - 1]


def next_attempt_after_failure(now: datetime, failures: int, failures_within_park_window: int) -> datetime | None:
    """When a name that just failed for the ``failures``-th time in a row may be tried again;
    None parks it: its first consecutive failure is older than :data:`PARK_AFTER`, because
    fewer failures than that fell inside the window."""
    if failures > failures_within_park_window:
        return None
    return now + retry_delay(failures)


class Backoff(Protocol):
    """The part of a name's stored state the retry rules read."""

    @property
    def failures(self) -> int: ...

    @property
    def next_attempt_at(self) -> datetime | None: ...


def is_parked(state: Backoff | None) -> bool:
    """Failing with no next attempt scheduled: parked after :data:`PARK_AFTER` of failures."""
    return state is not None and state.failures > 0 and state.next_attempt_at is None


def lease_held(owner: str | None, until: datetime | None, now: datetime) -> bool:
    """Whether some process holds a name's order lease at ``now`` (an expired one is free)."""
    return owner is not None and until is not None and until > now


HoldReason = Literal["backoff", "parked"]


def hold_reason(state: Backoff | None, now: datetime) -> HoldReason | None:
    """Why a name may not be ordered on its own now (a handshake, a scheduled retry), or None.

    An explicit order (``autocert issue``) ignores both.
    """
    if state is None:
        return None
    if state.next_attempt_at is not None and state.next_attempt_at > now:
        return "backoff"
    if is_parked(state):
        return "parked"
    return None


#: An http-01 answer older than this belongs to an order that ended without withdrawing it
#: (the process was killed): a CA validates within minutes of being asked, and an order's
#: lease lasts five. Such answers are swept.
STALE_CHALLENGE_AGE = timedelta(hours=1)


#: The profile an IP address certificate is ordered under, when the CA offers it and the user
#: chose none: Let's Encrypt issues certificates for addresses only with it (160 hours).
ADDRESS_PROFILE = "shortlived"


def order_profile(configured: str | None, names: Collection[str], offered: Collection[str]) -> str | None:
    """The ACME profile to order ``names`` under: the user's (or the one the certificate
    being renewed had), else :data:`ADDRESS_PROFILE` for an address where the CA offers it,
    else None (the CA's default)."""
    if configured is not None:
        return configured
    if ADDRESS_PROFILE in offered and any(is_address(name) for name in names):
        return ADDRESS_PROFILE
    return None


# ---------------------------------------------------------------------------------------------
# Which CA: when an order moves on to the next one

#: ACME problems that say the name itself failed validation (its DNS, its server, its CAA
#: records, a name the CA's policy refuses). Another CA would fail it the same way, and each
#: try burns a failed-validation limit there, so such an order is not placed at the next CA.
NAME_PROBLEMS = frozenset(
    ACME_ERROR_PREFIX + problem
    for problem in ("unauthorized", "dns", "connection", "incorrectResponse", "tls", "caa", "rejectedIdentifier")
)


def tries_next_ca(problem_type: str | None) -> bool:
    """Whether an order that could not be completed at one CA is placed at the next at once.

    ``problem_type`` is the CA's ACME problem, or None when there was none to read: the CA
    was unreachable or timed out, answered 5xx or something unusable. Everything but the
    name's own fault (:data:`NAME_PROBLEMS`) is the CA's trouble, and another CA may well
    issue: ``serverInternal``, ``rateLimited`` (limits are per CA), ``badNonce`` retried to
    exhaustion, an unusable directory, a profile or challenge type it does not offer.
    """
    return problem_type not in NAME_PROBLEMS


# ---------------------------------------------------------------------------------------------
# Budgets: limits kept below the CA's, so the account never gets locked out


@dataclass(frozen=True)
class RateBudget:
    """Limits kept per account and per name, below the CA's own.

    Defaults sit under Let's Encrypt's: 300 new orders per account per 3 hours, and 5 failed
    validations per name per hour (we stop at 4 so a manual retry still fits).
    ``failures_per_name`` None keeps no per-name limit of our own.
    """

    orders: int = 270
    order_window: timedelta = timedelta(hours=3)
    failures_per_name: int | None = 4
    failure_window: timedelta = timedelta(hours=1)


#: Where Let's Encrypt's published limits apply (production and staging).
LETS_ENCRYPT_HOSTS = frozenset({"acme-v02.api.letsencrypt.org", "acme-staging-v02.api.letsencrypt.org"})


def default_budget(directory: str) -> RateBudget | None:
    """The budget kept when none is configured: Let's Encrypt's limits for its directories;
    for any other CA none, and the CA's own ``rateLimited`` answers decide."""
    return RateBudget() if urlsplit(directory).hostname in LETS_ENCRYPT_HOSTS else None


def budget_with_order_limit(directory: str, limit: tuple[int, timedelta] | None) -> RateBudget | None:
    """The budget for an ``--order-limit``: its orders per window, with the per-name failure
    limit of Let's Encrypt kept for its directories; None (``none``) keeps no budget."""
    if limit is None:
        return None
    base = default_budget(directory) or RateBudget(failures_per_name=None)
    return replace(base, orders=limit[0], order_window=limit[1])


def budget_for(issuer: Issuer, budget: RateBudget | None | Literal["auto"] = "auto") -> RateBudget | None:
    """The budget kept at one CA: ``budget`` when one is set for every CA (None: none), else
    the issuer's own ``order_limit`` (see :func:`budget_with_order_limit`), whose ``"auto"`` is
    the default for its directory. Each CA's budget is counted apart, so a primary over its
    budget holds no order back at the next CA."""
    if budget != "auto":
        return budget
    if issuer.order_limit == "auto":
        return default_budget(issuer.directory)
    return budget_with_order_limit(issuer.directory, issuer.order_limit)


def exempt_from_budgets(*, renewing: bool, sends_replaces: bool, ca_has_renewal_info: bool) -> bool:
    """Renewals that name the certificate they replace (ARI's ``replaces``) at a CA publishing
    renewal information are exempt from its limits (Let's Encrypt exempts them from all of
    them): they are neither counted nor held, so short-lived certificates never expire while
    new names use the budget."""
    return renewing and sends_replaces and ca_has_renewal_info


#: How soon an order held back by the account-wide budget is looked at again.
BUDGET_RECHECK = timedelta(minutes=5)


def failure_budget_hold(budget: RateBudget, failures: Sequence[datetime]) -> tuple[datetime, str] | None:
    """Until when, and why, a name must wait given the start times of its failed attempts
    within ``budget.failure_window`` (oldest first); None when it may be ordered."""
    limit = budget.failures_per_name
    if limit is None or len(failures) < limit:
        return None
    resume = failures[len(failures) - limit] + budget.failure_window
    return resume, f"{len(failures)} failed validations in the last hour"


def order_budget_hold(budget: RateBudget, orders: int, now: datetime, *, reserved: int = 0) -> tuple[datetime, str] | None:
    """Until when, and why, an order must wait given the account's counted ``orders`` within
    ``budget.order_window``; None when there is room.

    ``reserved`` orders are kept for renewals due within the window: when the budget binds,
    renewals go before new names (a new name passes ``reserved``, a renewal passes 0).
    """
    if orders + reserved < budget.orders:
        return None
    kept = f", {reserved} kept for renewals due" if reserved else ""
    return now + BUDGET_RECHECK, f"{orders} orders in the last {budget.order_window}{kept}"


def account_budget_hold(
    budget: RateBudget,
    *,
    renewing: bool,
    exempt: bool,
    ca_has_renewal_info: bool,
    counted_orders: int,
    renewals_due: int,
    now: datetime,
) -> tuple[datetime, str] | None:
    """The account-wide order budget for one order: exempt renewals pass; where renewals count
    (a CA without renewal information), a new name leaves room for the ``renewals_due``
    within the window, so that when the budget binds renewals go before new names.
    ``counted_orders`` are the orders in the window that count (new names only, at a CA with
    renewal information)."""
    if exempt:
        return None
    reserved = 0 if renewing or ca_has_renewal_info else renewals_due
    return order_budget_hold(budget, counted_orders, now, reserved=reserved)


def rate_limit_hold(detail: str, retry_after: float | None, now: datetime) -> tuple[datetime, bool] | None:
    """What a CA's ``rateLimited`` answer holds: until when (its ``Retry-After``), and whether
    the whole account (a limit on the account's orders) or only this name. None without a
    ``Retry-After``: the name's usual backoff then applies."""
    if not retry_after:
        return None
    return now + timedelta(seconds=retry_after), "account" in detail.lower()


def next_attempt_after_rate_limit(backoff: datetime | None, until: datetime) -> datetime | None:
    """When a name the CA answered ``rateLimited`` may be tried again: at ``until`` (its
    ``Retry-After``), in place of the name's growing backoff. The limit says nothing about the
    name (a budget ran out) and the CA knows when it resets: waiting longer only delays a name
    that did nothing wrong, trying sooner is refused. A parked name (``backoff`` None) stays parked."""
    return None if backoff is None else until


# ---------------------------------------------------------------------------------------------
# When to renew

#: Renewals are spread over a window before the nominal time, so certificates issued together
#: (a migration, a batch of tenants) do not all renew in the same minute.
JITTER_FRACTION = 0.05
JITTER_CAP = timedelta(hours=12)


def renewal_time(not_before: datetime, not_after: datetime, *, jitter: float | None = None) -> datetime:
    """When to renew: a third of the lifetime before expiry, half for lifetimes under 10 days
    (so 6-day certificates keep days of slack), minus a random share of a small window.

    ``jitter`` in [0, 1] picks the point in that window (None: random); tests pass it.
    """
    lifetime = not_after - not_before
    remaining = lifetime / 2 if lifetime < timedelta(days=10) else lifetime / 3
    window = min(lifetime * JITTER_FRACTION, JITTER_CAP)
    share = random.random() if jitter is None else min(max(jitter, 0.0), 1.0)
    return not_after - remaining - window * share


def needs_order(not_after: datetime | None, renew_at: datetime | None, now: datetime) -> bool:
    """Whether a name with this current certificate (None: none) should be ordered again when
    asked without force: only when it has none, or its renewal time has come."""
    return not_after is None or renew_at is None or not_after <= now or renew_at <= now


#: Let's Encrypt asks clients to check renewal information (ARI) about twice a day.
ARI_CHECK_INTERVAL = timedelta(hours=12)
#: Bounds on a CA's Retry-After for renewal information, so a bad value neither hammers
#: the CA nor lets a revoked certificate's new window go unseen for days.
ARI_MIN_RECHECK = timedelta(minutes=30)
ARI_MAX_RECHECK = timedelta(days=1)
#: When the CA could not be asked, ask again after this long.
ARI_ERROR_RETRY = timedelta(hours=1)


def time_in_window(start: datetime, end: datetime, now: datetime, rng: random.Random) -> datetime:
    """A uniformly random time in the CA's window, or now if the window has passed (RFC 9773 §4.2)."""
    if end <= now:
        return now
    start = max(start, now)
    return start + (end - start) * rng.random()


def ari_next_check(now: datetime, retry_after: float | None, rng: random.Random) -> datetime:
    """When to fetch a certificate's renewal information again: the CA's Retry-After, else
    about :data:`ARI_CHECK_INTERVAL` (randomised by 10 %), bounded either way."""
    wait = timedelta(seconds=retry_after) if retry_after else ARI_CHECK_INTERVAL * rng.uniform(0.9, 1.1)
    return now + min(max(wait, ARI_MIN_RECHECK), ARI_MAX_RECHECK)


# ---------------------------------------------------------------------------------------------
# What state a name is in, and when to warn

#: Every state a name can be in, as ``status`` and the status page show it.
STATES = ("pending", "issuing", "valid", "renewing", "failed", "expired", "disallowed")

#: Once the renewal time has passed, how long renewal gets before ``expiring`` is raised: at most
#: an hour, less for short lifetimes, so a renewal that is merely in progress does not alarm.
MAX_EXPIRY_GRACE = timedelta(hours=1)


def name_status(*, allowed: bool, not_after: datetime | None, ordering: bool, failures: int, now: datetime) -> str:
    """One of :data:`STATES` for a name, from whether it is allowed, its current certificate's
    expiry (None: none), whether an order is under way, and its consecutive failures."""
    if not allowed:
        return "disallowed"
    if not_after is not None and not_after <= now:
        return "renewing" if ordering else "expired"
    if not_after is not None:
        return "renewing" if ordering else "valid"
    if ordering:
        return "issuing"
    return "failed" if failures > 0 else "pending"


def is_expiring(not_before: datetime, not_after: datetime, renew_at: datetime | None, now: datetime) -> bool:
    """Less than a third of the lifetime left and the renewal that was due has not happened."""
    lifetime = not_after - not_before
    if now >= not_after or not_after - now >= lifetime / 3:
        return False
    grace = min(MAX_EXPIRY_GRACE, lifetime / 50)
    return renew_at is None or now >= renew_at + grace


#: Under this much validity left a certificate is flagged as expiring soon, whatever its lifetime.
#: The status index stores when each certificate crosses this line (``names.soon_at``, from
#: :func:`expires_soon_from`): a change here needs a migration that rebuilds that index.
EXPIRING_SOON = timedelta(days=7)

#: The smallest step of a stored time: ``now > t`` is ``now >= t + RESOLUTION``.
RESOLUTION = timedelta(microseconds=1)


def expires_soon(not_before: datetime, not_after: datetime, renew_at: datetime | None, now: datetime) -> bool:
    """What the status page flags as expiring soon: not expired yet, and less than
    :data:`EXPIRING_SOON` left or :func:`is_expiring`."""
    return now < not_after and (not_after - now < EXPIRING_SOON or is_expiring(not_before, not_after, renew_at, now))


def expires_soon_from(not_before: datetime, not_after: datetime, renew_at: datetime | None) -> datetime:
    """The first instant at which :func:`expires_soon` holds; it then holds until ``not_after``
    (both of its reasons, once true, stay true as time passes). So ``expires_soon(..., now)``
    is ``expires_soon_from(...) <= now < not_after``: a comparison the database can index."""
    lifetime = not_after - not_before
    # is_expiring: not_after - now < lifetime / 3, and now >= renew_at + grace.
    expiring = not_after - lifetime / 3 + RESOLUTION
    if renew_at is not None:
        expiring = max(expiring, renew_at + min(MAX_EXPIRY_GRACE, lifetime / 50))
    return min(not_after - EXPIRING_SOON + RESOLUTION, expiring)


#: Most urgent first: the order of the status page's default sort and of its ``state`` sort.
SEVERITY = {"failed": 0, "expired": 1, "renewing": 2, "issuing": 3, "pending": 4, "valid": 5, "disallowed": 6}


def needs_attention(state: str, soon: bool) -> bool:
    """Whether a person should look: failed, expired, or flagged by :func:`expires_soon`."""
    return state in ("failed", "expired") or soon
