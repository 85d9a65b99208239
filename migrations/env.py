"""Alembic environment for autocert.

autocert runs migrations from code (``autocert db upgrade`` and every ``Store.open``), passing
a synchronous connection obtained from ``AsyncConnection.run_sync`` in
``config.attributes["connection"]``. The caller owns that connection's transaction and any
lock around it, so this file only configures the context and runs the scripts.

For development, ``sqlalchemy.url`` may be set instead (for example to autogenerate a new
revision); an async engine is then created here, since autocert ships only async drivers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from autocert._models import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs: Any) -> None:
    # Batch mode lets later migrations alter tables on SQLite, which lacks most ALTER TABLE.
    context.configure(target_metadata=target_metadata, render_as_batch=True, compare_type=True, **kwargs)


def _run_with(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_url(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_with)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("pass a connection in config.attributes['connection'] or set sqlalchemy.url")
    asyncio.run(_run_with_url(url))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
