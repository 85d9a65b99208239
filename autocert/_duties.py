"""Jobs done once per database: renewals and retries (with ARI fetches and the sweep of stale
http-01 answers) and the expiry watch's ``expiring``/``expired`` events, which are what the
notifications send.

Every ``serve`` worker and instance on a database could do them, and each would then renew
and notify once per process. Instead one process at a time holds the ``duties`` lease in the
database and does them; it renews the lease every third of its length. When the holder dies,
the lease runs out and another process takes it; a holder that is gone from this host (killed)
is noticed at once and its lease taken over without waiting. Orders for first contacts are no
duty: any process places them, and the per-name lease keeps them single.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from ._errors import StoreError
from ._scheduler import Scheduler
from ._worker import owner_is_dead

if TYPE_CHECKING:
    from ._manager import Manager
    from ._monitor import ExpiryMonitor

__all__ = ["DUTIES_LEASE", "DUTIES_LEASE_SECONDS", "Duties"]

log = logging.getLogger("autocert.duties")

#: The job name of the lease in the store.
DUTIES_LEASE = "duties"
#: How long the lease lasts unless renewed: the longest a dead holder on another host leaves
#: the duties undone (one on this host is replaced within a renewal period).
DUTIES_LEASE_SECONDS = 10.0


class Duties:
    """Takes the duties lease when it can and runs the duties while it holds it."""

    def __init__(self, manager: Manager, monitor: ExpiryMonitor, *, lease_seconds: float = DUTIES_LEASE_SECONDS) -> None:
        self.manager = manager
        self.monitor = monitor
        self.lease_seconds = lease_seconds
        #: Whether this process holds the lease (and so renews and reports expiries).
        self.held = False
        self._task: asyncio.Task[None] | None = None
        self._scheduler: asyncio.Task[None] | None = None
        monitor.reports = lambda: self.held

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="autocert-duties")

    async def stop(self) -> None:
        """Stop the duties and hand the lease back, so another process takes it at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.held:
            await self._end()
            with contextlib.suppress(StoreError):
                await self.manager.store.release_job_lease(DUTIES_LEASE, self.manager.worker.owner)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = -float("inf")
        while True:
            try:
                taken = await self._take()
                if taken:
                    renewed = loop.time()
            except StoreError as exc:  # the database is away: keep the duties while our lease would last
                taken = self.held and loop.time() - renewed < self.lease_seconds
                if not taken and self.held:
                    log.warning("cannot renew the duties lease (%s); leaving renewals to whichever process takes it", exc)
            if taken and not self.held:
                self._begin()
            elif self.held and not taken:
                await self._end()
            await asyncio.sleep(self.lease_seconds / 3)

    async def _take(self) -> bool:
        store, owner = self.manager.store, self.manager.worker.owner
        if await store.try_job_lease(DUTIES_LEASE, owner, self.lease_seconds):
            return True
        holder = await store.job_lease(DUTIES_LEASE)
        if holder is None or not owner_is_dead(holder[0]):
            return False
        log.info("the duties lease was held by %s, which is gone; taking it over", holder[0])
        await store.release_job_lease(DUTIES_LEASE, holder[0])
        return await store.try_job_lease(DUTIES_LEASE, owner, self.lease_seconds)

    def _begin(self) -> None:
        self.held = True
        log.info("this process now runs renewals and the expiry watch for the database")
        manager = self.manager
        loop = asyncio.get_running_loop()
        if not manager.schedules_renewals:  # a manager that schedules its own keeps doing so
            recheck = None if manager.ask is None else lambda name: manager.may_serve(name, fresh=True)
            scheduler = Scheduler(manager.store, manager.worker, is_allowed=manager.is_allowed, recheck=recheck)
            self._scheduler = loop.create_task(scheduler.run(), name="autocert-scheduler")
        self.monitor.poke()

    async def _end(self) -> None:
        self.held = False
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
            self._scheduler = None
