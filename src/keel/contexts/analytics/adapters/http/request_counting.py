"""Counting API requests per tenant at the cost of a dictionary increment: counts collect in the
process and a background task adds them to the shared tally every second, so no request waits on
Redis. A crash loses at most that second's counts; shutdown flushes what is left."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from datetime import date

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send
from loguru import logger

from keel.contexts.analytics.ports.tally import RequestTally
from keel.platform.domain.tenancy import Principal
from keel.platform.ports.clock import Clock

FLUSH_EVERY = 1.0


class RequestCounter:
    def __init__(self, tally: RequestTally, clock: Clock) -> None:
        self._tally = tally
        self._clock = clock
        self._counts: Counter[tuple[uuid.UUID, date]] = Counter()
        self._task: asyncio.Task[None] | None = None

    def hit(self, tenant_id: uuid.UUID) -> None:
        self._counts[(tenant_id, self._clock.now().date())] += 1

    async def flush(self) -> None:
        counts, self._counts = self._counts, Counter()
        if not counts:
            return
        try:
            await self._tally.add(counts)
        except Exception as exc:  # noqa: BLE001 - keep the counts for the next flush; analytics must not break requests
            self._counts.update(counts)
            logger.warning("request counts not flushed, retrying: {!r}", exc)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="request-counter-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self.flush()


class RequestCountingMiddleware:
    """After authentication: counts every request made with a tenant's API key, whatever its outcome."""

    def __init__(self, app: ASGIApp, counter: RequestCounter) -> None:
        self.app = app
        self._counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == ScopeType.HTTP:
            user = scope.get("user")
            if isinstance(user, Principal):
                self._counter.hit(user.tenant_id)
        await self.app(scope, receive, send)
