"""An in-process event bus: what happened to which name, for logs, notifications and the status page.

Silent renewal failure is the complaint operators have about every automatic-HTTPS tool, so
each state change worth a human's attention becomes an :class:`Event`. Publishers (the
worker, the manager, the expiry monitor) must never be slowed down or broken by whoever
listens, so :meth:`EventBus.emit` does not raise and does not wait: synchronous subscribers
run inline with their errors logged, coroutine subscribers are scheduled as tasks.
"""

from __future__ import annotations

import collections
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from ._timefmt import isoformat, utcnow

if TYPE_CHECKING:
    import asyncio

__all__ = ["EVENT_KINDS", "Event", "EventBus", "EventKind", "Subscriber", "log_event"]

EventKind = Literal["issued", "renewed", "failed", "expiring", "expired", "allowed", "disallowed"]

#: Every kind of event, in the order they are usually explained.
EVENT_KINDS: tuple[EventKind, ...] = ("issued", "renewed", "failed", "expiring", "expired", "allowed", "disallowed")

log = logging.getLogger("autocert.events")


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened to ``name``.

    ``state`` is the name's state after the event (the STATUS states of the contract) and
    ``previous`` the one before, when known, so a log line can read as a transition. ``error``
    is the failure as the CA put it (``"<ACME problem type>: <detail>"``) or None.
    """

    kind: EventKind
    name: str
    state: str
    error: str | None = None
    at: datetime = field(default_factory=utcnow)
    previous: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape shared by webhooks, ``--on-event`` commands and JSON logs."""
        return {
            "event": self.kind,
            "name": self.name,
            "state": self.state,
            "previous": self.previous,
            "error": self.error,
            "at": isoformat(self.at),
        }


Subscriber = Callable[[Event], Awaitable[Any] | None]


class EventBus:
    """Fan events out to subscribers and keep the most recent ones for the status page.

    The ring is bounded (``history``), so a flapping name cannot grow memory; the page shows
    the tail of what happened, the logs and notifications keep the full record.
    """

    def __init__(self, history: int = 200) -> None:
        self._subscribers: list[Subscriber] = []
        self._recent: collections.deque[Event] = collections.deque(maxlen=history)
        self._tasks: set[asyncio.Task[Any]] = set()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` for every later event; returns a function that unsubscribes.

        Subscribing the same callback twice has no effect, so the pieces that wire logging or
        notifications (``serve``, ``setup``) can each do it without double delivery.
        """
        if callback not in self._subscribers:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def emit(self, event: Event) -> None:
        """Record ``event`` and hand it to every subscriber without raising or waiting."""
        self._recent.append(event)
        for callback in list(self._subscribers):
            try:
                result = callback(event)
            except Exception:
                log.exception("event subscriber %r failed on %s %s", callback, event.kind, event.name)
                continue
            if inspect.isawaitable(result):
                self._schedule(result, callback, event)

    def _schedule(self, awaitable: Awaitable[Any], callback: Subscriber, event: Event) -> None:
        import asyncio  # not at the top: the `serve --workers` supervisor loads this module, and no event loop

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # No loop to run it on: close a coroutine so Python does not warn it was never awaited.
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            log.warning("event subscriber %r is async but no event loop is running; %s %s dropped", callback, event.kind, event.name)
            return

        async def run() -> None:
            try:
                await awaitable
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event subscriber %r failed on %s %s", callback, event.kind, event.name)

        task = loop.create_task(run(), name=f"autocert-event-{event.kind}-{event.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def recent(self, limit: int | None = None) -> list[Event]:
        """The latest events, newest first."""
        events = list(reversed(self._recent))
        return events if limit is None else events[:limit]

    async def drain(self) -> None:
        """Wait for the async subscribers already scheduled (used at shutdown and in tests)."""
        import asyncio

        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def log_event(event: Event) -> None:
    """One log line per event; the fields ride along for ``--log-format json``.

    The fields go under one ``extra`` key because ``name`` is a reserved LogRecord attribute.
    """
    transition = f"{event.previous} -> {event.state}" if event.previous and event.previous != event.state else event.state
    level = logging.WARNING if event.kind in ("failed", "expiring", "expired") else logging.INFO
    suffix = f": {event.error}" if event.error else ""
    log.log(
        level,
        "%s %s (%s)%s",
        event.kind,
        event.name,
        transition,
        suffix,
        extra={"autocert_event": {"event": event.kind, "name": event.name, "state": event.state, "previous": event.previous, "error": event.error}},
    )
