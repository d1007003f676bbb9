"""The transaction semantics every in-memory unit of work shares: work on a private copy of the
committed state; ``commit`` publishes the copy and the recorded events, leaving discards both."""

from __future__ import annotations

import copy
import dataclasses
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from keel.platform.domain.events import Event
from keel.platform.ports.events import CommittedEventPublisher

S = TypeVar("S")  # a dataclass of dicts, with an ``outbox: list[Event]``


class InMemoryUnitOfWork(Generic[S]):
    def __init__(self, committed: S, publisher: CommittedEventPublisher | None = None) -> None:
        self._committed = committed
        self._publisher = publisher
        self._events: list[Event] = []

    def _bind(self, staged: S) -> None:
        """Create the context's repositories on the staged copy."""
        raise NotImplementedError

    def record(self, event: Event) -> None:
        self._events.append(event)

    async def __aenter__(self) -> Self:
        self._events = []
        self._staged = copy.deepcopy(self._committed)
        self._bind(self._staged)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        del self._staged
        self._events = []

    async def commit(self) -> None:
        committed: Any = self._committed
        for f in dataclasses.fields(committed):
            if f.name != "outbox":
                setattr(committed, f.name, copy.deepcopy(getattr(self._staged, f.name)))
        events, self._events = self._events, []
        committed.outbox.extend(events)
        if events and self._publisher is not None:
            await self._publisher.publish_committed(events)
