"""Renewals and retries: nothing expires unnoticed, nothing is retried in a loop.

The scheduler sleeps until the earliest ``renew_at`` or backoff end recorded in the database
(so restarts neither forget a renewal nor retry early) and hands due names to the worker,
which records every attempt and grows the backoff on failure. Names that are no longer
allowed are left alone rather than renewed forever. Once an hour it also sweeps the http-01
answers a killed process left behind.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from ._policy import ARI_ERROR_RETRY, STALE_CHALLENGE_AGE, ari_next_check, hold_reason, time_in_window
from ._store import Store
from ._timefmt import utcnow
from ._worker import Worker

log = logging.getLogger("autocert.scheduler")


class Scheduler:
    """Renews certificates when due and retries failed names when their backoff ends.

    ``max_sleep`` bounds how long it trusts its last look at the database: another process
    may have added work (a new certificate, a failure) that moves the next wake-up earlier.
    """

    def __init__(
        self,
        store: Store,
        worker: Worker,
        *,
        is_allowed: Callable[[str], bool],
        recheck: Callable[[str], Awaitable[bool]] | None = None,
        clock: Callable[[], datetime] = utcnow,
        max_sleep: float = 60.0,
        min_sleep: float = 1.0,
        batch: int = 100,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._worker = worker
        self._is_allowed = is_allowed
        #: Asked instead of ``is_allowed`` when set: whether a name may still be renewed,
        #: asking the ask endpoint again about names off the allowlist.
        self._recheck = recheck
        self._clock = clock
        self._max_sleep = max_sleep
        self._min_sleep = min_sleep
        self._batch = batch
        self._wake = asyncio.Event()
        self._skipped_disallowed: set[str] = set()
        self._challenges_swept: datetime | None = None
        #: Directories of CAs that publish no renewal information (or are no longer configured):
        #: their certificates keep their lifetime-based ``renew_at``.
        self._ari_unsupported: set[str] = set()
        self._random = rng or random.Random()

    def poke(self) -> None:
        """Look at the database again now (e.g. after a failure set a new backoff)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                started = await self.run_once()
                delay = await self._delay()
                if not started and delay <= self._min_sleep:
                    # Everything due is parked, backing off or disallowed; wait for a poke or the bound.
                    delay = self._max_sleep
            except asyncio.CancelledError:
                raise
            except Exception:  # the database or CA may be unavailable for a while; keep going
                log.exception("renewal check failed; will look again")
                delay = self._max_sleep
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass

    async def run_once(self) -> list[str]:
        """Refresh due renewal windows, then start every renewal and retry that is due now;
        returns the names started."""
        await self.check_renewal_info()
        now = self._clock()
        await self._sweep_stale_challenges(now)
        started: list[str] = []
        for certificate in await self._store.renewals_due(now, self._batch):
            name = certificate.name
            if not await self._allowed(name):
                continue
            if hold_reason(await self._store.name_state(name), now) is not None:
                continue  # the last renewal failed: its backoff decides, or it is parked
            log.info("renewing %s (renew_at %s, expires %s)", name, certificate.renew_at.isoformat(), certificate.not_after.isoformat())
            self._start(name)
            started.append(name)
        for state in await self._store.retries_due(now, self._batch):
            if state.name in started or not await self._allowed(state.name):
                continue
            current = await self._store.current_certificate(state.name)
            if current is not None and current.renew_at > now:
                continue  # a certificate was issued since (e.g. by another process)
            log.info("retrying %s after %d failed attempt(s)", state.name, state.failures)
            self._start(state.name)
            started.append(state.name)
        return started

    async def check_renewal_info(self) -> int:
        """Fetch the CA's renewal window (RFC 9773) for certificates whose check is due and
        move their ``renew_at`` into it; returns how many were checked.

        Runs here, never on the handshake path, and asks the CA that issued each certificate.
        A CA without renewal information is noticed once; the lifetime-based ``renew_at`` of
        its certificates then stands.
        """
        now = self._clock()
        checked = 0
        for certificate in await self._store.renewal_info_due(now, self._batch, skip=self._ari_unsupported):
            if certificate.directory in self._ari_unsupported:
                continue  # found out earlier in this batch
            try:
                info = await self._worker.renewal_info(certificate)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the CA is unreachable or answered badly: try again later
                log.warning("could not fetch renewal information for %s: %s", certificate.name, exc)
                await self._store.set_renewal(certificate.id, renew_at=certificate.renew_at, ari_next_check_at=now + ARI_ERROR_RETRY)
                continue
            if info is None:
                self._ari_unsupported.add(certificate.directory)
                continue
            renew_at = time_in_window(info.start, info.end, now, self._random)
            next_check = ari_next_check(now, info.retry_after, self._random)
            await self._store.set_renewal(certificate.id, renew_at=renew_at, ari_next_check_at=next_check)
            if renew_at != certificate.renew_at:
                log.info("%s: the CA suggests renewing between %s and %s; renewing at %s",
                         certificate.name, info.start.isoformat(), info.end.isoformat(), renew_at.isoformat())
            checked += 1
        return checked

    async def _sweep_stale_challenges(self, now: datetime) -> None:
        """Drop http-01 answers a killed process left behind, at most once per
        :data:`STALE_CHALLENGE_AGE`."""
        if self._challenges_swept is not None and now - self._challenges_swept < STALE_CHALLENGE_AGE:
            return
        self._challenges_swept = now
        removed = await self._store.purge_challenges(now - STALE_CHALLENGE_AGE)
        if removed:
            log.info("removed %d http-01 answer(s) left by an order that did not finish", removed)

    async def _allowed(self, name: str) -> bool:
        """The zombie breaker: a name removed from the allowlist (or refused by the ask
        endpoint) is not renewed (said once)."""
        if self._is_allowed(name) if self._recheck is None else await self._recheck(name):
            self._skipped_disallowed.discard(name)
            return True
        if name not in self._skipped_disallowed:
            self._skipped_disallowed.add(name)
            log.warning("%s is due but no longer allowed; not renewed", name)
        return False

    def _start(self, name: str) -> None:
        task = self._worker.request(name)
        task.add_done_callback(lambda _done: self.poke())

    async def _delay(self) -> float:
        next_due = await self._store.next_due()
        if next_due is None:
            return self._max_sleep
        seconds = (next_due - self._clock()) / timedelta(seconds=1)
        return min(max(seconds, self._min_sleep), self._max_sleep)
