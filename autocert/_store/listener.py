"""Changes pushed by PostgreSQL, so that every server acts on them within a moment.

Each write other servers must act on (an allowlist change, a certificate stored or revoked)
sends ``NOTIFY autocert_changes`` inside its own transaction: PostgreSQL delivers it at commit,
and never for a transaction that rolls back. A running server listens on a connection of its
own (:class:`ChangeListener`) and, on each notification, runs the same refresh its
once-a-second poll runs; the poll stays, for a notification lost while the listener was
reconnecting. SQLite has no such channel and keeps the poll alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("autocert.store")

#: The channel every instance on one database listens on; the payload is empty (a wake-up).
CHANNEL = "autocert_changes"

#: Seconds between reconnection attempts while the database is away: from the first to the last.
RECONNECT_FIRST = 0.25
RECONNECT_LAST = 5.0

#: A connection that died without a word (a network cut, not a server restart) is found by a
#: ``SELECT 1`` this often; it must answer within the same time.
KEEPALIVE = 10.0


class ChangeListener:
    """One LISTEN connection that calls ``on_change`` for every notification, reconnecting
    by itself after the database goes away; it also calls it after each reconnection, since
    notifications sent meanwhile are lost."""

    def __init__(self, dsn: str, on_change: Callable[[], None], *, shown_url: str) -> None:
        self._dsn = dsn
        self._on_change = on_change
        self._shown_url = shown_url
        #: Whether a LISTEN connection is up now (for health reports and tests).
        self.listening = False

    def _notified(self, *_args: Any) -> None:
        self._on_change()

    async def run(self) -> None:
        """Listen until cancelled."""
        import asyncpg  # type: ignore[import-untyped]  # only PostgreSQL servers get here

        delay = RECONNECT_FIRST
        connected_before = False
        while True:
            connection: Any = None
            try:
                connection = await asyncio.wait_for(asyncpg.connect(self._dsn), timeout=KEEPALIVE)
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _connection, lost=lost: lost.set())
                await connection.add_listener(CHANNEL, self._notified)
                self.listening = True
                delay = RECONNECT_FIRST
                if connected_before:
                    log.warning("listening for changes on %s again", self._shown_url)
                    self._on_change()
                connected_before = True
                while not connection.is_closed():
                    try:
                        await asyncio.wait_for(lost.wait(), timeout=KEEPALIVE)
                    except asyncio.TimeoutError:
                        await asyncio.wait_for(connection.execute("SELECT 1"), timeout=KEEPALIVE)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any driver or network failure: reconnect
                if self.listening or not connected_before:
                    log.warning("not listening for changes on %s (%s: %s); polling until it is back",
                                self._shown_url, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            finally:
                self.listening = False
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_LAST)
