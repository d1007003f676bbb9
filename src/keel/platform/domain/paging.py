"""Keyset (cursor) pagination over time-ordered ids: stable under concurrent inserts, O(limit) per page."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

MAX_PAGE_SIZE = 100


class HasId(Protocol):
    @property
    def id(self) -> uuid.UUID: ...


T = TypeVar("T", bound=HasId)


@dataclass(frozen=True, slots=True)
class PageRequest:
    limit: int = 50
    after: uuid.UUID | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}")

    @property
    def fetch(self) -> int:
        """Rows to read: one extra tells whether another page exists without a COUNT."""
        return self.limit + 1


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: Sequence[T]
    next_after: uuid.UUID | None

    @classmethod
    def from_overfetch(cls, rows: Sequence[T], request: PageRequest) -> Page[T]:
        items = list(rows[: request.limit])
        has_more = len(rows) > request.limit
        return cls(items=items, next_after=items[-1].id if has_more else None)
