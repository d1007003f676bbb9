from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from loguru import logger
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keel.main.logging import json_line
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


@pytest.fixture
def json_logs() -> Iterator[list[dict[str, Any]]]:
    """Every log record (from any thread), rendered as production renders it and parsed back."""
    lines: list[dict[str, Any]] = []
    handler = logger.add(lambda message: lines.append(json.loads(json_line(message))), level="DEBUG")
    yield lines
    logger.remove(handler)


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    """A tracer provider that keeps every finished span in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter
