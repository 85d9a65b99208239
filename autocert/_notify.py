"""Notifications: tell a person (through a webhook or a command) what happened to a certificate.

Delivery must never get in the way of issuing or serving: :meth:`Notifier.notify` only
schedules work, each delivery is a task of its own with a bounded number running at once, a
failing endpoint is retried with growing delays, and the backlog is capped so a dead webhook
cannot grow memory. Repeats are rate-limited per name and event, so a name that keeps failing
pages once an hour, and a certificate running out reminds once a day, rather than at every
retry or scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import aiohttp

from ._events import Event, EventBus

__all__ = ["NOTIFIED_KINDS", "RATE_LIMITS", "RETRY_DELAYS", "Notifier"]

log = logging.getLogger("autocert.notify")

#: The events worth interrupting someone for; allow/disallow are the operator's own doing.
NOTIFIED_KINDS = frozenset({"issued", "renewed", "failed", "expiring", "expired"})

#: Least time between two notifications of the same event for the same name.
RATE_LIMITS: Mapping[str, timedelta] = {
    "failed": timedelta(hours=1),
    "expiring": timedelta(days=1),
    "expired": timedelta(days=1),
}

#: Waits (seconds) between delivery attempts; one attempt more than there are delays.
RETRY_DELAYS: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0)

#: Deliveries scheduled but not finished beyond which new ones are dropped (with a warning).
MAX_PENDING = 1000


class DeliveryError(Exception):
    """One delivery attempt failed; ``retry`` says whether trying again can help."""

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class Notifier:
    """Deliver events to ``webhook`` (HTTP POST of JSON) and/or ``command`` (shell, JSON on stdin).

    The command gets the event as JSON on standard input and as ``AUTOCERT_EVENT``,
    ``AUTOCERT_NAME``, ``AUTOCERT_STATE`` and ``AUTOCERT_ERROR`` in its environment. A command
    exiting non-zero, or a webhook answering other than 2xx, counts as a failed delivery; a
    4xx other than 408 and 429 is not retried since sending the same body again cannot help.
    """

    def __init__(
        self,
        *,
        webhook: str | None = None,
        command: str | None = None,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        rate_limits: Mapping[str, timedelta] = RATE_LIMITS,
        timeout: float = 10.0,
        command_timeout: float = 30.0,
        concurrency: int = 4,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.webhook = webhook
        self.command = command
        self.retry_delays = tuple(retry_delays)
        self.rate_limits = dict(rate_limits)
        self.timeout = timeout
        self.command_timeout = command_timeout
        self.max_pending = max_pending
        self._limit = asyncio.Semaphore(concurrency)
        self._last_sent: dict[tuple[str, str], datetime] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._unsubscribe: list[Any] = []
        #: Deliveries that succeeded and that were given up, for tests and the curious.
        self.delivered = 0
        self.abandoned = 0

    @property
    def enabled(self) -> bool:
        return bool(self.webhook or self.command)

    def attach(self, bus: EventBus) -> None:
        """Notify about ``bus``'s events from now on."""
        self._unsubscribe.append(bus.subscribe(self.notify))

    # -- scheduling --------------------------------------------------------------------------

    def notify(self, event: Event) -> None:
        """Schedule delivery of ``event`` if it is worth a notification now; never waits."""
        if not self.enabled or event.kind not in NOTIFIED_KINDS or not self._due(event):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.warning("no event loop: %s %s not notified", event.kind, event.name)
            return
        sinks = [sink for sink, on in (("webhook", self.webhook), ("command", self.command)) if on]
        for sink in sinks:
            if len(self._tasks) >= self.max_pending:
                self.abandoned += 1
                log.warning("%d notifications pending; dropping %s %s for the %s", len(self._tasks), event.kind, event.name, sink)
                continue
            task = loop.create_task(self._deliver(sink, event), name=f"autocert-notify-{sink}-{event.kind}-{event.name}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _due(self, event: Event) -> bool:
        """Rate limit per name and event kind; remembers the send when it is due."""
        window = self.rate_limits.get(event.kind)
        key = (event.name, event.kind)
        if window is not None:
            last = self._last_sent.get(key)
            if last is not None and event.at - last < window:
                log.debug("not notifying %s %s again within %s", event.kind, event.name, window)
                return False
            if len(self._last_sent) > 100_000:  # a bound for pathological name churn
                self._last_sent.clear()
            self._last_sent[key] = event.at
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Give pending deliveries ``timeout`` seconds to finish, then cancel the rest."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def drain(self) -> None:
        """Wait until every delivery scheduled so far has finished (tests use this)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- delivery ----------------------------------------------------------------------------

    async def _deliver(self, sink: str, event: Event) -> None:
        send = self._post if sink == "webhook" else self._run_command
        attempts = len(self.retry_delays) + 1
        for attempt in range(1, attempts + 1):
            try:
                async with self._limit:
                    await send(event)
            except DeliveryError as exc:
                if not exc.retry or attempt == attempts:
                    self.abandoned += 1
                    log.error("giving up notifying %s %s by %s after %d attempts: %s", event.kind, event.name, sink, attempt, exc)
                    return
                delay = self.retry_delays[attempt - 1]
                log.warning("notifying %s %s by %s failed (%s); retrying in %.0f s", event.kind, event.name, sink, exc, delay)
                await asyncio.sleep(delay)
            else:
                self.delivered += 1
                log.debug("notified %s %s by %s", event.kind, event.name, sink)
                return

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _post(self, event: Event) -> None:
        assert self.webhook is not None
        try:
            async with self._http().post(self.webhook, json=event.to_dict()) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        if 200 <= status < 300:
            return
        retry = status >= 500 or status in (408, 429)
        raise DeliveryError(f"webhook answered HTTP {status}", retry=retry)

    async def _run_command(self, event: Event) -> None:
        assert self.command is not None
        payload = json.dumps(event.to_dict()).encode() + b"\n"
        env = {
            **os.environ,
            "AUTOCERT_EVENT": event.kind,
            "AUTOCERT_NAME": event.name,
            "AUTOCERT_STATE": event.state,
            "AUTOCERT_ERROR": event.error or "",
        }
        try:
            # A shell, because the operator writes the command as they would in one; event
            # data reaches it only through stdin and the environment, never the command line.
            process = await asyncio.create_subprocess_shell(
                self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise DeliveryError(f"cannot start {self.command!r}: {exc}") from exc
        try:
            output, _ = await asyncio.wait_for(process.communicate(payload), self.command_timeout)
        except asyncio.TimeoutError:
            _kill_group(process)
            await process.wait()
            raise DeliveryError(f"{self.command!r} did not finish within {self.command_timeout:.0f} s") from None
        except BaseException:
            _kill_group(process)
            await process.wait()
            raise
        if process.returncode != 0:
            tail = output.decode(errors="replace").strip()[-500:]
            raise DeliveryError(f"{self.command!r} exited with {process.returncode}" + (f": {tail}" if tail else ""))


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """Kill the command and anything it started (it runs in a session of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
