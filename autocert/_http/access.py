"""The access log, kept off the request path.

A request costs one tuple appended to a list. The lines are made and logged in batches a
moment later, on a timer, through the ``autocert.access`` logger (so ``--log-format json``
applies to them as to every other line); a stream handler gets a whole batch in one write. The line is the combined log format aiohttp's
access logger wrote before: ``ADDRESS [TIME] "REQUEST LINE" STATUS BYTES "REFERER" "USER-AGENT"``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

log = logging.getLogger("autocert.access")

#: How long an entry may wait for its line.
FLUSH_DELAY: Final = 0.25
_FORMAT: Final = '%s [%s] "%s %s HTTP/%s" %d %d "%s" "%s"'


class AccessLog:
    """Collects one entry per answered request and logs them in batches."""

    __slots__ = ("_entries", "_handle")

    def __init__(self) -> None:
        self._entries: list[tuple[object, ...]] = []
        self._handle: asyncio.TimerHandle | None = None

    def add(self, address: str, method: bytes, target: bytes, version: str, status: int, size: int,
            headers: list[tuple[bytes, bytes]]) -> None:
        entries = self._entries
        entries.append((address, time.time(), method, target, version, status, size, headers))
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        self._handle = None
        entries, self._entries = self._entries, []
        if not entries or not log.isEnabledFor(logging.INFO):
            return
        records = []
        for address, when, method, target, version, status, size, headers in entries:
            referer = user_agent = None
            for name, value in headers:  # type: ignore[attr-defined]
                lower = name.lower()
                if lower == b"referer":
                    referer = value
                elif lower == b"user-agent":
                    user_agent = value
            args = (address, time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(when)),  # type: ignore[arg-type]
                    _text(method), _text(target), version, status, size, _text(referer), _text(user_agent))
            record = log.makeRecord(log.name, logging.INFO, __file__, 0, _FORMAT, args, None)
            if log.filter(record):
                records.append(record)
        for handler in _handlers():
            if isinstance(handler, logging.StreamHandler) and type(handler).emit is logging.StreamHandler.emit:
                lines = [handler.format(record) for record in records if record.levelno >= handler.level and handler.filter(record)]
                if lines:
                    with handler.lock:  # type: ignore[union-attr]
                        handler.stream.write(handler.terminator.join(lines) + handler.terminator)
                        handler.flush()
            else:
                for record in records:
                    if record.levelno >= handler.level:
                        handler.handle(record)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self.flush()


def _handlers() -> list[logging.Handler]:
    """The handlers a record of the access logger reaches, as ``Logger.callHandlers`` walks them."""
    found: list[logging.Handler] = []
    logger: logging.Logger | None = log
    while logger is not None:
        found += logger.handlers
        logger = logger.parent if logger.propagate else None
    return found or ([logging.lastResort] if logging.lastResort else [])


def _text(value: object) -> str:
    if not value:
        return "-"
    assert isinstance(value, bytes)
    return value.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')
