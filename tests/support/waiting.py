"""Polling with a deadline, for effects that happen in background jobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], *, within: float = 10.0, interval: float = 0.05) -> T:
    """Call ``probe`` until it returns a truthy value (returned) or ``within`` seconds pass (AssertionError
    with the last value)."""
    deadline = time.monotonic() + within
    last: T | None = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s; last value: {last!r}")
        await asyncio.sleep(interval)
