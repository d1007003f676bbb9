from __future__ import annotations

from collections.abc import Sequence

from keel.platform.domain.events import Event, EventDispatcher


class InlinePublisher:
    """Dispatches committed events at once, like the outbox relay's fast path, and keeps them."""

    def __init__(self, dispatcher: EventDispatcher) -> None:
        self.dispatcher = dispatcher
        self.published: list[Event] = []

    async def publish_committed(self, events: Sequence[Event]) -> None:
        for event in events:
            await self.dispatcher.dispatch(event)
            self.published.append(event)
