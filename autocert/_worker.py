"""The issuance worker: one order per name at a time, a concurrency limit, every attempt recorded.

The first caller for a name starts the work and every later caller awaits the same task
(Go's autocert certState pattern). Across processes the database lease does the same job:
a second instance that finds the name leased waits for the holder's result instead of
ordering again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal, NoReturn

import aiohttp

from ._ca import CaAccount
from ._crypto import ari_certificate_id, generate_private_key, tls_alpn_challenge_certificate
from ._errors import PROBLEM_ACCOUNT_DOES_NOT_EXIST, PROBLEM_ALREADY_REVOKED, PROBLEM_RATE_LIMITED, AcmeError, AutocertError, IssuanceError
from ._events import Event, EventBus
from ._issuers import Issuer
from ._policy import (
    PARK_AFTER,
    RateBudget,
    account_budget_hold,
    budget_for,
    failure_budget_hold,
    exempt_from_budgets,
    lease_held,
    next_attempt_after_failure,
    next_attempt_after_rate_limit,
    rate_limit_hold,
    renewal_time,
    tries_next_ca,
)
from ._store import StoredCertificate, Store
from ._timefmt import isoformat, utcnow
from ._tls import ACME_TLS_ALPN, build_context

if TYPE_CHECKING:
    from ._acme import AcmeClient, RenewalInfo
    from ._dns import Dns01, DnsSettings

log = logging.getLogger("autocert.worker")

#: How long an order may hold its lease before another process may take the name over: how
#: long a name waits when the process ordering it dies on another host (one on the same host
#: is noticed at once). ``AUTOCERT_LEASE_SECONDS`` changes it; it must outlast the slowest order.
LEASE_SECONDS = float(os.environ.get("AUTOCERT_LEASE_SECONDS") or 300.0)


def new_owner_id() -> str:
    """Identifies this process in leases, so an operator can tell who holds a name."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def renewal_replaces(previous: StoredCertificate | None) -> str | None:
    """The ARI id a renewal order names in ``replaces`` (the client drops it for CAs without ARI)."""
    if previous is None:
        return None
    try:
        return ari_certificate_id(previous.chain_pem)
    except ValueError:
        return None


