"""Alembic environment: async engine from Keel's settings, metadata from every context's models."""

from __future__ import annotations

import asyncio

from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import context
from sqlalchemy.engine import Connection

from keel.main.db import all_metadata
from keel.platform.adapters.sql.engine import create_engine

config = context.config
target_metadata = all_metadata()


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: run migrations through `keel migrate`")
    return str(url)


def _compare_type(
    _ctx: object, _inspected_col: object, _metadata_col: object, _inspected_type: object, metadata_type: object
) -> bool | None:
    # Portable decorated types reflect as their storage type (GUID as NUMERIC(16) on SQLite);
    # they are equal by construction, so only undecorated types get alembic's default comparison.
    if isinstance(metadata_type, (GUID, DateTimeUTC)):
        return False
    return None


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
        render_as_batch=True,
        compare_type=_compare_type,
        literal_binds=connection is None,
        user_module_prefix="advanced_alchemy.types.",
    )


def run_migrations_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_sync(connection)
        return
    engine = create_engine(_url())
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run_sync)
            await conn.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
