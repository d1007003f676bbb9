"""One storage contract, three backends: the in-memory fake, SQLite and Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keel.platform.adapters.sql.engine import create_engine, session_factory

U = TypeVar("U")

BACKENDS = ["memory", "sqlite", "postgres"]


def backend_of(request: pytest.FixtureRequest) -> str:
    """'memory', or the URL of a fresh migrated database (for a fixture parametrized over BACKENDS)."""
    if request.param == "memory":
        return "memory"
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))


@asynccontextmanager
async def uow_factory(
    backend: str, fake: Callable[[], U], sql: Callable[[async_sessionmaker[AsyncSession]], Any]
) -> AsyncIterator[Callable[[], U]]:
    """Units of work on ``backend``: ``fake()`` in memory, ``sql(sessions)`` on a real database."""
    if backend == "memory":
        yield fake
        return
    engine = create_engine(backend)
    sessions = session_factory(engine)
    try:
        yield lambda: sql(sessions)
    finally:
        await engine.dispose()
