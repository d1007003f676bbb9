"""Avatars over HTTP on the embedded default (SQLite, jobs run in-process, blobs under
``<data_dir>/blobs``): uploads validated at the edge (415, 413, 422) and stored with nothing left
behind when refused, square WebP variants made by the processing job and served with an ``ETag``
(304 on ``If-None-Match``), ``avatar_url`` on the profile (fresh although the profile was cached),
tenant isolation, re-uploads replacing the previous blobs, a deleted user's avatar removed, EXIF
orientation applied and metadata stripped, and the binary request body in the OpenAPI document.

"Before processing finishes" is made deterministic by building the app with a container whose
in-process job queue is *held*: ``InProcessJobQueue.start`` is replaced on that instance by a no-op,
so the job the upload enqueues is recorded (``queued``) and nothing runs it; ``Held.release`` then
starts the real runners on the app's own loop (jobs enqueued before the runners existed are picked
up, as ``start`` documents), and the same upload is processed.
"""

from __future__ import annotations

import asyncio
import io
import os
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from PIL import ExifTags, Image
from sqlalchemy import event, select

from keel.contexts.media.adapters.sql.models import AvatarRow
from keel.contexts.media.domain.model import MAX_UPLOAD_BYTES
from keel.contexts.media.domain.services import FORGET_JOB, PROCESS_JOB
from keel.main.container import Container, build_container
from keel.platform.adapters.jobs.in_process import InProcessJobQueue
from keel.platform.adapters.sql.outbox import OutboxRow
from keel.platform.domain.events import event_job_id
from tests.support.app import client_for, finished_job, job, make_settings, signup
from tests.support.waiting import eventually

Client = AsyncTestClient[Litestar]
PROBLEM = "application/problem+json"
ACCEPTED = ("image/png", "image/jpeg", "image/webp")
T = TypeVar("T")

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


# -- images ----------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def banded(width: int = 400, height: int = 200) -> Image.Image:
    """Green | red | blue in vertical bands; the centred square of a 2:1 image is all red."""
    image = Image.new("RGB", (width, height), RED)
    quarter = width // 4
    image.paste(GREEN, (0, 0, quarter, height))
    image.paste(BLUE, (width - quarter, 0, width, height))
    return image


def png(color: tuple[int, int, int] = RED, size: tuple[int, int] = (300, 300)) -> bytes:
    return encode(Image.new("RGB", size, color), "PNG")


def noisy_png(width: int, height: int) -> bytes:
    """Incompressible pixels: the PNG is about ``width * height * 3`` bytes."""
    return encode(Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)), "PNG")


def rgba_png() -> bytes:
    """The left half transparent, the right half opaque red."""
    image = Image.new("RGBA", (200, 200), (0, 0, 0, 0))
    image.paste((*RED, 255), (100, 0, 200, 200))
    return encode(image, "PNG")


@cache
def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A tiny file (a few KB) that decodes to ``width * height`` pixels."""
    return encode(Image.new("1", (width, height), 0), "PNG", optimize=True)


def exif_jpeg() -> bytes:
    """A photo as a phone stores it: the pixels lie on their side (red left, blue right) and EXIF
    Orientation 6 says "rotate 90° clockwise to display" (red on top, blue below); GPS data too."""
    upright = Image.new("RGB", (300, 300), RED)
    upright.paste(BLUE, (0, 150, 300, 300))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: top goes left
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "KeelPhone"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (48.0, 51.0, 24.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (2.0, 21.0, 7.0)
    return encode(stored, "JPEG", quality=95, exif=exif)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def riff_chunks(data: bytes) -> list[bytes]:
    """The FourCCs of a WebP file's chunks."""
    assert (data[:4], data[8:12]) == (b"RIFF", b"WEBP"), data[:16]
    chunks, offset = [], 12
    while offset + 8 <= len(data):
        fourcc, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        chunks.append(fourcc)
        offset += 8 + size + (size & 1)
    return chunks


def near(pixel: Any, expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True))


# -- the app ---------------------------------------------------------------------------------------


