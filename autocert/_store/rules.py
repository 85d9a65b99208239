"""The status rules (:mod:`autocert._status_rules`) written in SQLAlchemy over the status
index (:mod:`.names`): its columns, and the unary ``+`` that keeps SQLite's planner off an
index (see the plans there)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import and_, literal_column, or_, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from .records import _names


class unindexed(FunctionElement[Any]):
    """A column SQLite may not use an index for (``+column``); as it is elsewhere."""

    inherit_cache = True
    name = "unindexed"

    def __init__(self, column: Any) -> None:
        super().__init__(column)
        self.type = column.type


@compiles(unindexed)
def _plain(element: unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


@compiles(unindexed, "sqlite")
def _plus(element: unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return "+" + compiler.process(element.clauses, **kw)


class AlchemyColumns:
    """Columns of the status index by name (:class:`autocert._status_rules.Columns`), those
    not in ``indexed`` kept from SQLite's planner."""

    zero: Any = literal_column("0")
    and_ = staticmethod(and_)
    or_ = staticmethod(or_)
    true = staticmethod(true)

    def __init__(self, indexed: Collection[str]) -> None:
        self.indexed = indexed

    def __call__(self, name: str) -> Any:
        return _names.c[name] if name in self.indexed else unindexed(_names.c[name])
