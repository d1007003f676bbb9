from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    fingerprint: str
    expires_at: datetime
    response: StoredResponse | None  # None while the first request is still in flight


class IdempotencyStore(Protocol):
    """Idempotency keys with a clock the caller controls (``now``), so retention is testable.

    A record is live while ``expires_at > now``; expired records behave as absent.
    """

    async def claim(self, key: str, fingerprint: str, now: datetime, hold_until: datetime) -> IdempotencyRecord | None:
        """Atomically: with no live record, create an in-flight one held until ``hold_until`` and return
        None (the caller now owns the key); otherwise return the live record untouched."""
        ...

    async def complete(self, key: str, fingerprint: str, response: StoredResponse, expires_at: datetime) -> None:
        """Store the response of the request that owns the key, to be replayed until ``expires_at``."""
        ...

    async def release(self, key: str, fingerprint: str) -> None:
        """Forget an in-flight claim (the request ended with a response that is not stored)."""
        ...