def owner_is_dead(owner: str) -> bool:
    """Whether a lease owner id names a process on this host that has exited."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def answerable_types(challenge_types: Sequence[str], dns: DnsSettings | None) -> tuple[str, ...]:
    """The challenge types to answer, in order: those asked for, and dns-01 last whenever a
    DNS provider is configured (wildcard names have no other, and the CA offers plain names
    http-01 or tls-alpn-01 first). dns-01 asked for without a provider is refused."""
    if "dns-01" in challenge_types and dns is None:
        raise ValueError("dns-01 needs a DNS provider (--dns) to publish the TXT records with")
    return tuple(challenge_types) + (("dns-01",) if dns is not None and "dns-01" not in challenge_types else ())


class _AccountBudget:
    """The account's order budget for one order, decided from the orders the database counts
    in the transaction that starts the attempt (:meth:`Store.start_attempt_within`)."""

    def __init__(self, budget: RateBudget, *, now: datetime, renewing: bool, ca_has_renewal_info: bool, renewals_due: int) -> None:
        self._budget = budget
        self._now = now
        self._renewing = renewing
        self._ca_has_renewal_info = ca_has_renewal_info
        self._renewals_due = renewals_due
        self.since = now - budget.order_window
        self.new_names_only = ca_has_renewal_info
        #: Until when and why the order is held, once :meth:`room` said there is none.
        self.hold: tuple[datetime, str] | None = None

    def room(self, counted_orders: int) -> bool:
        self.hold = account_budget_hold(self._budget, renewing=self._renewing, exempt=False,
                                        ca_has_renewal_info=self._ca_has_renewal_info, counted_orders=counted_orders,
                                        renewals_due=self._renewals_due, now=self._now)
        return self.hold is None


class ChallengeBook:
    """Challenge answers for the current orders, reachable by every listener of every instance
    and every worker of a ``serve --workers``.

    Answers go to the database, so that whichever instance sharing it the CA reaches (or a
    ``serve`` already holding the port while the CLI orders) can give them: http-01 tokens
    are served from there as they are, and tls-alpn-01 key authorizations are turned into a
    challenge certificate by the instance the validation reaches.
    """

    #: At most this many tls-alpn-01 contexts are kept; beyond it the oldest are dropped.
    MAX_CONTEXTS = 1024

    def __init__(self, store: Store, challenge_types: Sequence[str], dns: DnsSettings | None = None) -> None:
        self._store = store
        self.challenge_types: Sequence[str] = tuple(challenge_types)
        #: dns-01 answers, published through the configured provider (None: dns-01 not offered).
        self.dns: Dns01 | None = None
        if dns is not None:
            from ._dns import Dns01  # dnspython is loaded only when dns-01 is configured

            self.dns = Dns01(dns, store, new_owner_id())
        #: Key authorizations of the tls-alpn-01 challenges this process presented, by name.
        self._own: dict[str, str] = {}
        #: The tls-alpn-01 context built for each name, with the key authorization it carries.
        self._contexts: dict[str, tuple[str, ssl.SSLContext]] = {}

    def cached_context(self, name: str) -> ssl.SSLContext | None:
        """The tls-alpn-01 context for ``name`` if this process presented its challenge and the
        context is built (no waiting); a challenge another instance presented is read from the
        database by :meth:`context`."""
        own = self._own.get(name)
        built = self._contexts.get(name)
        if own is None or built is None or built[0] != own:
            return None
        return built[1]

    async def context(self, name: str) -> ssl.SSLContext | None:
        """The tls-alpn-01 context for ``name``, served only to ``acme-tls/1`` clients while
        its challenge is pending (presented here or by any instance on the database); built
        off the event loop."""
        key_authorization = self._own.get(name) or await self._store.tls_alpn_challenge(name)
        if key_authorization is None:
            self._contexts.pop(name, None)
            return None
        built = self._contexts.get(name)
        if built is not None and built[0] == key_authorization:
            return built[1]
        context = await asyncio.to_thread(_tls_alpn_context, name, key_authorization)
        self._contexts.pop(name, None)
        self._contexts[name] = (key_authorization, context)
        while len(self._contexts) > self.MAX_CONTEXTS:
            del self._contexts[next(iter(self._contexts))]
        return context

    async def present(self, name: str, challenge_type: str, token: str, key_authorization: str) -> None:
        if challenge_type == "dns-01" and self.dns is not None:
            await self.dns.present(name, token, key_authorization)
            return
        if challenge_type not in ("http-01", "tls-alpn-01"):
            raise AcmeError(f"challenge type {challenge_type} is not supported")
        await self._store.put_challenge(token, name, key_authorization, challenge_type)
        if challenge_type == "tls-alpn-01":
            self._own[name] = key_authorization
            await self.context(name)  # ready before the CA connects

    async def cleanup(self, name: str, challenge_type: str, token: str) -> None:
        if challenge_type == "dns-01":
            if self.dns is not None:
                await self.dns.cleanup(token)
            return
        if challenge_type == "tls-alpn-01":
            self._own.pop(name, None)
            self._contexts.pop(name, None)
        await self._store.delete_challenge(token)

    async def clear_dns_leftovers(self) -> None:
        """Clear dns-01 records a process that died mid-order left published: its owner is
        gone from this host, or it is older than any order may run (a lease's length twice)."""
        if self.dns is None:
            return
        stale = utcnow() - timedelta(seconds=2 * LEASE_SECONDS)
        cleared = await self.dns.clear_leftovers(lambda record: owner_is_dead(record.owner) or record.created_at < stale)
        if cleared:
            log.info("cleared %d dns-01 record(s) left by a process stopped mid-order", cleared)


def _tls_alpn_context(name: str, key_authorization: str) -> ssl.SSLContext:
    cert_pem, key_pem = tls_alpn_challenge_certificate(name, key_authorization)
    return build_context(cert_pem, key_pem, (ACME_TLS_ALPN,))


class _MovedOn(Exception):
    """An order could not be completed at one CA for the CA's reasons: the next CA gets it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Held(Exception):
    """A budget stops an order at one CA before it is placed: until when, why, and whether it
    holds the whole account there (then the next CA is tried) or only this name."""

    def __init__(self, until: datetime, why: str, *, whole_account: bool) -> None:
        super().__init__(why)
        self.until, self.why, self.whole_account = until, why, whole_account


class Worker:
    """Orders certificates from a list of CAs, the first of them the primary, and stores them.

    Every order starts at the primary, renewals too (whichever CA issued last time), and moves
    to the next CA at once when the CA is why it could not be completed: unreachable, 5xx,
    rate-limited, over the budget kept there (see :func:`autocert._policy.tries_next_ca`).
    A failure that is the name's own is not tried elsewhere.
    """

    def __init__(
        self,
        store: Store,
        *,
        issuers: Sequence[Issuer],
        challenges: ChallengeBook,
        agree_tos: bool = False,
        concurrency: int = 4,
        on_issued: Callable[[StoredCertificate], Awaitable[None] | None] | None = None,
        events: EventBus | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
        budget: RateBudget | None | Literal["auto"] = "auto",
    ) -> None:
        self._store = store
        #: Our account at each CA, in the order they are tried.
        self.cas = tuple(
            CaAccount(store, issuer, agree_tos=agree_tos, budget=budget_for(issuer, budget), trace_configs=trace_configs)
            for issuer in issuers
        )
        if not self.cas:
            raise ValueError("a worker needs at least one CA to order from")
        self._challenges = challenges
        self._limit = asyncio.Semaphore(concurrency)
        self._on_issued = on_issued
        self._events = events or EventBus()
        self.owner = new_owner_id()
        self._in_flight: dict[str, asyncio.Task[StoredCertificate]] = {}

    @property
    def directory(self) -> str:
        """The primary CA's directory."""
        return self.cas[0].directory

    @directory.setter
    def directory(self, directory: str) -> None:
        """Point the primary at another directory before its first order; its options stay."""
        primary = self.cas[0]
        moved = CaAccount(self._store, replace(primary.issuer, directory=directory), agree_tos=primary.agree_tos,
                          budget=primary.budget, trace_configs=primary.trace_configs)
        self.cas = (moved, *self.cas[1:])

    def ca_for(self, directory: str) -> CaAccount | None:
        """The configured CA with this directory (e.g. the one that issued a certificate)."""
        return next((ca for ca in self.cas if ca.directory == directory), None)

    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    def request(self, name: str) -> asyncio.Task[StoredCertificate]:
        """Start issuing ``name`` unless it is already under way; returns the shared task."""
        task = self._in_flight.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._issue_once(name), name=f"autocert-issue-{name}")
            self._in_flight[name] = task
            task.add_done_callback(lambda done, name=name: self._forget(name, done))
        return task

    async def issue(self, name: str) -> StoredCertificate:
        """Issue ``name`` (or join the issuance already running) and return the stored certificate."""
        return await asyncio.shield(self.request(name))

    def _forget(self, name: str, task: asyncio.Task[StoredCertificate]) -> None:
        if self._in_flight.get(name) is task:
            del self._in_flight[name]
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here so an unawaited background failure is not reported as lost.
            log.debug("issuance task for %s ended with %r", name, task.exception())

    async def close(self) -> None:
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ca in self.cas:
            await ca.close()

    async def _issue_once(self, name: str) -> StoredCertificate:
        async with self._limit:
            while not await self._store.try_lease(name, self.owner, LEASE_SECONDS) and not await self._take_over_dead_lease(name):
                certificate = await self._await_other_owner(name)
                if certificate is not None:
                    return certificate
                # The other process's lease ran out without a result: it died; order ourselves.
            try:
                previous = await self._store.current_certificate(name)
                return await self._order_at_each_ca(name, previous)
            finally:
                await self._store.release_lease(name, self.owner)

    async def _order_at_each_ca(self, name: str, previous: StoredCertificate | None) -> StoredCertificate:
        """Try the CAs in order until one issues, one fails for the name's own reasons, or the
        last one fails. A CA whose budget holds the whole account is passed over without
        contacting it; when every CA holds the order, it waits for the first to free up."""
        held: tuple[datetime, str] | None = None
        for index, ca in enumerate(self.cas):
            following = self.cas[index + 1] if index + 1 < len(self.cas) else None
            if index:
                await self._store.try_lease(name, self.owner, LEASE_SECONDS)  # each CA gets a whole lease
            try:
                budget = await self._check_budget(ca, name, previous)
                return await self._order(ca, name, previous, budget, last=following is None)
            except _Held as hold:
                held = min(held or (hold.until, hold.why), (hold.until, hold.why))
                if following is None or not hold.whole_account:
                    await self._hold_back(name, *held)
                log.warning("CA %s holds new orders until %s (%s), trying %s", ca.label, hold.until.isoformat(), hold.why,
                            following.label)
            except _MovedOn as moved:
                assert following is not None
                log.warning("CA %s failed (%s), trying %s", ca.label, moved.reason, following.label)
        raise AssertionError("the last CA either issues or raises")

    async def _order(self, ca: CaAccount, name: str, previous: StoredCertificate | None, budget: _AccountBudget | None, *,
                     last: bool) -> StoredCertificate:
        renewing = previous is not None
        # Only the CA that issued the certificate knows it: a renewal there keeps its profile and
        # names it in ARI's ``replaces``; another CA gets its own profile and a plain order.
        at_issuer = previous is not None and previous.directory == ca.directory
        profile = previous.profile if at_issuer and previous.profile else ca.issuer.profile  # type: ignore[union-attr]
        replaces = renewal_replaces(previous) if at_issuer else None
        if budget is None:
            attempt_id = await self._store.start_attempt(name, ca.directory)
        else:
            # Counted in the transaction that starts the attempt: instances sharing the database
            # keep one budget per CA between them.
            started_id = await self._store.start_attempt_within(name, ca.directory, since=budget.since,
                                                                 new_names_only=budget.new_names_only, room=budget.room)
            if started_id is None:
                assert budget.hold is not None
                raise _Held(*budget.hold, whole_account=True)
            attempt_id = started_id
        started = asyncio.get_running_loop().time()
        log.info("issuing %s from %s", name, ca.directory)
        client: AcmeClient | None = None
        try:
            client = await ca.acquire()
            pending = await self._store.pending_order(name, ca.directory)
            key_pem = pending.key_pem if pending else await asyncio.to_thread(generate_private_key)

            async def remember(order_url: str) -> None:
                # Key and order are stored before any challenge or finalisation.
                await self._store.save_pending_order(name, ca.directory, order_url, key_pem)

            try:
                issued = await client.issue([name], key_pem, self._challenges, profile=profile, replaces=replaces,
                                            resume_url=pending.order_url if pending else None, on_order=remember)
            except AcmeError as exc:
                if exc.problem_type != PROBLEM_ACCOUNT_DOES_NOT_EXIST:
                    raise
                log.warning("the CA no longer knows our account; registering the same key again")
                stale, client = client, None
                await ca.release(stale)
                client = await ca.acquire(stale=stale)
                issued = await client.issue([name], key_pem, self._challenges, profile=profile, replaces=replaces,
                                            on_order=remember)
        except (AutocertError, OSError, asyncio.TimeoutError) as exc:
            error = self._as_issuance_error(name, exc)
            if not last and tries_next_ca(error.problem_type):
                await self._store.finish_attempt(attempt_id, "failover", error.problem_type, error.detail)
                self._rate_limit_hold(ca, name, exc)
                raise _MovedOn(_problem_text(error)) from exc
            await self._record_failure(ca, name, attempt_id, exc, renewing=renewing)
            raise error from exc
        except asyncio.CancelledError:
            await asyncio.shield(self._store.finish_attempt(attempt_id, "failed", None, "interrupted"))
            raise
        finally:
            if client is not None:
                await ca.release(client)
        info = issued.info
        certificate = await self._store.save_certificate(
            name=name,
            names=list(info.names) or [name],
            key_pem=key_pem,
            chain_pem=issued.chain_pem,
            serial=info.serial,
            issuer=info.issuer,
            not_before=info.not_before,
            not_after=info.not_after,
            renew_at=renewal_time(info.not_before, info.not_after),
            directory=ca.directory,
            order_url=issued.order_url,
            profile=issued.profile,
        )
        await self._store.finish_attempt(attempt_id, "valid")
        elapsed = asyncio.get_running_loop().time() - started
        log.info("issued %s serial %s valid until %s (%.0f ms)", name, info.serial, info.not_after.isoformat(), elapsed * 1000)
        if self._on_issued is not None:
            result = self._on_issued(certificate)
            if result is not None:
                await result
        self._events.emit(Event("renewed" if renewing else "issued", name, "valid", previous="renewing" if renewing else "issuing"))
        return certificate

    async def renewal_info(self, certificate: StoredCertificate) -> RenewalInfo | None:
        """The renewal window the issuing CA gives ``certificate``, or None if that CA
        publishes none (or is no longer among the configured CAs)."""
        ca = self.ca_for(certificate.directory)
        if ca is None or not await ca.has_renewal_info():
            return None
        client = await ca.acquire()
        try:
            try:
                certificate_id = ari_certificate_id(certificate.chain_pem)
            except ValueError:
                return None
            return await client.renewal_info(certificate_id)
        finally:
            await ca.release(client)

    async def revoke(self, certificate: StoredCertificate, reason: int = 0) -> None:
        """Revoke at the CA that issued it, then record it so no server serves the certificate again."""
        ca = self.ca_for(certificate.directory)
        if ca is None:
            raise IssuanceError(certificate.name, f"was issued by {certificate.directory}, which is not among the configured "
                                                  "ACME directories: add it (--directory) to revoke there")
        client = await ca.acquire()
        try:
            await client.revoke(certificate.chain_pem, reason)
        except AcmeError as exc:
            if exc.problem_type != PROBLEM_ALREADY_REVOKED:
                raise
        finally:
            await ca.release(client)
        await self._store.mark_revoked(certificate.id)
        log.info("revoked %s serial %s", certificate.name, certificate.serial)

    @staticmethod
    def _as_issuance_error(name: str, exc: BaseException) -> IssuanceError:
        if isinstance(exc, AcmeError):
            return IssuanceError(name, exc.detail, problem_type=exc.problem_type)
        return IssuanceError(name, str(exc) or type(exc).__name__)

    def _rate_limit_hold(self, ca: CaAccount, name: str, exc: BaseException) -> datetime | None:
        """What a CA's ``rateLimited`` answer holds: the whole account at that CA (remembered
        there), or the name until the returned time. None when it was no such answer."""
        if not isinstance(exc, AcmeError) or exc.problem_type != PROBLEM_RATE_LIMITED:
            return None
        limited = rate_limit_hold(exc.detail, exc.retry_after, utcnow())
        if limited is None:
            return None
        until, whole_account = limited
        if whole_account:
            ca.hold(until)
        log.warning("CA %s rate-limited %s until %s", ca.label, "the account" if whole_account else name, until.isoformat())
        return until

    async def _record_failure(self, ca: CaAccount, name: str, attempt_id: int, exc: BaseException, *, renewing: bool = False) -> None:
        error = self._as_issuance_error(name, exc)
        await self._store.finish_attempt(attempt_id, "failed", error.problem_type, error.detail)
        state = await self._store.name_state(name)
        failures = state.failures if state is not None else 1
        now = utcnow()
        recent = len(await self._store.failures_since(name, now - PARK_AFTER))
        next_attempt = next_attempt_after_failure(now, failures, recent)
        until = self._rate_limit_hold(ca, name, exc)
        if until is not None:
            next_attempt = next_attempt_after_rate_limit(next_attempt, until)
        await self._store.set_next_attempt(name, next_attempt)
        if next_attempt is None:
            # A dead domain: no more attempts of our own; `autocert issue` or `renew --force` still tries.
            log.error("%s has failed for over %d days; parked: no more automatic attempts", name, PARK_AFTER.days)
        log.warning("issuing %s failed: %s", name, error)
        self._events.emit(Event("failed", name, "failed", error=_problem_text(error), previous="renewing" if renewing else "issuing"))

    async def _check_budget(self, ca: CaAccount, name: str, previous: StoredCertificate | None) -> _AccountBudget | None:
        """Whether an order at ``ca`` must be held back (without contacting it) because it
        would break a rate limit: the budget kept for that CA, and an account-wide limit the CA
        itself answered with (:class:`_Held` raised). Renewals the CA exempts are neither
        counted nor held; when the budget binds, renewals go before new names. The order budget
        at that CA is returned rather than checked here: it is counted in the transaction that
        starts the attempt."""
        budget, held_until = ca.budget, ca.held_until
        now = utcnow()
        if budget is None and (held_until is None or held_until <= now):
            return None
        renewing = previous is not None
        try:
            ca_has_renewal_info = await ca.has_renewal_info()
        except (AutocertError, OSError, asyncio.TimeoutError) as exc:
            # Unknown for now: count every order, the safe side of the budget; the order itself
            # meets the same trouble and records it.
            log.debug("could not read the directory of CA %s: %s", ca.label, exc)
            ca_has_renewal_info = False
        sends_replaces = previous is not None and previous.directory == ca.directory and renewal_replaces(previous) is not None
        exempt = exempt_from_budgets(renewing=renewing, sends_replaces=sends_replaces, ca_has_renewal_info=ca_has_renewal_info)
        if held_until is not None and held_until > now and not exempt:
            raise _Held(held_until, "the CA rate-limited this account", whole_account=True)
        if budget is None:
            return None
        hold = failure_budget_hold(budget, await self._store.failures_since(name, now - budget.failure_window, directory=ca.directory))
        if hold is not None:
            raise _Held(*hold, whole_account=False)
        if exempt:
            return None
        counts_renewals = not renewing and not ca_has_renewal_info
        due = await self._store.count_renewals_due(now + budget.order_window) if counts_renewals else 0
        return _AccountBudget(budget, now=now, renewing=renewing, ca_has_renewal_info=ca_has_renewal_info, renewals_due=due)

    async def _hold_back(self, name: str, until: datetime, why: str) -> NoReturn:
        state = await self._store.name_state(name)
        reason = f"held back until {isoformat(until)} to stay under the CA's rate limits: {why}"
        if state is None or state.next_attempt_at is None or state.next_attempt_at < until:
            await self._store.set_next_attempt(name, until, reason=reason)
        log.warning("holding back the order for %s until %s: %s (CA rate limits)", name, until.isoformat(), why)
        raise IssuanceError(name, reason)

    async def _take_over_dead_lease(self, name: str) -> bool:
        """Reclaim a lease whose holder was a process on this host that no longer exists
        (killed mid-order), instead of waiting for the lease to time out."""
        state = await self._store.name_state(name)
        holder = state.lease_owner if state is not None else None
        if holder is None or not owner_is_dead(holder):
            return False
        log.warning("%s was leased by %s, which is gone; taking the order over", name, holder)
        await self._store.release_lease(name, holder)
        return await self._store.try_lease(name, self.owner, LEASE_SECONDS)

    async def _await_other_owner(self, name: str) -> StoredCertificate | None:
        """Another process holds the lease: wait for its outcome rather than ordering twice.

        Returns its certificate, raises with its error if it released the lease after failing,
        and returns None if the lease ran out unreleased (the holder died): the caller orders.
        """
        log.info("%s is being ordered by another process; waiting for it", name)
        delay = 0.05
        while True:
            state = await self._store.name_state(name)
            if state is None or not lease_held(state.lease_owner, state.lease_until, utcnow()):
                break
            if state.lease_owner is not None and owner_is_dead(state.lease_owner):
                return None  # killed mid-order on this host: the caller takes the lease over
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        certificate = await self._store.current_certificate(name)
        if certificate is not None and certificate.not_after > utcnow():
            return certificate
        if state is not None and state.lease_owner is not None:
            log.warning("%s: the other process's lease ran out without a certificate; ordering here", name)
            return None
        last_error = state.last_error if state is not None else None
        raise IssuanceError(name, last_error or "the other process ended without a certificate")


def _problem_text(error: IssuanceError) -> str:
    """``"<problem type>: <detail>"``, as the last error and the log show a CA's answer."""
    return f"{error.problem_type}: {error.detail}" if error.problem_type else error.detail
