"""Keeping a server inside its open-file limit: idle clients make way for new ones.

Every connection is a descriptor, and so is every database connection, every request to the
CA and every upstream connection. When clients take them all, the next ``accept`` fails, and
so does the next database query or certificate order: a flood of idle connections (or just a
busy day) would stop issuance and renewals. So a share of the limit is kept back for those
(:func:`reserve_for`), and a client connection that arrives with the rest in use first closes
the oldest idle ones: kept-alive connections waiting for their next request, and connections
that have not sent a complete request head (or ClientHello). Requests in flight, responses
still streaming and WebSockets are never closed for this.

Descriptors are numbered lowest-free first, so a new connection's number is a lower bound on
how many are open: the check is one comparison per connection, with no counting.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger("autocert.server")

#: Descriptors kept back for the database, the CA and upstreams: at least this many...
MIN_RESERVE: Final = 64
#: ...or this share of the limit, whichever is more.
RESERVE_SHARE: Final = 0.05
#: At most one warning per this many seconds while the server stays at its limit.
WARN_EVERY: Final = 60.0

#: A source of idle connections: closes up to ``count`` of them, oldest first; returns how many.
Shedder = Callable[[int], int]

#: What asyncio reports when ``accept`` fails for want of descriptors.
_ACCEPT_EXHAUSTED: Final = "socket.accept() out of system resource"


def reserve_for(limit: int) -> int:
    """Descriptors kept back from clients under an open-file limit of ``limit``."""
    return max(MIN_RESERVE, int(limit * RESERVE_SHARE))


def open_file_limit() -> int | None:
    """This process's soft limit on open files, or None when there is none to keep to."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


class DescriptorGuard:
    """One process's client connections against its open-file limit (see the module docstring).

    Listeners call :meth:`admit` for each new client connection and register a
    :data:`Shedder` for the idle connections they hold.
    """

    def __init__(self, limit: int | None = None) -> None:
        #: The open-file limit kept to (0: none).
        self.limit = (open_file_limit() or 0) if limit is None else limit
        self.reserve = reserve_for(self.limit) if self.limit else 0
        #: A new connection numbered this or above means clients have reached the reserve.
        self.ceiling = self.limit - self.reserve if self.limit else 1 << 62
        #: How many idle connections one arrival over the ceiling closes: a few at once, so
        #: the next arrivals find free numbers below it and pay nothing.
        self.batch = max(4, (self.limit or 0) // 100)
        self.shedders: list[Shedder] = []
        self._warned_at = -WARN_EVERY
        self._closed_since_warning = 0

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Whether a new client connection may stay; at the ceiling, idle ones make way first."""
        sock = transport.get_extra_info("socket")
        if sock is None or sock.fileno() < self.ceiling:
            return True
        return self.make_room(sock.fileno() + 1)

    def make_room(self, in_use: int) -> bool:
        """Close idle connections; False when none could go and the reserve itself is at risk."""
        closed = 0
        for shed in self.shedders:
            closed += shed(self.batch - closed)
            if closed >= self.batch:
                break
        self._closed_since_warning += closed
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning(
                "at the open-file limit: %d of %d descriptors in use, %d kept for the database, the CA and upstreams; "
                "closed %d idle client connections to let new ones in",
                in_use, self.limit, self.reserve, self._closed_since_warning,
            )
            self._closed_since_warning = 0
        return closed > 0 or in_use < self.limit - self.reserve // 2

    def watch_accept_errors(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """From now on, an ``accept`` that failed for want of descriptors (the check above came
        too late, or something else took them) makes room too, instead of a traceback in the
        log. Returns what puts the loop's previous exception handler back."""
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
            if context.get("message") == _ACCEPT_EXHAUSTED:
                self.make_room(self.limit)
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        return lambda: loop.set_exception_handler(previous)
