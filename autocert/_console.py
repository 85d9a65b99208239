"""What the commands print: aligned tables, the status table coloured on a terminal and
streamed chunk by chunk, JSON, and the log line formats.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from ._issuers import ca_label
from ._timefmt import isoformat


def emit_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2))


def print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) if rows else len(headers[i]) for i in range(len(headers))]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def setup_logging(log_format: str = "text", level: int = logging.INFO, *, worker: int | None = None) -> None:
    """Log to stderr in ``log_format``; a worker of ``serve --workers`` says which it is on
    every line (``[worker N]``, or ``"worker": N`` in JSON), as the workers share the stream."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter(worker=worker))
    else:
        tag = "" if worker is None else f"[worker {worker}] "
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Neither format shows them, and every record (one per request with the access log)
    # would look them up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; event lines also carry ``event``, ``name``, ``state``, ``error``."""

    def __init__(self, *, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": isoformat(datetime.fromtimestamp(record.created, timezone.utc)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            payload["worker"] = self.worker
        fields = getattr(record, "autocert_event", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


#: ANSI colours per state, used only when stdout is a terminal (and NO_COLOR is unset).
STATE_COLOURS = {
    "valid": "32",  # green
    "failed": "1;31",  # bold red
    "expired": "1;31",
    "issuing": "33",  # yellow
    "renewing": "33",
    "pending": "36",  # cyan
    "disallowed": "2",  # dim
}


STATUS_HEADERS = ["NAME", "STATE", "DAYS LEFT", "NOT AFTER", "RENEW AT", "ATTEMPTS", "NEXT ATTEMPT", "CA", "LAST ERROR"]


TIME_WIDTH = len("2026-05-01 12:00Z")


def use_colour(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def days_left(not_after: str | None, now: datetime) -> str:
    if not not_after:
        return "-"
    days = (datetime.fromisoformat(not_after.replace("Z", "+00:00")) - now).total_seconds() / 86400
    return f"{days:.1f}" if abs(days) < 10 else f"{days:.0f}"


def short_time(value: str | None) -> str:
    """ISO 8601 to minutes ("2026-05-01 12:00Z"): seconds only widen the table."""
    return value[:16].replace("T", " ") + "Z" if value else "-"


async def print_status(chunks: AsyncIterator[list[dict[str, Any]]], *, as_json: bool, colour: bool | None = None,
                       widths: Callable[[], Awaitable[tuple[int, int]]] | None = None) -> None:
    """The report as JSON (one STATUS object a line) or as an aligned table whose state is
    coloured on a terminal, printed chunk by chunk as the database hands them over."""
    if as_json:
        print('{"certificates": [', end="")
        separator = "\n"
        async for chunk in chunks:
            for item in chunk:
                print(separator + json.dumps(item), end="")
                separator = ",\n"
        print("\n]}")
        return
    colour = use_colour() if colour is None else colour
    now = datetime.now(timezone.utc)
    first = await anext(chunks, [])
    second = await anext(chunks, None)
    sizes = [len(header) for header in STATUS_HEADERS]
    rows = [_status_cells(item, now) for item in first]
    for row in rows:
        sizes = [max(size, len(cell)) for size, cell in zip(sizes, row)]
    if second is not None and widths is not None:  # more to come: size for the longest there is
        longest_name, most_attempts = await widths()
        fixed = (max(longest_name, sizes[0]), len("disallowed"), 9, TIME_WIDTH, TIME_WIDTH, len(str(most_attempts)), TIME_WIDTH)
        sizes[: len(fixed)] = [max(size, width) for size, width in zip(sizes, fixed)]
    print(_status_line(STATUS_HEADERS, sizes, False))
    for row in rows:
        print(_status_line(row, sizes, colour))
    while second is not None:
        for item in second:
            print(_status_line(_status_cells(item, now), sizes, colour))
        second = await anext(chunks, None)


def _status_cells(item: dict[str, Any], now: datetime) -> list[str]:
    return [item["name"], item["state"], days_left(item["not_after"], now), short_time(item["not_after"]), short_time(item["renew_at"]),
            str(item["attempts"]), short_time(item["next_attempt_at"]), ca_label(item["ca"]) if item["ca"] else "-",
            item["last_error"] or "-"]


def _status_line(cells: list[str], widths: list[int], paint: bool) -> str:
    parts = []
    for i, (cell, width) in enumerate(zip(cells, widths)):
        padded = cell.rjust(width) if i in (2, 5) else cell.ljust(width)
        if paint and i == 1 and cell in STATE_COLOURS:
            padded = f"\x1b[{STATE_COLOURS[cell]}m{cell}\x1b[0m" + " " * (width - len(cell))
        parts.append(padded)
    return "  ".join(parts).rstrip()
