"""Group commit for round trips: callers that arrive while one batch is on its way go together in the
next one, so concurrent requests share a round trip (a thread hop, a transaction) instead of each paying
for its own. A lone caller is sent at once; nobody waits for a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BatchAbandoned(ConnectionError):
    """The batch runner was cancelled (the process is shutting down) before this item was handled."""


class NextBatch(Generic[T, R]):
    """``send`` takes the waiting items, in order, and returns one outcome per item: a result, or the
    exception that caller gets. An exception raised by ``send`` itself goes to every caller of the batch."""

    def __init__(self, send: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]) -> None:
        self._send = send
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        runner = self._runner
        if runner is None or runner.done() or runner.get_loop() is not loop:
            # Callers of a loop that is gone (a finished test's) cannot be answered any more.
            self._waiting = [w for w in self._waiting if w[1].get_loop() is loop]
            self._runner = loop.create_task(self._run())
        done: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, done))
        # Shielded: a caller that goes away (client disconnect) must not cancel the others' batch.
        return await asyncio.shield(done)

    async def _run(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                outcomes: Sequence[R | BaseException]
                try:
                    outcomes = await self._send([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - every caller of the batch hears of it
                    outcomes = [exc] * len(batch)
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    if done.done():
                        continue
                    if isinstance(outcome, BaseException):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
                batch = []
        finally:
            for _, done in [*batch, *self._waiting]:  # cancelled: nobody is left waiting forever
                if not done.done():
                    done.set_exception(BatchAbandoned("the batch was abandoned (shutting down)"))
            if asyncio.current_task() is self._runner:
                self._runner, self._waiting = None, []
