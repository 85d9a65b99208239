"""``Manager``: the object an embedder holds. It owns the store, the context cache and the
worker, and decides on every handshake what to serve.

Both handshake paths, the ``sni_callback`` of :meth:`Manager.ssl_context` (embedded) and the
ClientHello front of ``serve``, ask :meth:`Manager.route` what to do. It never waits for I/O:
it answers from memory (the allowlist snapshot and the context cache) and leaves anything
slower to the caller's task.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from ._config import LETS_ENCRYPT_DIRECTORY, default_db_url, parse_external_account
from ._errors import AutocertError, ConfigError, IssuanceError
from ._events import EventBus, log_event
from ._issuers import Issuer, issuers_for
from ._names import is_host_name, is_pattern, normalize_entry, normalize_name
from ._policy import MAX_CAP, RateBudget, Route, budget_for, certificate_name, challenged_address, hold_reason, needs_order, unnamed_route
from ._ask import ASK_TIMEOUT, AskGate
from ._caps import PatternCaps
from ._scheduler import Scheduler
from ._status import status_report
from ._store import Store, StoredCertificate
from ._timefmt import utcnow
from ._tls import ACME_TLS_ALPN, DEFAULT_ALPN, ContextCache, build_context, install_alert_flush_fix, new_server_context
from ._watch import Watching
from ._worker import ChallengeBook, Worker, answerable_types

if TYPE_CHECKING:
    from ._dns import DnsSettings

log = logging.getLogger("autocert.manager")

_REFUSED: tuple[Route, str, None] = (Route.REFUSE, "", None)

#: The attribute the embedded ``sni_callback`` sets on a connection's SSL object: the name it
#: served the connection for, which requests on it must name (else 421).
SERVED_NAME = "autocert_served_name"

#: At most this many held-back names are remembered; beyond it the oldest are forgotten (they
#: are then looked up once more, and remembered again).
HELD_NAMES_MAX = 100_000


class Manager(Watching):
    """Automatic certificates for the names in the allowlist, served through ``ssl_context()``.

    Every parameter, with its default and what goes wrong when it is set badly:

    db:
        SQLAlchemy URL of the database, ``sqlite:///path`` or ``postgresql://...``. Default
        ``autocert.db`` under ``$AUTOCERT_HOME``. It holds every private key: keep it private,
        and set ``AUTOCERT_SECRET`` to encrypt keys at rest. Servers that should share
        certificates and leases must name the same database (PostgreSQL across hosts).
    directory:
        ACME directory URL of the CA, or several: every order starts at the first and moves
        to the next at once when the CA, not the name, is why it failed (unreachable, 5xx,
        rate-limited). Default Let's Encrypt production, whose rate limits are real: test
        against a staging or local CA first.
    issuers:
        The CAs as :class:`autocert._issuers.Issuer` settings, each with its own email,
        ca_bundle, profile and order limit, instead of ``directory`` and the options that
        apply to every CA in it. Default None.
    email:
        Contact address for the ACME account. Default none; the CA then cannot reach you.
    agree_tos:
        Accept the CA's terms of service. Default False; most CAs refuse to register an
        account without it, so every order fails until it is set.
    ca_bundle:
        PEM file trusted for the ACME server's own TLS. Default None, the system store;
        a wrong file makes every ACME request fail certificate verification.
    profile:
        ACME certificate profile, when the CA offers profiles (Let's Encrypt: ``classic``,
        ``tlsserver``, ``shortlived``). Default None, the CA's default. Short-lived profiles
        renew often: a long CA outage then leaves less slack.
    cache_size:
        How many TLS contexts stay in memory (LRU); others are rebuilt from the database on
        their next handshake. Default 10,000, about 24 KiB each. Too small and busy names are
        rebuilt (~0.65 ms each) over and over; too large and memory grows with every name seen.
    default_name:
        The name whose certificate clients without SNI get. Default None: they get alert 112.
    alpn:
        The ALPN protocols every certificate's context offers clients, in order of
        preference. Default ``("http/1.1",)``. Offer only what the application behind speaks:
        a client that picks ``h2`` from a server whose application answers HTTP/1.1 fails its
        first request. ``serve`` sets it from ``--alpn`` in pass-through mode.
    challenge_types:
        Challenge types to answer, in order of preference. Default ``("http-01",)``, which
        needs port 80 reachable by the CA; ``tls-alpn-01`` needs this process's TLS listener
        on port 443 (the embedded ``sni_callback`` does not answer it).
    poll_interval:
        Seconds between looks at the database for changes other processes made (allowlist,
        new and revoked certificates). Default 1.0. Longer delays ``disallow`` and
        ``revoke`` in this process; shorter costs one small query each time.
    concurrency:
        Orders running at once in this process. Default 4. Higher gets a burst of first
        contacts issued sooner and loads the CA harder.
    renew:
        Run the scheduler that renews certificates and retries failed names. Default True.
        Only a one-shot command (``autocert issue``) turns it off: without it nothing renews.
    budget:
        The order and failure limits kept per account and per name, below the CA's
        (:class:`autocert._policy.RateBudget`), or None for none of our own. Default
        ``"auto"``: just under Let's Encrypt's published limits for its directories, none for
        other CAs, whose own ``rateLimited`` answers (and ``Retry-After``) are honoured per
        name and per account either way. Renewals the CA exempts (ARI ``replaces``) are never
        counted or held. Raising it past the CA's own gets the account rate-limited.
    eab:
        (key id, MAC key) for External Account Binding, the MAC key base64url as the CA gave
        it, used at every CA of ``directory`` (an :class:`Issuer` carries its own). Default
        None. A CA that requires it refuses to register an account without it.
    ask:
        URL asked ``GET URL?domain=NAME`` about names not on the allowlist (Caddy's on-demand
        ``ask``): a 2xx allows the name. Default None. The ``sni_callback`` cannot wait for the
        answer: it refuses a name not yet asked and asks in the background, and the next
        handshake gets the answer (``serve`` waits for it). Answers are cached, asks merged
        and bounded (:class:`autocert._ask.AskGate`); allowed names are asked again before
        each renewal. A slow endpoint slows first contacts; a down one refuses new names.
    ask_timeout:
        Seconds an ask may take before the name is refused. Default 2.
    dns:
        How dns-01 is answered (:class:`autocert._dns.DnsSettings`: the provider publishing
        TXT records, where to check them, how long to wait). Default None: no dns-01, and
        wildcard patterns refuse to start. With it, dns-01 is added last to ``challenge_types``.
    """

    def __init__(
        self,
        db: str | None = None,
        directory: str | Sequence[str] = LETS_ENCRYPT_DIRECTORY,
        *,
        issuers: Sequence[Issuer] | None = None,
        email: str | None = None,
        agree_tos: bool = False,
        ca_bundle: str | None = None,
        profile: str | None = None,
        cache_size: int = 10_000,
        default_name: str | None = None,
        alpn: Sequence[str] = DEFAULT_ALPN,
        challenge_types: Sequence[str] = ("http-01",),
        poll_interval: float = 1.0,
        concurrency: int = 4,
        renew: bool = True,
        budget: RateBudget | Literal["auto"] | None = "auto",
        eab: tuple[str, str] | None = None,
        ask: str | None = None,
        ask_timeout: float = ASK_TIMEOUT,
        dns: DnsSettings | None = None,
    ) -> None:
        self.db_url = db or default_db_url()
        self.eab = parse_external_account(*eab) if eab is not None else None
        #: The CAs in the order they are tried; the first is the primary.
        self.issuers = tuple(issuers or issuers_for(directory, email=email, ca_bundle=ca_bundle, profile=profile, eab=self.eab))
        self.directory = self.issuers[0].directory
        self.email = email
        self.agree_tos = agree_tos
        self.ca_bundle = ca_bundle
        self.profile = profile
        self.default_name = normalize_name(default_name) if default_name else None
        self.alpn = tuple(alpn)
        self.dns = dns
        self.challenge_types = answerable_types(challenge_types, dns)
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self._budget = budget
        self.budget = budget_for(self.issuers[0], budget)  # the primary's
        self.cache = ContextCache(cache_size)
        #: The ask endpoint's gate, when there is one; a name it stops allowing stops being served.
        self.ask = AskGate(ask, timeout=ask_timeout, on_refused=self.cache.discard) if ask else None
        #: What happened to which name (issued, failed, ...), for logs, notifications, status page.
        self.events = EventBus()
        self.events.subscribe(log_event)
        #: Handshakes by outcome (served, unknown_name, pending, challenge); plain ints, read by metrics.
        self.handshakes: collections.Counter[str] = collections.Counter()
        #: aiohttp TraceConfigs given to the ACME client (request latency metrics). The client is
        #: created on the first order, so configs added before then apply.
        self.acme_trace_configs: list[Any] = []
        #: Helpers that exist once per manager and live as long as it, keyed by their class:
        #: the expiry watch and the metrics (``ExpiryMonitor.of``, ``Metrics.of``) put
        #: themselves here so every user (the server, the status pages) shares one.
        self.attachments: dict[type, Any] = {}
        self._allowed: frozenset[str] = frozenset()
        #: The allowed patterns served from one wildcard certificate each.
        self._wildcards: frozenset[str] = frozenset()
        self._allowlist_version: int | None = None
        self._store: Store | None = None
        self._worker: Worker | None = None
        self._challenges: ChallengeBook | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lookups: dict[str, asyncio.Task[ssl.SSLContext | None]] = {}
        self._caps = PatternCaps(lambda: self._loop.time())  # type: ignore[union-attr]
        #: Allowed names that may not be ordered now: (loop time the hold ends, why). Read by
        #: :meth:`route`, so retries of a held name cost what an unknown name costs. Dropped
        #: when the name gets a certificate and whenever the allowlist changes.
        self._held: dict[str, tuple[float, str]] = {}
        self._watcher: asyncio.Task[None] | None = None
        #: Set by the database's change notifications (PostgreSQL): the watch refreshes at once.
        self._changed = asyncio.Event()
        self._listener_task: asyncio.Task[None] | None = None
        self.schedules_renewals = renew
        self._scheduler: Scheduler | None = None
        self._scheduler_task: asyncio.Task[None] | None = None
        self._revocations_checked = utcnow()
        self._last_certificate_id = 0
        self._revocations_seen = 0
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database (migrating it if needed) and start watching for changes."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        store = await Store.open(self.db_url)
        try:
            await store.check_keys()  # a wrong AUTOCERT_SECRET stops the start, in one line
        except BaseException:
            await store.close()
            raise
        self._store = store
        self._challenges = ChallengeBook(self._store, self.challenge_types, self.dns)
        self._worker = Worker(self._store, issuers=self.issuers, challenges=self._challenges, agree_tos=self.agree_tos,
                              concurrency=self.concurrency, budget=self._budget, on_issued=self._install, events=self.events,
                              trace_configs=self.acme_trace_configs)
        closed = await self._store.close_abandoned_attempts()
        if closed:
            log.info("closed %d attempt(s) left running by a process that was stopped mid-order", closed)
        marks = await self._store.change_marks()
        self._allowed, self._wildcards = await self._store.allowed_entries(), await self._store.wildcard_patterns()
        if self._wildcards and self.dns is None:
            await self._store.close()
            raise ConfigError(f"{min(self._wildcards)} is a --wildcard pattern: its certificate needs dns-01; set --dns")
        await self._challenges.clear_dns_leftovers()
        self._allowlist_version = marks.allowlist_version
        self._last_certificate_id = marks.latest_certificate_id
        self._revocations_seen = marks.revocations
        self._started = True
        if self.default_name:
            await self.context_for(self.default_name, wait=0)
        self._watcher = self._loop.create_task(self._watch(), name="autocert-watch")
        listener = self._store.change_listener(self._changed.set)
        if listener is not None:
            self._listener_task = self._loop.create_task(listener.run(), name="autocert-listen")
        self._revocations_checked = utcnow()
        if self.schedules_renewals:
            self._scheduler = Scheduler(self._store, self._worker, is_allowed=self.is_allowed,
                                        recheck=None if self.ask is None else lambda name: self.may_serve(name, fresh=True))
            self._scheduler_task = self._loop.create_task(self._scheduler.run(), name="autocert-scheduler")

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        tasks = [t for t in [self._watcher, self._listener_task, self._scheduler_task, *self._lookups.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._worker is not None:
            await self._worker.close()
        if self.ask is not None:
            await self.ask.close()
        if self._store is not None:
            await self._store.close()
        self._store = self._worker = None

    async def __aenter__(self) -> Manager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def store(self) -> Store:
        if self._store is None:
            raise AutocertError("the manager is not started: await manager.start() first")
        return self._store

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            raise AutocertError("the manager is not started: await manager.start() first")
        return self._worker

    @property
    def challenges(self) -> ChallengeBook:
        if self._challenges is None:
            raise AutocertError("the manager is not started: await manager.start() first")
        return self._challenges

    # -- allowlist and issuance ------------------------------------------------------------

    def is_allowed(self, name: str) -> bool:
        """Whether ``name`` (normalised) may get a certificate, from memory (a wildcard pattern
        may; so may a name the ask endpoint allowed)."""
        return certificate_name(name, self._allowed, self._wildcards) is not None or (self.ask is not None and self.ask.allows(name))

    async def may_serve(self, name: str, *, fresh: bool = False) -> bool:
        """Whether ``name`` (already normalised) is allowed, asking the ask endpoint about a
        host name off the allowlist (``fresh``: whatever it said before, as before a renewal)."""
        if certificate_name(name, self._allowed, self._wildcards) is not None:
            return True
        if self.ask is None or not is_host_name(name):
            return False
        allowed = await self.ask.ask(name, fresh=fresh)
        if not allowed and fresh:  # asked again (before a renewal) and refused: dropped
            await self.store.forget_asked(name)
        return allowed

    async def _order(self, name: str) -> StoredCertificate:
        """Order ``name`` now and wait; a name the ask endpoint allowed is recorded as such
        first, so that status shows it allowed."""
        if certificate_name(name, self._allowed, self._wildcards) is None:
            await self.store.record_asked(name)
        return await self.worker.issue(name)

    async def allow(self, *entries: str, cap: int | None = None, wildcard: bool = False) -> list[str]:
        """Allow names or ``*.patterns``; ``cap`` limits how many names a pattern may order;
        ``wildcard`` serves patterns from one wildcard certificate each (needs ``dns``)."""
        if cap is not None and not 1 <= cap <= MAX_CAP:
            raise ValueError(f"cap {cap}: must be between 1 and {MAX_CAP}")
        normalised = [normalize_entry(entry) for entry in entries]
        added = await self.store.allow(normalised, cap=cap, wildcard=wildcard)
        await self._refresh_allowlist()
        return added

    async def disallow(self, *entries: str) -> list[str]:
        normalised = [normalize_entry(entry) for entry in entries]
        removed = await self.store.disallow(normalised)
        await self._refresh_allowlist()
        return removed

    async def issue(self, name: str, *, force: bool = False) -> StoredCertificate:
        """Order a certificate for an allowed name now and wait for it.

        A name whose current certificate is valid and not yet due for renewal keeps it: that
        certificate is returned and nothing is ordered, unless ``force``. So running the same
        command twice (or again after an interruption) never orders twice.
        """
        name = certificate_name(entry := normalize_entry(name), self._allowed, self._wildcards) or entry
        if not await self.may_serve(name):
            raise IssuanceError(name, "not allowed: add it with `autocert allow` first" + (" --wildcard" if is_pattern(name) else ""))
        if not force:
            current = await self.store.current_certificate(name)
            if current is not None and not needs_order(current.not_after, current.renew_at, utcnow()):
                return current
        return await self._order(name)

    async def renew(self, names: Sequence[str] | None = None, *, force: bool = False) -> dict[str, StoredCertificate | BaseException]:
        """Renew what is due (or ``names``); ``force`` renews now whatever ``renew_at`` says.

        Returns each name's new certificate, or the error that stopped it. Names not due are
        left out unless forced.
        """
        now = utcnow()
        if names is None:
            candidates = await self.store.current_certificates() if force else await self.store.renewals_due(now, limit=1_000_000)
        else:
            wanted = [normalize_entry(name) for name in names]
            candidates = await self.store.current_certificates(wanted)
            missing = set(wanted) - {c.name for c in candidates}
            if missing:
                raise IssuanceError(sorted(missing)[0], "has no certificate to renew; use `autocert issue`")
        due = [c.name for c in candidates if force or c.renew_at <= now]
        results: dict[str, StoredCertificate | BaseException] = {}
        for name in due:
            if not await self.may_serve(name, fresh=True):
                results[name] = IssuanceError(name, "no longer allowed; not renewed")
        pending = [name for name in due if name not in results]
        outcomes = await asyncio.gather(*(self._order(name) for name in pending), return_exceptions=True)
        results.update(zip(pending, outcomes))
        return results

    async def revoke(self, name: str, reason: int = 0) -> StoredCertificate:
        """Revoke the current certificate of ``name`` at the CA; every server stops serving it."""
        name = normalize_entry(name)
        certificate = await self.store.current_certificate(name)
        if certificate is None:
            raise IssuanceError(name, "has no certificate to revoke")
        await self.worker.revoke(certificate, reason)
        if self.cache.certificate_id(name) == certificate.id:
            self.cache.discard(name)
        return certificate

    async def status(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        return await status_report(self.store, directory=self.directory, names=names, in_flight=self.worker.in_flight)

    # -- serving ---------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A server context that picks each connection's certificate by SNI.

        Safe to call before ``start()``: until then every name is refused with alert 112.
        """
        install_alert_flush_fix()
        context = new_server_context(self.alpn)
        context.sni_callback = self._sni_callback
        return context

    def route(self, server_name: str | None, alpn: Sequence[str] = (), local_address: str | None = None) -> tuple[Route, str, ssl.SSLContext | None]:
        """Decide a handshake from memory alone: the route, the normalised name and the context
        to serve (when there is one); without SNI, the ``local_address`` a client connected to
        names it. Counts ``served``, ``challenge``, ``unknown_name`` and ``asked``; a ``LOAD``
        is counted by the caller once it knows how the load ended. The one decision behind
        both SNI paths; it never waits and never touches the database.
        """
        name = (server_name or unnamed_route(local_address, self.default_name, self._allowed)).rstrip(".").lower()
        served_as = certificate_name(name, self._allowed, self._wildcards) if name and self._started else None
        if served_as is None and self._started and ACME_TLS_ALPN in alpn and (address := challenged_address(name, self._allowed)):
            name = served_as = address  # tls-alpn-01 for an address: its reverse-DNS name is the SNI
        if served_as is None:
            answer = self.ask.answer(name) if self.ask is not None and name and self._started else False
            if answer is None:
                self.handshakes["asked"] += 1
                return Route.ASK, name, None
            if not answer:
                self.handshakes["unknown_name"] += 1
                return _REFUSED
            served_as = name
        if ACME_TLS_ALPN in alpn:
            self.handshakes["challenge"] += 1
            return Route.CHALLENGE, name, self._challenges.cached_context(name)  # type: ignore[union-attr]
        context = self.cache.get(served_as)
        if context is None:
            held = self._held.get(served_as)
            if held is not None:
                if held[0] > self._loop.time():  # type: ignore[union-attr]
                    self.handshakes["held"] += 1
                    return Route.HELD, name, None
                del self._held[served_as]
            return Route.LOAD, name, None
        self.handshakes["served"] += 1
        return Route.SERVE, name, context

    def _sni_callback(self, ssl_object: Any, server_name: str | None, _context: ssl.SSLContext) -> int | None:
        route, name, context = self.route(server_name)
        if route is Route.SERVE:
            ssl_object.context = context
            setattr(ssl_object, SERVED_NAME, name)  # for the 421 check of autocert.web.setup
            return None
        if route is Route.LOAD:
            # Embedded mode cannot hold a handshake open: refuse this one, the next is served.
            self.handshakes["pending"] += 1
            self._lookup(certificate_name(name, self._allowed, self._wildcards) or name)
        elif route is Route.ASK:  # likewise: the next handshake gets the answer
            self.ask.ask_soon(name)  # type: ignore[union-attr]
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    async def context_for(self, name: str, *, wait: float = 0.0) -> ssl.SSLContext | None:
        """The context for an allowed ``name``, loading it or issuing it if needed.

        Waits at most ``wait`` seconds for a first issuance; issuance goes on after that.
        """
        served_as = certificate_name(name, self._allowed, self._wildcards)
        if served_as is None:
            if self.ask is None or not self.ask.allows(name):
                return None
            served_as = name
        name = served_as
        context = self.cache.get(name)
        if context is not None:
            return context
        lookup = self._lookup(name)
        try:
            return await asyncio.wait_for(asyncio.shield(lookup), timeout=wait)
        except (asyncio.TimeoutError, AutocertError):
            return None

    def _lookup(self, name: str) -> asyncio.Task[ssl.SSLContext | None]:
        task = self._lookups.get(name)
        if task is None:
            assert self._loop is not None
            task = self._loop.create_task(self._load_or_issue(name), name=f"autocert-lookup-{name}")
            self._lookups[name] = task
            task.add_done_callback(lambda done, name=name: self._lookup_done(name, done))
        return task

    def _lookup_done(self, name: str, task: asyncio.Task[ssl.SSLContext | None]) -> None:
        if self._lookups.get(name) is task:
            del self._lookups[name]
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not get a certificate for %s: %s", name, task.exception())

    async def _load_or_issue(self, name: str) -> ssl.SSLContext | None:
        if not is_host_name(name) and name not in self._wildcards:
            return None  # e.g. a bad label under a pattern
        now = utcnow()
        certificate = await self.store.current_certificate(name)
        if certificate is None or certificate.not_after <= now:
            if await self._held_by_state(name, now):
                return None
            if not await self._caps.admit(name, self._allowed, self.store):
                self._hold(name, None, "cap")
                return None
            try:
                certificate = await self._order(name)
            except AutocertError:
                # Failed, or held back by a budget: the worker stored when to try again.
                await self._held_by_state(name, utcnow())
                raise
        return await self._install(certificate)

    async def _held_by_state(self, name: str, now: datetime) -> bool:
        """Whether the stored state of ``name`` holds it back now (backoff, parked); if so it
        is remembered for :meth:`route`."""
        state = await self.store.name_state(name)
        reason = hold_reason(state, now)
        if reason is None:
            return False
        log.debug("%s is not ordered now: %s (next attempt at %s)", name, reason, state and state.next_attempt_at)
        self._hold(name, state.next_attempt_at if state is not None else None, reason)
        return True

    def _hold(self, name: str, until: datetime | None, reason: str) -> None:
        """Remember that ``name`` may not be ordered before ``until`` (None: until its state
        changes), so that :meth:`route` refuses it from memory meanwhile."""
        assert self._loop is not None
        ends = float("inf") if until is None else self._loop.time() + (until - utcnow()).total_seconds()
        self._held.pop(name, None)  # re-inserted last: the oldest go first when full
        self._held[name] = (ends, reason)
        while len(self._held) > HELD_NAMES_MAX:
            del self._held[next(iter(self._held))]

    async def _install(self, certificate: StoredCertificate) -> ssl.SSLContext | None:
        """Hot-insert a certificate: the next handshake for its name gets it."""
        if certificate.revoked_at is not None or not self.is_allowed(certificate.name):
            return None
        context = await asyncio.to_thread(build_context, certificate.chain_pem, certificate.key_pem, self.alpn)
        self.cache.put(certificate.name, context, certificate.id)
        self._held.pop(certificate.name, None)
        self._last_certificate_id = max(self._last_certificate_id, certificate.id)
        return context
