"""The Pillow image processor on images made in memory: what it accepts, what it refuses (non-images,
damaged data, decompression bombs), and what the variants look like."""

from __future__ import annotations

import io
import os
import struct

import pytest
from PIL import ExifTags, Image, ImageCms

from keel.contexts.media.adapters.pillow_images import PillowImageProcessor
from keel.contexts.media.domain.errors import InvalidImage
from keel.contexts.media.domain.model import MAX_PIXELS, MAX_UPLOAD_BYTES, ImageInfo

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture
def images() -> PillowImageProcessor:
    return PillowImageProcessor(max_pixels=MAX_PIXELS)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def noise(width: int, height: int) -> Image.Image:
    """Incompressible pixels, so that cutting the file cuts image data."""
    return Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))


def bands(width: int, height: int, colours: list[tuple[int, int, int]], *, across: bool = True) -> Image.Image:
    """Equal bands of ``colours``, left to right (``across``) or top to bottom."""
    image = Image.new("RGB", (width, height))
    n = len(colours)
    for i, colour in enumerate(colours):
        if across:
            image.paste(colour, (i * width // n, 0, (i + 1) * width // n, height))
        else:
            image.paste(colour, (0, i * height // n, width, (i + 1) * height // n))
    return image


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def px(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 24) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def riff_chunks(webp: bytes) -> list[str]:
    """The chunk names of a WebP file, read from the bytes rather than through Pillow."""
    assert webp[:4] == b"RIFF"
    assert webp[8:12] == b"WEBP"
    names, at = [], 12
    while at + 8 <= len(webp):
        name, size = webp[at : at + 4].decode("ascii"), struct.unpack("<I", webp[at + 4 : at + 8])[0]
        names.append(name)
        at += 8 + size + (size & 1)
    assert at == len(webp)
    return names


# -- inspect ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
async def test_inspect_reports_format_and_size(images: PillowImageProcessor, fmt: str) -> None:
    data = encode(noise(120, 80), fmt)
    assert await images.inspect(data) == ImageInfo(format=fmt, width=120, height=80)


async def test_inspect_reads_an_rgba_png(images: PillowImageProcessor) -> None:
    data = encode(Image.new("RGBA", (30, 40), (10, 20, 30, 0)), "PNG")
    assert await images.inspect(data) == ImageInfo(format="PNG", width=30, height=40)


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, this is not an image\n", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"],
    ids=["empty", "text", "pdf", "png-signature-only", "jpeg-marker-only"],
)
async def test_inspect_refuses_what_is_not_an_image(images: PillowImageProcessor, data: bytes) -> None:
    with pytest.raises(InvalidImage) as caught:
        await images.inspect(data)
    assert caught.value.code == "invalid-image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
async def test_inspect_refuses_truncated_data(images: PillowImageProcessor, fmt: str) -> None:
    whole = encode(noise(64, 64), fmt)
    assert await images.inspect(whole) == ImageInfo(format=fmt, width=64, height=64)
    with pytest.raises(InvalidImage):
        await images.inspect(whole[: len(whole) // 2])


async def test_inspect_refuses_more_pixels_than_the_limit() -> None:
    images = PillowImageProcessor(max_pixels=10_000)
    with pytest.raises(InvalidImage, match="200x200"):
        await images.inspect(encode(Image.new("RGB", (200, 200), RED), "PNG"))
    # The limit itself is allowed.
    assert await images.inspect(encode(Image.new("RGB", (100, 100), RED), "PNG")) == ImageInfo(
        format="PNG", width=100, height=100
    )


async def test_inspect_refuses_a_small_file_above_the_default_limit(images: PillowImageProcessor) -> None:
    # 49 Mpx: above Keel's 40 Mpx, below the point where Pillow itself warns.
    data = encode(Image.new("1", (7000, 7000)), "PNG")
    assert len(data) < MAX_UPLOAD_BYTES
    with pytest.raises(InvalidImage, match="7000x7000"):
        await images.inspect(data)


async def test_inspect_refuses_a_decompression_bomb(images: PillowImageProcessor) -> None:
    # 100 Mpx in a few kilobytes: decoded as RGB it would take 300 MB.
    bomb = encode(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(InvalidImage):
        await images.inspect(bomb)
    with pytest.raises(InvalidImage):
        await images.square_variant(bomb, 64)


# -- square_variant --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize(("width", "height"), [(640, 480), (90, 300), (16, 16)], ids=["wide", "tall", "tiny"])
async def test_variant_is_a_webp_of_exactly_the_size(
    images: PillowImageProcessor, size: int, width: int, height: int
) -> None:
    out = await images.square_variant(encode(noise(width, height), "JPEG"), size)
    image = decode(out)
    assert image.format == "WEBP"
    assert image.size == (size, size)
    assert out[:4] == b"RIFF"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
async def test_variant_of_each_accepted_format(images: PillowImageProcessor, fmt: str) -> None:
    out = await images.square_variant(encode(Image.new("RGB", (100, 100), BLUE), fmt), 64)
    image = decode(out).convert("RGB")
    assert image.size == (64, 64)
    assert close(px(image, (32, 32)), BLUE)


def rotated_photo() -> bytes:
    """A 200x100 JPEG, red left half and blue right half, that a camera held upright tagged as
    "rotate 90 degrees clockwise to display" (Orientation 6)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return encode(bands(200, 100, [RED, BLUE]), "JPEG", exif=exif, quality=95)


async def test_exif_orientation_is_applied(images: PillowImageProcessor) -> None:
    data = rotated_photo()
    raw = decode(data)
    assert raw.size == (200, 100)
    assert raw.getexif()[ExifTags.Base.Orientation] == 6

    out = decode(await images.square_variant(data, 64)).convert("RGB")
    # Turned upright the photo is portrait: its left (red) half on top, its right (blue) half below.
    for x in (8, 32, 56):
        assert close(px(out, (x, 8)), RED), px(out, (x, 8))
        assert close(px(out, (x, 56)), BLUE), px(out, (x, 56))


XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" dc:creator="Zoe"/></rdf:RDF></x:xmpmeta>'
)


def tagged(fmt: str) -> bytes:
    """A photo carrying everything a phone puts in one: orientation, camera, GPS, ICC profile, XMP."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "Phone"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (48.0, 51.0, 24.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (2.0, 21.0, 7.0)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encode(bands(200, 100, [RED, BLUE]), fmt, exif=exif, icc_profile=icc, xmp=XMP)


METADATA_KEYS = {"exif", "icc_profile", "xmp", "XML:com.adobe.xmp", "dpi", "comment"}


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
async def test_variant_carries_no_metadata(images: PillowImageProcessor, fmt: str) -> None:
    data = tagged(fmt)
    source = decode(data)
    assert {"exif", "icc_profile", "xmp"} <= set(source.info)  # the input really carries them
    assert source.getexif().get_ifd(ExifTags.IFD.GPSInfo)

    out = await images.square_variant(data, 256)
    image = decode(out)
    assert not METADATA_KEYS & set(image.info), image.info
    assert dict(image.getexif()) == {}
    assert not {"EXIF", "ICCP", "XMP "} & set(riff_chunks(out))
    assert b"Phone" not in out
    assert b"xmpmeta" not in out


async def test_rgba_keeps_its_alpha(images: PillowImageProcessor) -> None:
    image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (50, 0, 100, 100))  # left half transparent, right half opaque red
    out = decode(await images.square_variant(encode(image, "PNG"), 64))
    assert out.mode == "RGBA"
    assert px(out, (8, 32))[3] <= 8
    assert px(out, (56, 32))[3] >= 247
    assert close(px(out, (56, 32))[:3], RED)


async def test_palette_transparency_becomes_alpha(images: PillowImageProcessor) -> None:
    image = Image.new("P", (100, 100), 0)
    image.putpalette([*RED, *GREEN])
    image.paste(1, (50, 0, 100, 100))
    out = decode(await images.square_variant(encode(image, "PNG", transparency=0), 64))
    assert out.mode == "RGBA"
    assert px(out, (8, 32))[3] <= 8
    assert close(px(out, (56, 32)), (*GREEN, 255))


@pytest.mark.parametrize("across", [True, False], ids=["wide", "tall"])
async def test_a_non_square_image_is_centre_cropped(images: PillowImageProcessor, across: bool) -> None:
    width, height = (300, 100) if across else (100, 300)
    data = encode(bands(width, height, [RED, GREEN, BLUE], across=across), "PNG")
    out = decode(await images.square_variant(data, 64)).convert("RGB")
    assert close(px(out, (32, 32)), GREEN)
    # Cropped, not squeezed: the side bands are gone, right up to the edges.
    for xy in ((2, 2), (2, 61), (61, 2), (61, 61), (2, 32), (61, 32), (32, 2), (32, 61)):
        assert close(px(out, xy), GREEN), (xy, px(out, xy))


async def test_variant_refuses_more_pixels_than_the_limit() -> None:
    images = PillowImageProcessor(max_pixels=10_000)
    with pytest.raises(InvalidImage):
        await images.square_variant(encode(Image.new("RGB", (200, 200), RED), "PNG"), 64)


async def test_variant_of_a_non_image_is_invalid(images: PillowImageProcessor) -> None:
    with pytest.raises(InvalidImage):
        await images.square_variant(b"not an image", 64)


async def test_a_16_bit_greyscale_png_keeps_its_tones(images: PillowImageProcessor) -> None:
    grey = Image.new("I;16", (80, 80), 0x8000)  # mid-grey
    data = encode(grey, "PNG")
    assert decode(data).mode == "I;16"
    out = decode(await images.square_variant(data, 64)).convert("RGB")
    assert close(px(out, (32, 32)), (128, 128, 128)), px(out, (32, 32))
