"""Pattern caps on the first-contact path: how many distinct names a ``*.pattern`` may order.

Checked off the handshake path, when a name under a capped pattern is about to be ordered. The
place is claimed in the same database transaction that checks it, so first contacts racing in
one process or in several sharing the database never pass the cap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from ._names import pattern_for
from ._store import Store

log = logging.getLogger("autocert.manager")

#: Refusals under a capped pattern after the first are logged as one count per this many seconds.
OVER_CAP_LOG_INTERVAL = 60.0


class PatternCaps:
    """The cap check and the over-cap log for one manager; ``clock`` is the loop's time."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        #: Per capped pattern: (time of the last log line, refusals since) for the
        #: one-line-a-minute report of names refused over its cap.
        self._logged: dict[str, tuple[float, int]] = {}

    async def admit(self, name: str, listed: Collection[str], store: Store) -> bool:
        """Whether ``name`` may be ordered: listed exactly, under no capped pattern, or under
        one with room (names already ordered under it keep their place)."""
        pattern = pattern_for(name)
        if name in listed or pattern is None:
            return True
        if await store.claim_under_cap(name, pattern):
            return True
        cap = await store.pattern_cap(pattern)
        self._log_over_cap(name, pattern, cap or 0)
        return False

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
