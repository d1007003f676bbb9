from __future__ import annotations

from typing import Protocol

from keel.contexts.media.domain.model import ImageInfo


class ImageProcessor(Protocol):
    async def inspect(self, data: bytes) -> ImageInfo:
        """Decode ``data`` completely; raise ``InvalidImage`` if it is not an image Keel can read or
        would decode to more pixels than the processor's limit (a decompression bomb)."""
        ...

    async def square_variant(self, data: bytes, size: int) -> bytes:
        """A ``size`` x ``size`` WebP: orientation applied, centre-cropped, metadata stripped."""
        ...
