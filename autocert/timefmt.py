"""The one way autocert writes a time: ISO 8601 in UTC with a ``Z`` (JSON, logs, pages)."""

from __future__ import annotations

from datetime import datetime, timezone


def isoformat(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
