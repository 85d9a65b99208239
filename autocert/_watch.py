"""How a :class:`autocert._manager.Manager` keeps up with other processes on its database:
allowlist changes, certificates they stored, revocations.

Every serve worker and instance, the CLI and embedding applications write to one database;
each manager polls a small summary of it once a second (or at once on a PostgreSQL change
notification) and acts on what moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ._errors import StoreError
from ._events import Event, EventBus
from ._timefmt import utcnow

if TYPE_CHECKING:
    from ._caps import PatternCaps
    from ._store import Store, StoredCertificate
    from ._tls import ContextCache

__all__ = ["REVOCATION_OVERLAP", "Watching"]

log = logging.getLogger("autocert.manager")

REVOCATION_OVERLAP = timedelta(seconds=10)


class Watching:
    """The manager's watch on the database (a mixin of :class:`autocert._manager.Manager`)."""

    if TYPE_CHECKING:
        cache: ContextCache
        events: EventBus
        poll_interval: float
        _allowed: frozenset[str]
        _wildcards: frozenset[str]
        _allowlist_version: int | None
        _held: dict[str, tuple[float, str]]
        _caps: PatternCaps
        _changed: asyncio.Event
        _revocations_checked: datetime
        _revocations_seen: int
        _last_certificate_id: int

        @property
        def store(self) -> Store: ...
        def is_allowed(self, name: str) -> bool: ...
        async def _install(self, certificate: StoredCertificate) -> ssl.SSLContext | None: ...

    async def _refresh_allowlist(self, version: int | None = None) -> None:
        """Reload the allowlist if its version moved (read now unless the caller just did)."""
        if version is None:
            version = (await self.store.change_marks()).allowlist_version
        if version == self._allowlist_version:
            return
        self._allowlist_version = version
        allowed, self._wildcards = await self.store.allowed_entries(), await self.store.wildcard_patterns()
        # A cap may have been raised or a name removed: let held names be looked at again.
        self._held.clear()
        self._caps.allowlist_changed()
        if allowed != self._allowed:
            added, removed = sorted(allowed - self._allowed), sorted(self._allowed - allowed)
            self._allowed = allowed
            for entry in added:
                self.events.emit(Event("allowed", entry, "pending", previous="disallowed"))
            for entry in removed:
                self.events.emit(Event("disallowed", entry, "disallowed"))
            for name in self.cache.names():
                if not self.is_allowed(name):
                    self.cache.discard(name)
                    log.info("%s is no longer allowed; stopped serving it", name)

    async def _drop_revoked(self) -> None:
        """Stop serving certificates revoked by any process (``autocert revoke``)."""
        checked = utcnow()
        # Overlap the previous window a little: another host's clock may lag ours.
        for certificate in await self.store.revoked_since(self._revocations_checked - REVOCATION_OVERLAP):
            if self.cache.certificate_id(certificate.name) == certificate.id:
                self.cache.discard(certificate.name)
                log.info("%s serial %s was revoked; stopped serving it", certificate.name, certificate.serial)
        self._revocations_checked = checked

    async def _watch(self) -> None:
        """Pick up allowlist changes and certificates written by other processes.

        While the database is unreachable the server keeps serving from memory; an outage is
        logged once when it starts and once when it ends, not once a poll.
        """
        failing_since: float | None = None
        while True:
            # A notification (PostgreSQL) cuts the wait short; without one, this is the poll.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.poll_interval)
            self._changed.clear()
            try:
                marks = await self.store.change_marks()  # one small query a second when nothing changes
                await self._refresh_allowlist(marks.allowlist_version)
                if marks.latest_certificate_id > self._last_certificate_id:
                    for certificate in await self.store.certificates_since(self._last_certificate_id):
                        self._last_certificate_id = max(self._last_certificate_id, certificate.id)
                        self._held.pop(certificate.name, None)  # e.g. `autocert issue` ended a backoff
                        if certificate.name in self.cache:
                            await self._install(certificate)
                if marks.revocations != self._revocations_seen:
                    self._revocations_seen = marks.revocations
                    await self._drop_revoked()
            except asyncio.CancelledError:
                raise
            except StoreError as exc:  # the database is unavailable: keep serving
                if failing_since is None:
                    failing_since = asyncio.get_running_loop().time()
                    log.warning("cannot read the database, serving from memory until it is back: %s", exc)
                continue
            except Exception:  # a bug, not an outage: say where, and keep serving
                log.exception("could not refresh from the database; will retry")
                continue
            if failing_since is not None:
                log.warning("the database is reachable again after %.0f s", asyncio.get_running_loop().time() - failing_since)
                failing_since = None

