from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from tests.support.app import client_for, make_settings, signup


@pytest.fixture
async def client(pg_url: str, tmp_path: Path) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """The real app on a fresh Postgres database."""
    async with client_for(make_settings(pg_url, tmp_path)) as c:
        yield c


@pytest.fixture
async def tenant(client: AsyncTestClient[Litestar]) -> dict[str, Any]:
    return await signup(client, "Acme", "owner@acme.test")


@pytest.fixture
async def other_tenant(client: AsyncTestClient[Litestar]) -> dict[str, Any]:
    return await signup(client, "Globex", "owner@globex.test")