@pytest.fixture
async def client(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Client]:
    async with client_for(make_settings(sqlite_url, tmp_path)) as c:
        yield c


@pytest.fixture
async def tenant(client: Client) -> dict[str, Any]:
    return await signup(client, "Acme", "owner@acme.test")


@dataclass
class Held:
    """The app with its in-process job queue recorded but not running."""

    client: Client
    queue: InProcessJobQueue

    async def release(self) -> None:
        async def start() -> None:
            InProcessJobQueue.start(self.queue)  # the real method, on the app's loop

        await on_app(self.client, start)


@pytest.fixture
async def held(sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Held]:
    settings = make_settings(sqlite_url, tmp_path)
    container = build_container(settings)
    assert isinstance(container.jobs, InProcessJobQueue)
    monkeypatch.setattr(container.jobs, "start", lambda: None)
    async with client_for(settings, container=container) as c:
        yield Held(c, container.jobs)


def container_of(client: Client) -> Container:
    return cast(Container, client.app.state["container"])


async def on_app(client: Client, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``fn(*args)`` on the app's own event loop, where its engine lives."""
    return await asyncio.to_thread(client.blocking_portal.call, fn, *args)


class SqlCounter:
    """The SQL statements the app runs, to tell a cached read from a database read."""

    def __init__(self, client: Client) -> None:
        self.statements: list[str] = []
        event.listen(container_of(client).engine.sync_engine, "before_cursor_execute", self._record)

    def _record(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.statements.append(statement)


# -- helpers ---------------------------------------------------------------------------------------


def avatar_path(user_id: str) -> str:
    return f"/v1/users/{user_id}/avatar"


async def add_user(client: Client, tenant: dict[str, Any], email: str = "ada@acme.test") -> dict[str, Any]:
    r = await client.post("/v1/users", json={"email": email, "name": "Ada"}, headers=tenant["headers"])
    assert r.status_code == 201, r.text
    user: dict[str, Any] = r.json()
    return user


async def upload(
    client: Client, tenant: dict[str, Any], user_id: str, data: bytes, content_type: str | None
) -> httpx.Response:
    headers = dict(tenant["headers"])
    if content_type is not None:
        headers["Content-Type"] = content_type
    return await client.put(avatar_path(user_id), content=data, headers=headers)


async def processed(client: Client, tenant: dict[str, Any], job_id: str) -> None:
    done = await finished_job(client, tenant, job_id)
    assert (done["type"], done["status"], done["result"], done["error"]) == (
        PROCESS_JOB,
        "succeeded",
        {"outcome": "ready"},
        None,
    ), done


async def uploaded(
    client: Client, tenant: dict[str, Any], user_id: str, data: bytes, content_type: str = "image/png"
) -> str:
    """Upload and wait for the variants; returns the job id."""
    r = await upload(client, tenant, user_id, data, content_type)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    await processed(client, tenant, job_id)
    return job_id


async def get_avatar(
    client: Client, tenant: dict[str, Any], user_id: str, size: Any = None, if_none_match: str | None = None
) -> httpx.Response:
    headers = dict(tenant["headers"])
    if if_none_match is not None:
        headers["If-None-Match"] = if_none_match
    params = {} if size is None else {"size": size}
    return await client.get(avatar_path(user_id), params=params, headers=headers)


def served(r: httpx.Response, size: int) -> Image.Image:
    """Check a served variant's headers and dimensions; returns it decoded."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/webp"
    assert r.headers["cache-control"] == "private, no-cache"
    etag = r.headers["etag"]
    assert (etag[0], etag[-1], len(etag) > 2) == ('"', '"', True), etag
    image = decode(r.content)
    assert (image.format, image.size) == ("WEBP", (size, size))
    return image


async def get_user(client: Client, tenant: dict[str, Any], user_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/users/{user_id}", headers=tenant["headers"])
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


def assert_problem(r: httpx.Response, status: int, slug: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    if slug is not None:
        assert body["type"] == f"/problems/{slug}", body
    return body


def blob_files(data_dir: Path, tenant: dict[str, Any], user_id: str) -> list[str]:
    """Every file under the user's avatar blobs, relative to them."""
    root = data_dir / "blobs" / "avatars" / tenant["tenant"]["id"] / user_id
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


async def avatar_row(client: Client, tenant: dict[str, Any], user_id: str) -> AvatarRow | None:
    """The user's avatar record, as the tenant owns it."""

    async def read() -> AvatarRow | None:
        stmt = select(AvatarRow).where(
            AvatarRow.tenant_id == uuid.UUID(tenant["tenant"]["id"]), AvatarRow.user_id == uuid.UUID(user_id)
        )
        async with container_of(client).sessions() as s:
            return (await s.execute(stmt)).scalar_one_or_none()

    return await on_app(client, read)


async def outbox_types(client: Client, tenant: dict[str, Any]) -> list[str]:
    """The types of the tenant's events in the outbox."""

    async def read() -> list[str]:
        stmt = select(OutboxRow.type).where(OutboxRow.tenant_id == uuid.UUID(tenant["tenant"]["id"]))
        async with container_of(client).sessions() as s:
            return list((await s.execute(stmt)).scalars())

    return await on_app(client, read)


def recorded_job_names(client: Client, tenant: dict[str, Any]) -> list[str]:
    """The names of the tenant's jobs the in-process queue holds (queued, running or done). The
    queue has no listing in its port, so this reads its records directly."""
    queue = container_of(client).jobs
    assert isinstance(queue, InProcessJobQueue)
    return [j.name for j in queue._jobs.values() if str(j.tenant_id) == tenant["tenant"]["id"]]


async def assert_nothing_stored(client: Client, data_dir: Path, tenant: dict[str, Any], user_id: str) -> None:
    assert blob_files(data_dir, tenant, user_id) == []
    assert await avatar_row(client, tenant, user_id) is None
    assert "avatar.uploaded" not in await outbox_types(client, tenant)
    assert PROCESS_JOB not in recorded_job_names(client, tenant)


# -- uploads that become variants --------------------------------------------------------------------


UPLOADS = [
    pytest.param("image/png", lambda: encode(banded(), "PNG"), id="png"),
    pytest.param("image/jpeg", lambda: encode(banded(), "JPEG", quality=95), id="jpeg"),
    pytest.param("image/webp", lambda: encode(banded(), "WEBP", quality=95), id="webp"),
    pytest.param("image/png", lambda: encode(banded().convert("P"), "PNG"), id="palette-png"),
]


@pytest.mark.parametrize(("content_type", "make"), UPLOADS)
async def test_an_upload_becomes_square_webp_variants_served_with_an_etag(
    client: Client, tenant: dict[str, Any], tmp_path: Path, content_type: str, make: Callable[[], bytes]
) -> None:
    user_id = tenant["user"]["id"]
    r = await upload(client, tenant, user_id, make(), content_type)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) == {"job_id", "status_url"}
    job_id = accepted["job_id"]
    assert accepted["status_url"] == f"/v1/jobs/{job_id}" == r.headers["location"]
    # The job follows from the upload (its avatar.uploaded event shares the upload's id).
    row = await avatar_row(client, tenant, user_id)
    assert row is not None
    assert row.original_type == content_type
    assert job_id == event_job_id(row.upload_id, PROCESS_JOB)

    await processed(client, tenant, job_id)
    upload_id = str(row.upload_id)
    assert set(blob_files(tmp_path, tenant, user_id)) >= {
        f"{upload_id}/original",
        f"{upload_id}/64.webp",
        f"{upload_id}/256.webp",
    }

    small, large, default = (
        await get_avatar(client, tenant, user_id, 64),
        await get_avatar(client, tenant, user_id, 256),
        await get_avatar(client, tenant, user_id),
    )
    for response, size in ((small, 64), (large, 256), (default, 256)):
        image = served(response, size).convert("RGB")
        # Centre-cropped: the 2:1 image's green and blue bands fall outside the square.
        for x, y in ((1, 1), (size - 2, 1), (size // 2, size // 2), (1, size - 2), (size - 2, size - 2)):
            assert near(image.getpixel((x, y)), RED), (size, (x, y), image.getpixel((x, y)))
    assert (default.content, default.headers["etag"]) == (large.content, large.headers["etag"])
    assert small.headers["etag"] != large.headers["etag"]

    # Revalidation: the same ETag is 304 without a body; any other is the image again.
    revalidated: list[tuple[int | None, httpx.Response]] = [(64, small), (256, large), (None, large)]
    for asked, first in revalidated:
        etag = first.headers["etag"]
        same = await get_avatar(client, tenant, user_id, asked, if_none_match=etag)
        assert (same.status_code, same.content) == (304, b"")
        assert same.headers["etag"] == etag
        assert same.headers["cache-control"] == "private, no-cache"
        listed = await get_avatar(client, tenant, user_id, asked, if_none_match=f'"other", {etag}')
        assert (listed.status_code, listed.content) == (304, b"")
        other = await get_avatar(client, tenant, user_id, asked, if_none_match='"not-the-etag"')
        assert (other.status_code, other.content, other.headers["etag"]) == (200, first.content, etag)
    # One variant's ETag does not revalidate the other.
    crossed = await get_avatar(client, tenant, user_id, 256, if_none_match=small.headers["etag"])
    assert (crossed.status_code, crossed.content) == (200, large.content)


async def test_transparency_is_kept(client: Client, tenant: dict[str, Any]) -> None:
    user_id = tenant["user"]["id"]
    await uploaded(client, tenant, user_id, rgba_png())
    image = served(await get_avatar(client, tenant, user_id, 256), 256).convert("RGBA")
    alpha = image.getchannel("A")
    assert cast(int, alpha.getpixel((20, 128))) < 20  # transparent half
    assert near(image.getpixel((236, 128)), (*RED, 255))


async def test_an_upload_above_the_general_body_limit_but_within_5_mib_is_accepted(
    client: Client, tenant: dict[str, Any]
) -> None:
    data = noisy_png(900, 900)  # ~2.4 MB: more than the 1 MiB JSON bodies get, less than 5 MiB
    assert container_of(client).settings.max_body_bytes < len(data) < MAX_UPLOAD_BYTES
    user_id = tenant["user"]["id"]
    await uploaded(client, tenant, user_id, data)
    served(await get_avatar(client, tenant, user_id, 64), 64)


async def test_a_rotated_photo_is_served_upright_without_its_exif_or_gps(
    client: Client, tenant: dict[str, Any], tmp_path: Path
) -> None:
    photo = exif_jpeg()
    # The upload really carries the orientation and a GPS position.
    original = decode(photo).getexif()
    assert original[ExifTags.Base.Orientation] == 6
    assert original.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] == "N"

    user_id = tenant["user"]["id"]
    await uploaded(client, tenant, user_id, photo, "image/jpeg")
    for size in (64, 256):
        r = await get_avatar(client, tenant, user_id, size)
        image = served(r, size)
        assert len(image.getexif()) == 0
        assert not {"exif", "xmp", "icc_profile"} & set(image.info), image.info
        assert not {b"EXIF", b"XMP ", b"ICCP"} & set(riff_chunks(r.content)), riff_chunks(r.content)
        rgb = image.convert("RGB")
        # Upright: red on top, blue below (unrotated it would be red left, blue right).
        quarter, three = size // 4, size - size // 4
        for x, y, color in (
            (quarter, quarter, RED),
            (three, quarter, RED),
            (quarter, three, BLUE),
            (three, three, BLUE),
        ):
            assert near(rgb.getpixel((x, y)), color), (size, (x, y), rgb.getpixel((x, y)))


@pytest.mark.parametrize("form", ["weak", "star"])
async def test_if_none_match_uses_the_weak_comparison_and_star(
    client: Client, tenant: dict[str, Any], form: str
) -> None:
    user_id = tenant["user"]["id"]
    await uploaded(client, tenant, user_id, png())
    etag = (await get_avatar(client, tenant, user_id)).headers["etag"]
    header = f"W/{etag}" if form == "weak" else "*"
    r = await get_avatar(client, tenant, user_id, if_none_match=header)
    assert (r.status_code, r.content) == (304, b"")


# -- before processing, and the profile ---------------------------------------------------------------


async def test_the_avatar_is_404_until_its_upload_is_processed(held: Held, tmp_path: Path) -> None:
    client = held.client
    tenant = await signup(client)
    user_id = tenant["user"]["id"]
    r = await upload(client, tenant, user_id, png(), "image/png")
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]

    # Stored and queued, not processed: the original is on disk, no variant yet.
    assert (await job(client, tenant, job_id))["status"] == "queued"
    [upload_id] = {f.split("/")[0] for f in blob_files(tmp_path, tenant, user_id)}
    assert blob_files(tmp_path, tenant, user_id) == [f"{upload_id}/original", f"{upload_id}/original.type"]
    for size in (None, 64, 256):
        assert_problem(await get_avatar(client, tenant, user_id, size), 404, "not-found")
    assert (await get_user(client, tenant, user_id))["avatar_url"] is None

    await held.release()
    await processed(client, tenant, job_id)
    served(await get_avatar(client, tenant, user_id, 64), 64)
    served(await get_avatar(client, tenant, user_id), 256)
    assert (await get_user(client, tenant, user_id))["avatar_url"] == avatar_path(user_id)


async def test_the_profile_shows_the_avatar_url_although_it_was_cached_before_the_upload(held: Held) -> None:
    client = held.client
    tenant = await signup(client)
    user = await add_user(client, tenant)
    sql = SqlCounter(client)
    path = f"/v1/users/{user['id']}"

    async def read_user() -> tuple[dict[str, Any], int]:
        before = len(sql.statements)
        r = await client.get(path, headers=tenant["headers"])
        assert r.status_code == 200, r.text
        return r.json(), len(sql.statements) - before

    first, _ = await read_user()
    assert first["avatar_url"] is None
    r = await upload(client, tenant, user["id"], png(), "image/png")
    assert r.status_code == 202, r.text
    # Right before processing, the profile is served from the cache: no SQL at all.
    cached, statements = await read_user()
    assert (cached["avatar_url"], statements) == (None, 0)

    await held.release()
    await processed(client, tenant, r.json()["job_id"])
    fresh, statements = await read_user()
    assert fresh["avatar_url"] == avatar_path(user["id"])
    assert statements > 0  # the cached profile was invalidated, not served stale
    assert fresh["updated_at"] >= first["updated_at"]
    again, statements = await read_user()
    assert (again, statements) == (fresh, 0)  # and cached again
    listed = await client.get("/v1/users", headers=tenant["headers"])
    assert {u["id"]: u["avatar_url"] for u in listed.json()["items"]}[user["id"]] == avatar_path(user["id"])


async def test_while_a_new_upload_is_processed_the_previous_variants_are_served(held: Held, tmp_path: Path) -> None:
    client = held.client
    tenant = await signup(client)
    user_id = tenant["user"]["id"]
    await held.release()
    await uploaded(client, tenant, user_id, png(RED))
    red = await get_avatar(client, tenant, user_id)
    assert near(served(red, 256).convert("RGB").getpixel((128, 128)), RED)

    # Hold the runners again (stop them; the no-op start keeps them stopped) and upload blue.
    await on_app(client, held.queue.stop)
    r = await upload(client, tenant, user_id, png(BLUE), "image/png")
    assert r.status_code == 202, r.text
    assert (await job(client, tenant, r.json()["job_id"]))["status"] == "queued"
    still = await get_avatar(client, tenant, user_id)
    assert (still.content, still.headers["etag"]) == (red.content, red.headers["etag"])

    await held.release()
    await processed(client, tenant, r.json()["job_id"])
    blue = await get_avatar(client, tenant, user_id)
    assert near(served(blue, 256).convert("RGB").getpixel((128, 128)), BLUE)


async def test_an_upload_replaced_before_it_was_processed_leaves_no_blobs(held: Held, tmp_path: Path) -> None:
    client = held.client
    tenant = await signup(client)
    user_id = tenant["user"]["id"]
    first = await upload(client, tenant, user_id, png(RED), "image/png")
    second = await upload(client, tenant, user_id, png(BLUE), "image/png")
    assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
    assert len({f.split("/")[0] for f in blob_files(tmp_path, tenant, user_id)}) == 2

    await held.release()
    superseded = await finished_job(client, tenant, first.json()["job_id"])
    assert (superseded["status"], superseded["result"]) == ("succeeded", {"outcome": "superseded"})
    await processed(client, tenant, second.json()["job_id"])
    blue = await get_avatar(client, tenant, user_id)
    assert near(served(blue, 256).convert("RGB").getpixel((128, 128)), BLUE)
    row = await avatar_row(client, tenant, user_id)
    assert row is not None
    # Only the upload that is served has blobs left.
    assert {f.split("/")[0] for f in blob_files(tmp_path, tenant, user_id)} == {str(row.upload_id)}


# -- refused uploads -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["image/gif", "application/json", "text/plain", None, "application/octet-stream"],
    ids=["gif", "json", "text", "missing", "octet-stream"],
)
async def test_an_unsupported_content_type_is_415_with_the_accepted_types(
    client: Client, tenant: dict[str, Any], tmp_path: Path, content_type: str | None
) -> None:
    user_id = tenant["user"]["id"]
    body = encode(Image.new("RGB", (50, 50), RED), "GIF") if content_type == "image/gif" else png()
    problem = assert_problem(await upload(client, tenant, user_id, body, content_type), 415, "unsupported-media-type")
    for accepted in ACCEPTED:
        assert accepted in problem["detail"], problem
    await assert_nothing_stored(client, tmp_path, tenant, user_id)


