"""The one clock and the one way autocert writes a time.

Every time autocert stores or compares is an aware UTC datetime from :func:`utcnow`; every
time it shows (JSON, logs, pages) is ISO 8601 in UTC with a ``Z`` from :func:`isoformat`.
"""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    """The current time as an aware UTC datetime, the only kind the schema stores."""
    return datetime.now(timezone.utc)


def isoformat(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
