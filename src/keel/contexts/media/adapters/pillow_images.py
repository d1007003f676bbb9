"""Images with Pillow. Decoding is CPU-bound, so it runs in a worker thread and never blocks the
event loop of the API process."""

from __future__ import annotations

import asyncio
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from keel.contexts.media.domain.errors import InvalidImage
from keel.contexts.media.domain.model import ImageInfo

_WEBP_QUALITY = 85


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, past its own bomb limit; Keel's limit is checked below instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidImage(_why(exc)) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage(f"The image could not be read: {exc}"[:200]) from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidImage(f"The image is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted.")
    return image


def _why(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "The body is not an image in a format Keel reads (PNG, JPEG, WebP)."
    return "The image decodes to too many pixels."


def _inspect(data: bytes, max_pixels: int) -> ImageInfo:
    image = _open(data, max_pixels)
    try:
        image.load()  # the whole decode: truncated or corrupt data fails here, not in the job
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImage(f"The image data is damaged or truncated ({type(exc).__name__}).") from None
    return ImageInfo(format=image.format or "", width=image.width, height=image.height)


def _square_variant(data: bytes, size: int, max_pixels: int) -> bytes:
    image = _open(data, max_pixels)
    image = ImageOps.exif_transpose(image)  # phones store rotation as EXIF; apply it before cropping
    if image.mode in ("I;16", "I;16L", "I;16B", "I"):
        # 16/32-bit greyscale: convert() would clip to white instead of scaling down to 8 bits.
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    # Alpha comes from the mode or, for RGB, L and palette PNGs, from a tRNS chunk.
    keeps_alpha = image.mode in ("RGBA", "LA", "PA") or image.has_transparency_data
    image = image.convert("RGBA" if keeps_alpha else "RGB")
    image = ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)
    out = io.BytesIO()
    # A fresh image written without exif/icc/xmp arguments carries no metadata (no GPS position).
    image.save(out, format="WEBP", quality=_WEBP_QUALITY, method=4)
    return out.getvalue()


class PillowImageProcessor:
    def __init__(self, *, max_pixels: int) -> None:
        self._max_pixels = max_pixels

    async def inspect(self, data: bytes) -> ImageInfo:
        return await asyncio.to_thread(_inspect, data, self._max_pixels)

    async def square_variant(self, data: bytes, size: int) -> bytes:
        return await asyncio.to_thread(_square_variant, data, size, self._max_pixels)
