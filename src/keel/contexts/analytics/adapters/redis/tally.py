"""Request counts in Redis: one hash of running counts that every API process adds to, renamed
aside atomically when the flush job claims it."""

from __future__ import annotations

import uuid
from datetime import date

from redis.asyncio import Redis

from keel.contexts.analytics.ports.repositories import RequestCounts
from keel.contexts.analytics.ports.tally import TallyBatch

_BATCH_FIELD = "~batch"
# Claim: keep an unfinished claim (its job died before storing or before ``done``), else move the
# running counts aside under a new batch id. RENAME makes the move atomic with respect to HINCRBY.
_TAKE = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    return nil
  end
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return redis.call('HGETALL', KEYS[2])
"""
_DONE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _field(tenant_id: uuid.UUID, day: date) -> str:
    return f"{tenant_id}|{day.isoformat()}"


class RedisRequestTally:
    def __init__(self, client: Redis, prefix: str = "keel:analytics:requests") -> None:
        self._r = client
        self._running = prefix
        self._claimed = prefix + ":claimed"
        self._take = client.register_script(_TAKE)
        self._done = client.register_script(_DONE)

    async def add(self, counts: RequestCounts) -> None:
        if not counts:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for (tenant_id, day), n in counts.items():
                pipe.hincrby(self._running, _field(tenant_id, day), n)
            await pipe.execute()

    async def take(self) -> TallyBatch | None:
        flat = await self._take(keys=[self._running, self._claimed], args=[_BATCH_FIELD, uuid.uuid4().hex])
        if not flat:
            return None
        entries = {_text(k): _text(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
        batch_id = entries.pop(_BATCH_FIELD)
        counts: dict[tuple[uuid.UUID, date], int] = {}
        for field, value in entries.items():
            tenant, _, day = field.partition("|")
            counts[(uuid.UUID(tenant), date.fromisoformat(day))] = int(value)
        return TallyBatch(batch_id, counts)

    async def done(self, batch_id: str) -> None:
        await self._done(keys=[self._claimed], args=[_BATCH_FIELD, batch_id])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
