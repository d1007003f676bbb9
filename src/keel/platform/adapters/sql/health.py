from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


class SqlHealthCheck:
    component_type = "datastore"

    def __init__(self, engine: AsyncEngine, name: str) -> None:
        self._engine = engine
        self.name = name

    async def check(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
