from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from keel.platform.domain.events import Event


class CommittedEventPublisher(Protocol):
    """Publishes events right after their transaction committed (the fast path of the outbox relay)."""

    async def publish_committed(self, events: Sequence[Event]) -> None:
        """Must not raise: a failure leaves the events to the relay's sweep."""
        ...
