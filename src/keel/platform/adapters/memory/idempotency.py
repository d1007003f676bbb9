from __future__ import annotations

from datetime import datetime

from keel.platform.ports.idempotency import IdempotencyRecord, StoredResponse


class InMemoryIdempotencyStore:
    """Process-local store for the embedded default. Each method runs without awaiting, so it is
    atomic on the event loop."""

    def __init__(self) -> None:
        self._records: dict[str, IdempotencyRecord] = {}

    async def claim(self, key: str, fingerprint: str, now: datetime, hold_until: datetime) -> IdempotencyRecord | None:
        current = self._records.get(key)
        if current is not None and current.expires_at > now:
            return current
        self._records[key] = IdempotencyRecord(fingerprint=fingerprint, expires_at=hold_until, response=None)
        self._sweep(now)
        return None

    def _sweep(self, now: datetime) -> None:
        if len(self._records) > 10_000:
            for k in [k for k, r in self._records.items() if r.expires_at <= now]:
                del self._records[k]

    async def complete(self, key: str, fingerprint: str, response: StoredResponse, expires_at: datetime) -> None:
        current = self._records.get(key)
        if current is not None and current.fingerprint == fingerprint and current.response is None:
            self._records[key] = IdempotencyRecord(fingerprint=fingerprint, expires_at=expires_at, response=response)

    async def release(self, key: str, fingerprint: str) -> None:
        current = self._records.get(key)
        if current is not None and current.fingerprint == fingerprint and current.response is None:
            del self._records[key]
