"""Figures that ``serve``'s worker processes share, so one admin listener reports the whole
server.

The supervisor creates a small shared memory file (``memfd``) with one slot per worker and
one for workers that have exited, and hands its descriptor to every worker. Each worker copies
its own counters and gauges into its slot once a second (and the worker serving the admin
listener just before it reads them); a scrape sums the slots. The handshake path is untouched:
it keeps bumping plain integers in its own process. When a worker exits, the supervisor adds
its counters to the retired slot before clearing its slot, so the sums never go down; what it
counted in its last second is lost.

Standard library only: the supervisor imports this and nothing heavy.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence

from ._events import EVENT_KINDS

__all__ = ["COUNTERS", "FIGURES", "GAUGES", "HANDSHAKE_OUTCOMES", "Board"]

#: Every outcome a handshake is counted under; all are exported, zeros included, so a
#: dashboard can rely on the series existing.
HANDSHAKE_OUTCOMES = ("served", "unknown_name", "held", "pending", "challenge")

#: Figures that only grow: summed over live and exited workers.
COUNTERS = (
    *(f"handshakes:{outcome}" for outcome in HANDSHAKE_OUTCOMES),
    "cache_hits", "cache_misses", "attempts:valid", "attempts:failed",
    *(f"events:{kind}" for kind in EVENT_KINDS),
)
#: Figures of the moment: summed over live workers only.
GAUGES = ("cache_size", "cache_capacity", "in_flight")
FIGURES = COUNTERS + GAUGES

#: A slot: the worker's pid (0: none running), then its figures in the order of FIGURES.
_SLOT = struct.Struct(f"<q{len(FIGURES)}d")
_COUNTED = len(COUNTERS)


class Board:
    """The shared figures of ``workers`` worker slots (and the retired slot after them)."""

    def __init__(self, fd: int, workers: int, slot: int | None = None, expected: int | None = None) -> None:
        self.fd = fd
        self.workers = workers
        #: How many workers should be running (``--workers``); fewer makes ``/healthz`` fail.
        self.expected = workers if expected is None else expected
        #: This worker's own slot; None in the supervisor.
        self.slot = slot
        self._map = mmap.mmap(fd, _SLOT.size * (workers + 1))

    @classmethod
    def create(cls, workers: int) -> Board:
        """A new, zeroed board whose descriptor survives ``exec`` in the workers."""
        fd = os.memfd_create("autocert-board", 0)
        os.ftruncate(fd, _SLOT.size * (workers + 1))
        return cls(fd, workers)

    def _read(self, slot: int) -> tuple[int, list[float]]:
        pid, *values = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        return pid, values

    def publish(self, values: Sequence[float]) -> None:
        """Write this worker's figures (in the order of FIGURES) to its slot."""
        assert self.slot is not None
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, os.getpid(), *values)

    def started(self, slot: int, pid: int) -> None:
        """The supervisor started ``pid`` in ``slot``: it counts as running from now."""
        _SLOT.pack_into(self._map, slot * _SLOT.size, pid, *([0.0] * len(FIGURES)))

    def retire(self, slot: int) -> None:
        """The worker in ``slot`` exited: keep its counters in the retired slot, clear its own."""
        _, values = self._read(slot)
        _, retired = self._read(self.workers)
        summed = [a + b for a, b in zip(retired[:_COUNTED], values[:_COUNTED])] + [0.0] * len(GAUGES)
        _SLOT.pack_into(self._map, self.workers * _SLOT.size, 0, *summed)
        _SLOT.pack_into(self._map, slot * _SLOT.size, 0, *([0.0] * len(FIGURES)))

    def per_worker(self) -> list[tuple[int, int, dict[str, float]]]:
        """(slot, pid, figures) of every slot with a running worker, in slot order."""
        slots = ((slot, *self._read(slot)) for slot in range(self.workers))
        return [(slot, pid, dict(zip(FIGURES, values))) for slot, pid, values in slots if pid]

    def total(self) -> dict[str, float]:
        """Every figure summed over the workers (counters of exited workers included)."""
        sums = [0.0] * len(FIGURES)
        for slot in range(self.workers + 1):
            for index, value in enumerate(self._read(slot)[1]):
                sums[index] += value
        return dict(zip(FIGURES, sums))

    def running(self) -> int:
        """How many worker processes run now."""
        return sum(1 for slot in range(self.workers) if self._read(slot)[0])

    def health(self) -> str | None:
        """For ``/healthz``: None while every worker runs, else how many do. A dead worker is
        replaced within milliseconds, so this fails only while one keeps dying."""
        running = self.running()
        return None if running >= self.expected else f"{running} of {self.expected} workers running"
