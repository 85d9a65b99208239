"""Renewals and retries: nothing expires unnoticed, nothing is retried in a loop.

The scheduler sleeps until the earliest ``renew_at`` or backoff end recorded in the database
(so restarts neither forget a renewal nor retry early) and hands due names to the worker,
which records every attempt and grows the backoff on failure. Names that are no longer
allowed are parked rather than renewed forever.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta

from ._store import Store
from ._timefmt import utcnow
from ._worker import Worker, is_parked

log = logging.getLogger("autocert.scheduler")


#: Let's Encrypt asks clients to check renewal information about twice a day.
ARI_CHECK_INTERVAL = timedelta(hours=12)
#: Bounds on a CA's Retry-After for renewal information, so a bad value neither hammers
#: the CA nor lets a revoked certificate's new window go unseen for days.
ARI_MIN_RECHECK = timedelta(minutes=30)
ARI_MAX_RECHECK = timedelta(days=1)
ARI_ERROR_RETRY = timedelta(hours=1)


def time_in_window(start: datetime, end: datetime, now: datetime, rng: random.Random) -> datetime:
    """A uniformly random time in the CA's window, or now if the window has passed (RFC 9773 §4.2)."""
    if end <= now:
        return now
    start = max(start, now)
    return start + (end - start) * rng.random()


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
        clock: Callable[[], datetime] = utcnow,
        max_sleep: float = 60.0,
        min_sleep: float = 1.0,
        batch: int = 100,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._worker = worker
        self._is_allowed = is_allowed
        self._clock = clock
        self._max_sleep = max_sleep
        self._min_sleep = min_sleep
        self._batch = batch
        self._wake = asyncio.Event()
        self._parked: set[str] = set()
        self._ari_unsupported = False
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
                    # Everything due is parked or backing off; wait for a poke or the bound.
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
        started: list[str] = []
        for certificate in await self._store.renewals_due(now, self._batch):
            name = certificate.name
            if not self._allowed(name):
                continue
            state = await self._store.name_state(name)
            if state is not None and state.next_attempt_at is not None and state.next_attempt_at > now:
                continue  # the last renewal failed; its backoff decides
            if is_parked(state):
                continue
            log.info("renewing %s (renew_at %s, expires %s)", name, certificate.renew_at.isoformat(), certificate.not_after.isoformat())
            self._start(name)
            started.append(name)
        for state in await self._store.retries_due(now, self._batch):
            if state.name in started or not self._allowed(state.name):
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

        Runs here, never on the handshake path. A CA without renewal information is noticed
        once; the lifetime-based ``renew_at`` then stands.
        """
        if self._ari_unsupported:
            return 0
        now = self._clock()
        checked = 0
        for certificate in await self._store.renewal_info_due(now, self._batch):
            try:
                info = await self._worker.renewal_info(certificate)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the CA is unreachable or answered badly: try again later
                log.warning("could not fetch renewal information for %s: %s", certificate.name, exc)
                await self._store.set_renewal(certificate.id, renew_at=certificate.renew_at, ari_next_check_at=now + ARI_ERROR_RETRY)
                continue
            if info is None:
                self._ari_unsupported = True
                return checked
            renew_at = time_in_window(info.start, info.end, now, self._random)
            wait = timedelta(seconds=info.retry_after) if info.retry_after else ARI_CHECK_INTERVAL * self._random.uniform(0.9, 1.1)
            next_check = now + min(max(wait, ARI_MIN_RECHECK), ARI_MAX_RECHECK)
            await self._store.set_renewal(certificate.id, renew_at=renew_at, ari_next_check_at=next_check)
            if renew_at != certificate.renew_at:
                log.info("%s: the CA suggests renewing between %s and %s; renewing at %s",
                         certificate.name, info.start.isoformat(), info.end.isoformat(), renew_at.isoformat())
            checked += 1
        return checked

    def _allowed(self, name: str) -> bool:
        """The zombie breaker: a name removed from the allowlist is parked, not renewed."""
        if self._is_allowed(name):
            self._parked.discard(name)
            return True
        if name not in self._parked:
            self._parked.add(name)
            log.warning("%s is due but no longer allowed; parked (not renewed)", name)
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
