"""Facts about the database that need neither SQLAlchemy nor Alembic: where the migration
scripts are and which schema revision is the newest (every command checks the schema, and
``autocert status`` must not pay for importing either), and the limits that bound a query.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from ._errors import StoreError

#: How long SQLite waits for another process's lock before giving up. Writes take
#: milliseconds; the margin covers a migration running in another process.
SQLITE_BUSY_TIMEOUT = 30.0

#: The URL schemes users write for each backend; autocert picks the (async) driver itself.
SQLITE_SCHEMES = ("sqlite", "sqlite+aiosqlite")
POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg", "postgres+asyncpg")

#: Values bound per ``IN (...)`` query: well under the bound-parameter limits of SQLite (32766)
#: and asyncpg (32767).
PARAMETERS_PER_QUERY = 500

_T = TypeVar("_T")


def chunked(items: Iterable[_T], size: int = PARAMETERS_PER_QUERY) -> Iterator[list[_T]]:
    """The distinct items, in their first order, a bounded number per ``IN (...)`` query."""
    distinct = list(dict.fromkeys(items))
    for start in range(0, len(distinct), size):
        yield distinct[start : start + size]


def migrations_path() -> Path:
    """Where the Alembic scripts are: packaged in the wheel, or the top-level source folder."""
    package_dir = Path(__file__).resolve().parent
    packaged = package_dir / "_migrations"
    if packaged.is_dir():
        return packaged
    return package_dir.parent / "migrations"


_REVISION_LINE = re.compile(r"""^(down_revision|revision)\s*(?::[^=]*)?=\s*(?:["']([^"']+)["']|None)""", re.MULTILINE)


@functools.cache
def head_revision() -> str:
    """The newest schema revision this version of autocert knows.

    Read from the migration scripts' ``revision``/``down_revision`` lines rather than through
    Alembic (with Mako, ~0.1 s of imports needed only when there is something to migrate).
    A test holds this to Alembic's answer.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in sorted((migrations_path() / "versions").glob("*.py")):
        found = dict((key, value) for key, value in _REVISION_LINE.findall(script.read_text(encoding="utf-8")))
        if found.get("revision"):
            revisions.add(found["revision"])
        if found.get("down_revision"):
            parents.add(found["down_revision"])
    heads = sorted(revisions - parents)
    if len(heads) != 1:
        raise StoreError(f"migrations in {migrations_path()} have {len(heads)} heads; expected exactly one")
    return heads[0]
