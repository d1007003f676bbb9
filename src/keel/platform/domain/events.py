"""Domain events and their in-process dispatch. Events are facts: named, tenant-scoped, JSON-safe."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keel.platform.domain.ids import new_id


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    type: str  # "<entity>.<past-tense verb>", e.g. "user.updated"
    tenant_id: uuid.UUID
    occurred_at: datetime
    data: Mapping[str, Any]  # JSON-safe values only: it is stored in the outbox and sent to subscribers
    id: uuid.UUID = field(default_factory=new_id)


EventHandler = Callable[[Event], Awaitable[None]]

ANY_EVENT = "*"


class EventDispatcher:
    """Subscribers are registered by the composition root; contexts never import each other to react."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[EventHandler]] = defaultdict(list)

    def subscribe(self, event_type: str, handler: EventHandler) -> None:
        self._handlers[event_type].append(handler)

    def handlers_for(self, event_type: str) -> list[EventHandler]:
        # Subscribers to every event (cache invalidation) run first, so that work an event triggers
        # (an in-process job, say) never reads what the event made stale.
        return [*self._handlers.get(ANY_EVENT, ()), *self._handlers.get(event_type, ())]

    async def dispatch(self, event: Event) -> None:
        """Run every subscriber; the first failure propagates so the outbox keeps the event for a retry.

        Delivery is at least once, so subscribers must be idempotent.

        Subscribers to every event run first and in turn (see ``handlers_for``); the event's own
        subscribers then run together, so their round trips overlap (the jobs a payment owes are enqueued
        in one batch) and each of them still runs even if another fails.
        """
        for handler in self._handlers.get(ANY_EVENT, ()):
            await handler(event)
        own = self._handlers.get(event.type, ())
        if len(own) == 1:
            await own[0](event)
        elif own:
            outcomes = await asyncio.gather(*(handler(event) for handler in own), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome


def event_to_args(event: Event) -> dict[str, Any]:
    """The JSON-safe form of an event, for job arguments."""
    return {
        "id": str(event.id),
        "type": event.type,
        "tenant_id": str(event.tenant_id),
        "occurred_at": event.occurred_at.isoformat(),
        "data": dict(event.data),
    }


def event_from_args(args: Mapping[str, Any]) -> Event:
    return Event(
        id=uuid.UUID(args["id"]),
        type=args["type"],
        tenant_id=uuid.UUID(args["tenant_id"]),
        occurred_at=datetime.fromisoformat(args["occurred_at"]),
        data=dict(args["data"]),
    )


def event_job_id(event_id: uuid.UUID, job_name: str) -> str:
    """The id of the job ``job_name`` that event ``event_id`` triggers: an event the outbox publishes
    twice still makes one job, and whoever knows the event can point at its job."""
    return str(uuid.uuid5(event_id, job_name))
