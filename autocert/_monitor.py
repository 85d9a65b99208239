"""Expiry watch: turn certificates that are running out into ``expiring`` and ``expired`` events.

Let's Encrypt stopped sending expiry e-mails in 2025, so an operator's only warning is the
one their own tool gives. Renewal is meant to happen when a third of the lifetime is left
(half for short-lived certificates); a certificate that is past that point, and a bit of grace,
with no newer one stored means renewal is not working, and someone must hear about it while
there is still time.

The scan asks the database for aggregates (how many names have a certificate, the soonest
expiry) and for the few certificates already past their renewal time, so its memory and time do
not grow with the number of names. It runs every ``interval`` seconds (and at start) in whichever
process serves or embeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ._errors import AutocertError
from ._events import Event
from ._policy import is_expiring
from ._timefmt import isoformat, utcnow

if TYPE_CHECKING:
    from ._manager import Manager
    from ._store import CertificateTimes

__all__ = ["ExpiryMonitor"]

log = logging.getLogger("autocert.monitor")

#: How old the figures a scrape reports may be; the aggregate query is cheap at any size.
FIGURES_MAX_AGE = timedelta(minutes=5)


class ExpiryMonitor:
    """One per manager (:meth:`of`); emits on ``manager.events`` and knows the soonest expiry.

    ``remind`` bounds how often the same certificate is reported again, so the log and the
    notification channels get a daily reminder rather than one line every scan.
    """

    def __init__(self, manager: Manager, *, interval: float = 600.0, remind: timedelta = timedelta(days=1)) -> None:
        self.manager = manager
        self.interval = interval
        self.remind = remind
        #: Allowed names with a current certificate, and the earliest ``not_after`` among them.
        self.certified = 0
        self.soonest: datetime | None = None
        self.scanned_at: datetime | None = None
        #: Set when an event may have moved the figures above; :meth:`refresh_if_stale` then rescans.
        self.stale = True
        self._reported: dict[tuple[str, str, int], datetime] = {}
        #: Whether this process reports what it finds as events; with several processes on one
        #: database only the holder of the duties lease does (:mod:`autocert._duties`).
        self.reports: Callable[[], bool] = lambda: True
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._users = 0
        self._unsubscribe = manager.events.subscribe(self._on_event)

    @classmethod
    def of(cls, manager: Manager) -> ExpiryMonitor:
        """The monitor of ``manager``, created on first use: several users share one scan."""
        monitor = manager.attachments.get(cls)
        if monitor is None:
            monitor = manager.attachments[cls] = cls(manager)
        return monitor  # type: ignore[no-any-return]

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start scanning (at once, then every ``interval``); nested starts share one loop."""
        self._users += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="autocert-expiry-monitor")

    async def stop(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def poke(self) -> None:
        """Scan now rather than at the end of the interval (a new holder of the duties)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            delay = self.interval
            try:
                await (self.check() if self.reports() else self.refresh())
            except asyncio.CancelledError:
                raise
            except AutocertError:
                # The manager is not started yet: a mounted status app may start before the
                # application's own startup hook starts the manager.
                delay = min(self.interval, 1.0)
            except Exception:  # the database may be briefly unavailable; try again next round
                log.exception("expiry check failed; will retry in %.0f s", self.interval)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    # -- scanning ----------------------------------------------------------------------------

    async def refresh(self, now: datetime | None = None) -> list[CertificateTimes]:
        """Reload the figures; returns the allowed names' certificates past their renewal time."""
        now = now or utcnow()
        self.stale = False
        overview = await self.manager.store.expiry_overview(now, self.manager.is_allowed)
        self.certified, self.soonest, self.scanned_at = overview.certified, overview.soonest, now
        return overview.due

    async def refresh_if_stale(self) -> None:
        """Rescan when an event made ``certified`` and ``soonest`` stale or they are older than
        :data:`FIGURES_MAX_AGE` (a revocation by another process raises no event)."""
        scanned = self.scanned_at
        if self.stale or scanned is None or utcnow() - scanned > FIGURES_MAX_AGE:
            await self.refresh()

    async def check(self, now: datetime | None = None) -> list[Event]:
        """Scan once and emit ``expiring``/``expired`` for what needs attention; returns them."""
        now = now or utcnow()
        due = await self.refresh(now)
        emitted: list[Event] = []
        for certificate in due:
            event = self._event_for(certificate, now)
            if event is None:
                continue
            key = (certificate.name, event.kind, certificate.id)
            last = self._reported.get(key)
            if last is not None and now - last < self.remind:
                continue
            self._reported[key] = now
            self.manager.events.emit(event)
            emitted.append(event)
        live = {(c.name, c.id) for c in due}
        self._reported = {k: v for k, v in self._reported.items() if (k[0], k[2]) in live}
        return emitted

    @staticmethod
    def _event_for(certificate: CertificateTimes, now: datetime) -> Event | None:
        left = certificate.not_after - now
        if left <= timedelta(0):
            return Event("expired", certificate.name, "expired", error=f"expired at {isoformat(certificate.not_after)}", at=now)
        if is_expiring(certificate.not_before, certificate.not_after, certificate.renew_at, now):
            days = left.total_seconds() / 86400
            return Event(
                "expiring",
                certificate.name,
                "valid",
                error=f"expires at {isoformat(certificate.not_after)} ({days:.1f} days left) and has not been renewed",
                at=now,
            )
        return None

    async def _on_event(self, event: Event) -> None:
        """A new or renewed certificate, or an allowlist change, moves the figures: rescan when next asked."""
        if event.kind in ("issued", "renewed", "allowed", "disallowed"):
            self.stale = True
