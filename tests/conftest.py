"""Session-wide real dependencies: a throwaway Postgres and Redis from the local binaries.

Each test that needs a database gets a fresh one: Postgres clones a migrated template database
(CREATE DATABASE ... TEMPLATE, milliseconds), SQLite copies a migrated template file.
"""

from __future__ import annotations

import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from keel.main import db
from keel.main.logging import configure_logging
from tests.support.servers import PostgresServer, RedisServer, admin_sql, postgres_server, redis_server

TEMPLATE_DB = "keel_template"


def pytest_configure(config: pytest.Config) -> None:
    configure_logging("WARNING", json=True)


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        import asyncio

        # Session fixtures may first be requested from inside an async test's loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, admin_sql(server, f'CREATE DATABASE "{TEMPLATE_DB}"')).result()
        db.upgrade(server.url(TEMPLATE_DB))
        yield server


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
async def redis_url(redis_proc: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_proc.url)
    await client.flushall()
    await client.aclose()
    return redis_proc.url


@pytest.fixture
async def pg_url(pg: PostgresServer) -> AsyncIterator[str]:
    """A fresh, migrated Postgres database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await admin_sql(pg, f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    yield pg.url(name)
    await admin_sql(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "keel.db"
    db.upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh, migrated SQLite database file for one test."""
    target = tmp_path / "keel.db"
    shutil.copy(sqlite_template, target)
    return f"sqlite+aiosqlite:///{target}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Both SQL backends: the embedded default and production."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return str(request.getfixturevalue(name))


# A webhook host that passes the URL checks at creation (a public-looking name) and resolves to
# 127.0.0.1 in this process, so the connection-time guard refuses every delivery to it: deliveries fail
# at once and for good, without any traffic and without depending on the machine's resolver.
REFUSED_HOST = "refused.keel.test"


@pytest.fixture
def refused_host(monkeypatch: pytest.MonkeyPatch) -> str:
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == REFUSED_HOST else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return REFUSED_HOST
