"""Pattern caps on the first-contact path: how many distinct names a ``*.pattern`` may order.

Checked off the handshake path, when a name under a capped pattern is about to be ordered.
Names admitted here are reserved until their order ends, so concurrent first contacts in one
process cannot overshoot; several processes on one database still can, by the few names that
start ordering in the same instant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from ._names import pattern_for
from ._policy import within_cap
from ._store import Store

log = logging.getLogger("autocert.manager")

#: Refusals under a capped pattern after the first are logged as one count per this many seconds.
OVER_CAP_LOG_INTERVAL = 60.0


class PatternCaps:
    """Reservations and the over-cap log for one manager; ``clock`` is the loop's time."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        #: Names admitted under a capped pattern whose order has not finished yet: they count
        #: against the cap before their attempt is in the database.
        self._reservations: dict[str, set[str]] = {}
        #: Per capped pattern: (time of the last log line, refusals since) for the
        #: one-line-a-minute report of names refused over its cap.
        self._logged: dict[str, tuple[float, int]] = {}

    async def admit(self, name: str, listed: Collection[str], store: Store) -> bool:
        """Whether ``name`` may be ordered: listed exactly, under no capped pattern, or under
        one with room (names already ordered under it keep their place)."""
        pattern = pattern_for(name)
        if name in listed or pattern is None:
            return True
        cap = await store.pattern_cap(pattern)
        if cap is None:
            return True
        used = await store.names_under(pattern)
        # No await from here on: the check and the reservation happen as one step.
        reserved = self._reservations.setdefault(pattern, set())
        if within_cap(name, cap, used, reserved):
            reserved.add(name)
            return True
        self._log_over_cap(name, pattern, cap)
        return False

    def release(self, name: str) -> None:
        """The order of ``name`` ended: it no longer holds a place by reservation."""
        pattern = pattern_for(name)
        reserved = self._reservations.get(pattern) if pattern is not None else None
        if reserved is not None:
            reserved.discard(name)
            if not reserved:
                del self._reservations[pattern]  # type: ignore[arg-type]

    def allowlist_changed(self) -> None:
        """A cap may have been raised: the next refusal is worth a line of its own again."""
        self._logged.clear()

    def _log_over_cap(self, name: str, pattern: str, cap: int) -> None:
        """The first name refused under a pattern is logged; after it, one count a minute, so
        a flood of made-up labels cannot fill the log."""
        now = self._clock()
        logged = self._logged.get(pattern)
        if logged is None:
            log.warning("%s: the pattern %s has reached its cap of %d names; not ordering", name, pattern, cap)
            self._logged[pattern] = (now, 0)
        elif now - logged[0] >= OVER_CAP_LOG_INTERVAL:
            log.warning("%d more names refused under %s in the last %.0f s: it has reached its cap of %d names",
                        logged[1] + 1, pattern, now - logged[0], cap)
            self._logged[pattern] = (now, 0)
        else:
            self._logged[pattern] = (logged[0], logged[1] + 1)