async def test_an_upload_over_5_mib_is_413_and_stores_nothing(
    client: Client, tenant: dict[str, Any], tmp_path: Path
) -> None:
    user_id = tenant["user"]["id"]
    # A real PNG followed by padding (Pillow ignores bytes after the image's end): only the size is wrong.
    just_over = png() + b"\0" * (MAX_UPLOAD_BYTES + 1 - len(png()))
    assert_problem(await upload(client, tenant, user_id, just_over, "image/png"), 413, "payload-too-large")
    far_over = png() + b"\0" * (2 * MAX_UPLOAD_BYTES)
    assert_problem(await upload(client, tenant, user_id, far_over, "image/png"), 413, "payload-too-large")
    await assert_nothing_stored(client, tmp_path, tenant, user_id)

    # Exactly 5 MiB is within the limit.
    await uploaded(client, tenant, user_id, just_over[:MAX_UPLOAD_BYTES])


def _truncated_png() -> bytes:
    data = noisy_png(200, 200)
    return data[: len(data) // 2]


INVALID_IMAGES = [
    pytest.param(lambda: b"", "image/png", id="empty"),
    pytest.param(lambda: os.urandom(4096), "image/png", id="random-bytes"),
    pytest.param(lambda: os.urandom(4096), "image/jpeg", id="random-bytes-as-jpeg"),
    pytest.param(_truncated_png, "image/png", id="truncated-png"),
    pytest.param(lambda: png(), "image/jpeg", id="png-declared-jpeg"),
    pytest.param(lambda: encode(banded(), "JPEG"), "image/png", id="jpeg-declared-png"),
    pytest.param(lambda: encode(banded(), "WEBP"), "image/png", id="webp-declared-png"),
    pytest.param(lambda: b'{"avatar": "me.png"}', "image/png", id="json-declared-png"),
    pytest.param(lambda: bomb_png(), "image/png", id="bomb-10000x10000"),
    pytest.param(lambda: bomb_png(7000, 7000), "image/png", id="bomb-7000x7000-over-40m-pixels"),
]


@pytest.mark.parametrize(("make", "content_type"), INVALID_IMAGES)
async def test_an_unreadable_image_is_422_invalid_image_and_stores_nothing(
    client: Client, tenant: dict[str, Any], tmp_path: Path, make: Callable[[], bytes], content_type: str
) -> None:
    user_id = tenant["user"]["id"]
    data = make()
    assert len(data) < MAX_UPLOAD_BYTES
    problem = assert_problem(await upload(client, tenant, user_id, data, content_type), 422, "invalid-image")
    assert problem.get("detail"), problem
    await assert_nothing_stored(client, tmp_path, tenant, user_id)


async def test_a_refused_upload_leaves_the_current_avatar_alone(
    client: Client, tenant: dict[str, Any], tmp_path: Path
) -> None:
    user_id = tenant["user"]["id"]
    await uploaded(client, tenant, user_id, png())
    before = (await get_avatar(client, tenant, user_id), blob_files(tmp_path, tenant, user_id))
    for data, content_type in ((_truncated_png(), "image/png"), (png(BLUE), "image/gif"), (bomb_png(), "image/png")):
        r = await upload(client, tenant, user_id, data, content_type)
        assert r.status_code in (415, 422), r.text
    after = (await get_avatar(client, tenant, user_id), blob_files(tmp_path, tenant, user_id))
    assert (after[0].content, after[0].headers["etag"], after[1]) == (
        before[0].content,
        before[0].headers["etag"],
        before[1],
    )
    assert (await outbox_types(client, tenant)).count("avatar.uploaded") == 1


async def test_the_pixel_limit_follows_the_setting(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path, KEEL_MEDIA_MAX_PIXELS="10000")
    async with client_for(settings) as client:
        tenant = await signup(client)
        user_id = tenant["user"]["id"]
        problem = assert_problem(
            await upload(client, tenant, user_id, png(size=(101, 100)), "image/png"), 422, "invalid-image"
        )
        assert "10,000" in problem["detail"], problem
        await assert_nothing_stored(client, tmp_path, tenant, user_id)
        await uploaded(client, tenant, user_id, png(size=(100, 100)))


async def test_a_size_other_than_64_or_256_is_422(client: Client, tenant: dict[str, Any]) -> None:
    user_id = tenant["user"]["id"]
    await uploaded(client, tenant, user_id, png())  # an avatar exists: a 404 would not be about the size
    failures = []
    for size in ["100", "abc", "0", "-64", "128", "512", "64.0", ""]:
        r = await get_avatar(client, tenant, user_id, size)
        problem = r.json() if r.headers["content-type"].startswith(PROBLEM) else {}
        if r.status_code != 422 or problem.get("status") != 422 or "size" not in str(problem):
            failures.append(f"size={size!r}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)


# -- who may see and change an avatar -------------------------------------------------------------------


async def test_another_tenants_user_and_unknown_users_are_404(
    client: Client, tenant: dict[str, Any], tmp_path: Path
) -> None:
    other = await signup(client, "Globex", "owner@globex.test")
    theirs = other["user"]["id"]
    await uploaded(client, other, theirs, png(GREEN))
    their_files = blob_files(tmp_path, other, theirs)
    their_avatar = await get_avatar(client, other, theirs)
    unknown = str(uuid.uuid4())

    for user_id in (theirs, unknown):
        assert_problem(await upload(client, tenant, user_id, png(RED), "image/png"), 404, "not-found")
        for size in (None, 64, 256):
            assert_problem(await get_avatar(client, tenant, user_id, size), 404, "not-found")
        await assert_nothing_stored(client, tmp_path, tenant, user_id)
    # Still as the other tenant left it.
    assert blob_files(tmp_path, other, theirs) == their_files
    again = await get_avatar(client, other, theirs)
    assert (again.content, again.headers["etag"]) == (their_avatar.content, their_avatar.headers["etag"])
    assert (await outbox_types(client, other)).count("avatar.uploaded") == 1

    # A user of this tenant without an avatar.
    ada = await add_user(client, tenant)
    for size in (None, 64, 256):
        assert_problem(await get_avatar(client, tenant, ada["id"], size), 404, "not-found")


async def test_avatars_need_an_api_key(client: Client, tenant: dict[str, Any]) -> None:
    user_id = tenant["user"]["id"]
    await uploaded(client, tenant, user_id, png())
    r = await client.get(avatar_path(user_id))
    assert r.status_code == 401, r.text
    r = await client.put(avatar_path(user_id), content=png(BLUE), headers={"Content-Type": "image/png"})
    assert r.status_code == 401, r.text


# -- replacing and forgetting ---------------------------------------------------------------------------


async def test_a_new_upload_replaces_the_variants_and_removes_the_previous_blobs(
    client: Client, tenant: dict[str, Any], tmp_path: Path
) -> None:
    user_id = tenant["user"]["id"]
    await uploaded(client, tenant, user_id, png(RED))
    first_upload = {f.split("/")[0] for f in blob_files(tmp_path, tenant, user_id)}
    assert len(first_upload) == 1
    red = {size: await get_avatar(client, tenant, user_id, size) for size in (64, 256)}

    await uploaded(client, tenant, user_id, encode(Image.new("RGB", (300, 300), BLUE), "JPEG"), "image/jpeg")
    for size in (64, 256):
        blue = await get_avatar(client, tenant, user_id, size)
        assert near(served(blue, size).convert("RGB").getpixel((size // 2, size // 2)), BLUE)
        assert blue.headers["etag"] != red[size].headers["etag"]
        # The old ETag no longer revalidates.
        stale = await get_avatar(client, tenant, user_id, size, if_none_match=red[size].headers["etag"])
        assert (stale.status_code, stale.content) == (200, blue.content)

    # Only the second upload's blobs are left on disk.
    files = blob_files(tmp_path, tenant, user_id)
    [second_upload] = {f.split("/")[0] for f in files}
    assert second_upload not in first_upload
    assert not (tmp_path / "blobs" / "avatars" / tenant["tenant"]["id"] / user_id / first_upload.pop()).exists()
    assert {f for f in files if not f.endswith(".type")} == {
        f"{second_upload}/original",
        f"{second_upload}/64.webp",
        f"{second_upload}/256.webp",
    }
    row = await avatar_row(client, tenant, user_id)
    assert row is not None
    assert (str(row.upload_id), row.status, row.original_type) == (
        second_upload,
        "ready",
        "image/jpeg",
    )
    assert (await get_user(client, tenant, user_id))["avatar_url"] == avatar_path(user_id)


async def test_deleting_a_user_removes_their_avatar(client: Client, tenant: dict[str, Any], tmp_path: Path) -> None:
    ada, bob = await add_user(client, tenant, "ada@acme.test"), await add_user(client, tenant, "bob@acme.test")
    await uploaded(client, tenant, ada["id"], png(RED))
    await uploaded(client, tenant, bob["id"], png(BLUE))
    assert blob_files(tmp_path, tenant, ada["id"])
    bobs_files = blob_files(tmp_path, tenant, bob["id"])

    r = await client.delete(f"/v1/users/{ada['id']}", headers=tenant["headers"])
    assert r.status_code == 204, r.text
    user_dir = tmp_path / "blobs" / "avatars" / tenant["tenant"]["id"] / ada["id"]

    async def forgotten() -> bool:
        return not user_dir.exists() and await avatar_row(client, tenant, ada["id"]) is None

    await eventually(forgotten)
    assert_problem(await get_avatar(client, tenant, ada["id"]), 404, "not-found")
    # The forget job ran for the user.deleted event, and Bob's avatar is untouched.
    assert FORGET_JOB in recorded_job_names(client, tenant)
    assert blob_files(tmp_path, tenant, bob["id"]) == bobs_files
    served(await get_avatar(client, tenant, bob["id"]), 256)


# -- the OpenAPI document -------------------------------------------------------------------------------


async def test_the_openapi_document_describes_the_binary_upload(client: Client) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200, r.text
    item = r.json()["paths"]["/v1/users/{user_id}/avatar"]
    body = item["put"]["requestBody"]
    assert body["required"] is True
    assert body["content"] == {t: {"schema": {"type": "string", "format": "binary"}} for t in ACCEPTED}
    assert "202" in item["put"]["responses"]
    assert {"404", "413", "415", "422"} <= set(item["put"]["responses"])
    assert "image/webp" in item["get"]["responses"]["200"]["content"]
    [size] = [p for p in item["get"]["parameters"] if p["name"] == "size"]
    assert size["in"] == "query"
    assert "requestBody" not in item["get"]
