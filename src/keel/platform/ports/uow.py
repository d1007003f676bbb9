from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self

from keel.platform.domain.events import Event


class UnitOfWork(Protocol):
    """One transaction. Events recorded in it are stored with the data and published after commit;
    leaving without ``commit`` rolls back and publishes nothing."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def record(self, event: Event) -> None: ...

    async def commit(self) -> None: ...
