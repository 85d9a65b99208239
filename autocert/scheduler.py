"""Renewals and retries: nothing expires unnoticed, nothing is retried in a loop.

The scheduler sleeps until the earliest ``renew_at`` or backoff end recorded in the database
(so restarts neither forget a renewal nor retry early) and hands due names to the worker,
which records every attempt and grows the backoff on failure. Names that are no longer
allowed are parked rather than renewed forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from .store import Store
from .worker import Worker

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
        """Start every renewal and retry that is due now; returns the names started."""
        now = self._clock()
        started: list[str] = []
        for certificate in await self._store.renewals_due(now, self._batch):
            name = certificate.name
            if not self._allowed(name):
                continue
            state = await self._store.name_state(name)
            if state is not None and state.next_attempt_at is not None and state.next_attempt_at > now:
                continue  # the last renewal failed; its backoff decides
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
