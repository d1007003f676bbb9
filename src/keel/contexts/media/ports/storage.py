from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Blob:
    data: bytes
    content_type: str


class BlobStore(Protocol):
    """Opaque bytes under keys like ``avatars/<tenant>/<user>/<upload>/256.webp``. Adapters: the
    filesystem (default); the interface admits an S3-compatible store."""

    async def put(self, key: str, data: bytes, content_type: str) -> None: ...

    async def get(self, key: str) -> Blob | None: ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under ``prefix`` (a key up to a ``/``); returns how many."""
        ...
