"""The avatar use cases, driven through in-memory storage, the real Pillow processor, a fake directory
of users, profiles that record what they are told and a manual clock.

The processing job is not queued: a test "runs" it by calling ``process_avatar`` itself with the
upload's id (what the ``avatar.uploaded`` event carries), which makes supersession deterministic.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from datetime import UTC, datetime

import pytest
from PIL import Image

from keel.contexts.media.domain.errors import AvatarNotFound, InvalidImage, UserNotFound
from keel.contexts.media.domain.model import (
    AVATAR_SIZES,
    VARIANT_TYPE,
    Avatar,
    AvatarStatus,
    Variant,
    blob_prefix,
)
from keel.contexts.media.domain.services import PROCESS_JOB, TRIGGERS, MediaService
from keel.contexts.media.ports.storage import Blob
from keel.platform.domain.events import event_job_id
from keel.platform.domain.ids import new_id
from keel.platform.domain.tenancy import Principal
from tests.fakes.clock import ManualClock
from tests.fakes.media import (
    AvatarSet,
    FakeDirectory,
    FakeProfiles,
    InMemoryBlobStore,
    MediaState,
    media_service,
)

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RED, BLUE = (255, 0, 0), (0, 0, 255)


def who(tenant_id: uuid.UUID | None = None) -> Principal:
    return Principal(tenant_id=tenant_id or new_id(), api_key_id=new_id())


ACME = who()
GLOBEX = who()
ZOE = new_id()  # an ACME user
ALI = new_id()  # another ACME user
OMAR = new_id()  # a GLOBEX user


def image(fmt: str = "PNG", colour: tuple[int, int, int] = RED, size: tuple[int, int] = (120, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def state() -> MediaState:
    return MediaState()


@pytest.fixture
def blobs() -> InMemoryBlobStore:
    return InMemoryBlobStore()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def directory() -> FakeDirectory:
    return FakeDirectory({(ACME.tenant_id, ZOE), (ACME.tenant_id, ALI), (GLOBEX.tenant_id, OMAR)})


@pytest.fixture
def profiles() -> FakeProfiles:
    return FakeProfiles()


@pytest.fixture
def service(
    state: MediaState, blobs: InMemoryBlobStore, directory: FakeDirectory, profiles: FakeProfiles, clock: ManualClock
) -> MediaService:
    return media_service(state, blobs, directory, profiles, clock)


def current(state: MediaState, user_id: uuid.UUID) -> Avatar:
    return state.avatars[user_id]


async def upload(
    service: MediaService,
    state: MediaState,
    user_id: uuid.UUID = ZOE,
    data: bytes | None = None,
    content_type: str = "image/png",
    principal: Principal = ACME,
) -> uuid.UUID:
    """Upload an avatar; returns the upload's id."""
    await service.upload_avatar(principal, user_id, image() if data is None else data, content_type)
    return current(state, user_id).upload_id


async def ready(
    service: MediaService,
    state: MediaState,
    user_id: uuid.UUID = ZOE,
    data: bytes | None = None,
    principal: Principal = ACME,
) -> Avatar:
    """Upload and process an avatar."""
    upload_id = await upload(service, state, user_id, data, principal=principal)
    assert await service.process_avatar(principal.tenant_id, user_id, upload_id) == "ready"
    return current(state, user_id)


# -- upload ----------------------------------------------------------------------------------------


async def test_upload_stores_the_original_and_records_the_event(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, profiles: FakeProfiles
) -> None:
    data = image("JPEG", size=(300, 200))
    job_id = await service.upload_avatar(ACME, ZOE, data, "image/jpeg")

    avatar = current(state, ZOE)
    prefix = blob_prefix(ACME.tenant_id, ZOE, avatar.upload_id)
    assert avatar == Avatar(
        tenant_id=ACME.tenant_id,
        user_id=ZOE,
        upload_id=avatar.upload_id,
        status=AvatarStatus.PROCESSING,
        original_key=f"{prefix}/original",
        original_type="image/jpeg",
        created_at=START,
        updated_at=START,
        variants={},
        error=None,
    )
    assert blobs.blobs == {f"{prefix}/original": Blob(data=data, content_type="image/jpeg")}

    [event] = state.outbox
    assert event.type == "avatar.uploaded"
    assert event.id == avatar.upload_id
    assert event.tenant_id == ACME.tenant_id
    assert event.occurred_at == START
    assert event.data == {"user_id": str(ZOE), "upload_id": str(avatar.upload_id)}
    # The job the event triggers is the one whose id the caller got.
    assert job_id == event_job_id(avatar.upload_id, PROCESS_JOB) == event_job_id(event.id, TRIGGERS[event.type])
    assert profiles.calls == []  # the profile changes once the variants exist


@pytest.mark.parametrize(("principal", "user_id"), [(ACME, new_id()), (GLOBEX, ZOE)], ids=["unknown", "other-tenant"])
async def test_upload_for_a_user_the_tenant_does_not_have_is_refused(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, principal: Principal, user_id: uuid.UUID
) -> None:
    with pytest.raises(UserNotFound):
        await service.upload_avatar(principal, user_id, image(), "image/png")
    assert blobs.blobs == {}
    assert state.avatars == {}
    assert state.outbox == []


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (image("JPEG"), "image/png"),
        (image("PNG"), "image/jpeg"),
        (image("WEBP"), "image/png"),
        (image("GIF"), "image/png"),
        (b"GIF89a not really", "image/png"),
        (image("PNG")[:60], "image/png"),
    ],
    ids=["jpeg-as-png", "png-as-jpeg", "webp-as-png", "gif", "garbage", "truncated"],
)
async def test_upload_of_anything_but_an_image_of_the_declared_type_is_refused(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, data: bytes, content_type: str
) -> None:
    with pytest.raises(InvalidImage):
        await service.upload_avatar(ACME, ZOE, data, content_type)
    assert blobs.blobs == {}
    assert state.avatars == {}
    assert state.outbox == []


async def test_a_refused_upload_leaves_the_current_avatar_alone(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore
) -> None:
    before = await ready(service, state)
    stored = dict(blobs.blobs)
    with pytest.raises(InvalidImage):
        await service.upload_avatar(ACME, ZOE, image("JPEG"), "image/webp")
    assert current(state, ZOE) == before
    assert blobs.blobs == stored
    assert len(state.outbox) == 1


# -- processing ------------------------------------------------------------------------------------


async def test_processing_makes_both_variants_and_points_the_profile_at_them(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, profiles: FakeProfiles, clock: ManualClock
) -> None:
    upload_id = await upload(service, state, data=image("PNG", size=(400, 300)))
    clock.advance(seconds=5)

    assert await service.process_avatar(ACME.tenant_id, ZOE, upload_id) == "ready"

    avatar = current(state, ZOE)
    prefix = blob_prefix(ACME.tenant_id, ZOE, upload_id)
    assert avatar.status is AvatarStatus.READY
    assert avatar.error is None
    assert avatar.upload_id == upload_id
    assert (avatar.created_at, avatar.updated_at) == (START, clock.now())
    assert set(avatar.variants) == set(AVATAR_SIZES) == {64, 256}
    for size, variant in avatar.variants.items():
        blob = blobs.blobs[f"{prefix}/{size}.webp"]
        assert blob.content_type == VARIANT_TYPE == "image/webp"
        decoded = Image.open(io.BytesIO(blob.data))
        assert (decoded.format, decoded.size) == ("WEBP", (size, size))
        assert variant == Variant(
            key=f"{prefix}/{size}.webp",
            etag=hashlib.sha256(blob.data).hexdigest()[:32],
            size_bytes=len(blob.data),
        )
    assert blobs.keys() == {f"{prefix}/original", f"{prefix}/64.webp", f"{prefix}/256.webp"}
    assert profiles.calls == [AvatarSet(ACME.tenant_id, ZOE, f"/v1/users/{ZOE}/avatar")]

    for size in AVATAR_SIZES:
        served = await service.avatar_image(ACME, ZOE, size)
        assert served.data == blobs.blobs[f"{prefix}/{size}.webp"].data
        assert served.etag == avatar.variants[size].etag
        assert served.content_type == "image/webp"


async def test_processing_twice_does_the_work_once(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, profiles: FakeProfiles, clock: ManualClock
) -> None:
    avatar = await ready(service, state)
    stored = dict(blobs.blobs)
    clock.advance(minutes=1)

    assert await service.process_avatar(ACME.tenant_id, ZOE, avatar.upload_id) == "already ready"

    assert current(state, ZOE) == avatar
    assert blobs.blobs == stored
    # The repeat only re-asserts the profile's pointer (a run may have died before setting it);
    # accounts treats the same value as no change and emits nothing.
    assert len(profiles.calls) == 2
    assert profiles.calls[1] == profiles.calls[0]


async def test_a_newer_upload_supersedes_a_pending_one(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, profiles: FakeProfiles, clock: ManualClock
) -> None:
    first = await upload(service, state, data=image("PNG", RED))
    clock.advance(seconds=1)
    second = await upload(service, state, data=image("JPEG", BLUE), content_type="image/jpeg")
    assert first != second
    assert [e.id for e in state.outbox] == [first, second]
    before, stored = current(state, ZOE), dict(blobs.blobs)

    # The first upload's job comes late: it writes nothing (deleting its own original would be fine).
    assert await service.process_avatar(ACME.tenant_id, ZOE, first) == "superseded"
    assert current(state, ZOE) == before
    assert blobs.keys() <= set(stored)
    assert all(stored.get(key) == blob for key, blob in blobs.blobs.items())
    assert before.original_key in blobs.blobs
    assert profiles.calls == []

    assert await service.process_avatar(ACME.tenant_id, ZOE, second) == "ready"
    avatar = current(state, ZOE)
    second_prefix = blob_prefix(ACME.tenant_id, ZOE, second)
    assert avatar.upload_id == second
    assert avatar.status is AvatarStatus.READY
    assert {v.key for v in avatar.variants.values()} == {f"{second_prefix}/64.webp", f"{second_prefix}/256.webp"}
    served = Image.open(io.BytesIO((await service.avatar_image(ACME, ZOE, 64)).data)).convert("RGB")
    pixel = served.getpixel((32, 32))
    assert isinstance(pixel, tuple)
    assert pixel[2] > 200  # blue: the second upload, not the red first
    assert pixel[0] < 50
    assert blobs.keys(blob_prefix(ACME.tenant_id, ZOE, first) + "/") <= {
        f"{blob_prefix(ACME.tenant_id, ZOE, first)}/original"
    }
    assert len(profiles.calls) == 1


async def test_once_the_latest_upload_is_ready_only_its_blobs_remain(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore
) -> None:
    first = await upload(service, state, data=image("PNG", RED))
    second = await upload(service, state, data=image("PNG", BLUE))
    assert await service.process_avatar(ACME.tenant_id, ZOE, first) == "superseded"
    assert await service.process_avatar(ACME.tenant_id, ZOE, second) == "ready"

    prefix = blob_prefix(ACME.tenant_id, ZOE, second)
    assert blobs.keys(f"avatars/{ACME.tenant_id}/{ZOE}/") == {
        f"{prefix}/original",
        f"{prefix}/64.webp",
        f"{prefix}/256.webp",
    }


async def test_a_reupload_serves_the_old_avatar_until_the_new_one_is_ready(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, profiles: FakeProfiles, clock: ManualClock
) -> None:
    old = await ready(service, state, data=image("PNG", RED))
    old_prefix = blob_prefix(ACME.tenant_id, ZOE, old.upload_id)
    old_image = await service.avatar_image(ACME, ZOE, 256)
    old_small = await service.avatar_image(ACME, ZOE, 64)
    clock.advance(hours=1)

    new_id_ = await upload(service, state, data=image("WEBP", BLUE), content_type="image/webp")
    pending = current(state, ZOE)
    assert pending.status is AvatarStatus.PROCESSING
    assert pending.variants == old.variants
    assert pending.created_at == START
    # While the new upload is processed, the old variants are still served.
    assert await service.avatar_image(ACME, ZOE, 256) == old_image
    assert await service.avatar_image(ACME, ZOE, 64) == old_small

    assert await service.process_avatar(ACME.tenant_id, ZOE, new_id_) == "ready"

    new_prefix = blob_prefix(ACME.tenant_id, ZOE, new_id_)
    assert blobs.keys(old_prefix) == set()  # the replaced upload is gone, original included
    assert blobs.keys() == {f"{new_prefix}/original", f"{new_prefix}/64.webp", f"{new_prefix}/256.webp"}
    served = await service.avatar_image(ACME, ZOE, 256)
    assert served.etag != old_image.etag
    assert served.etag == current(state, ZOE).variants[256].etag
    assert len(profiles.calls) == 2


async def test_a_missing_original_fails_the_avatar(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, profiles: FakeProfiles
) -> None:
    upload_id = await upload(service, state)
    del blobs.blobs[current(state, ZOE).original_key]

    assert await service.process_avatar(ACME.tenant_id, ZOE, upload_id) == "failed"

    avatar = current(state, ZOE)
    assert avatar.status is AvatarStatus.FAILED
    assert avatar.error == "The original upload is missing."
    assert avatar.variants == {}
    assert blobs.blobs == {}
    assert profiles.calls == []
    with pytest.raises(AvatarNotFound):
        await service.avatar_image(ACME, ZOE, 256)
    # A retry of the job changes nothing.
    assert await service.process_avatar(ACME.tenant_id, ZOE, upload_id) == "already failed"
    assert current(state, ZOE) == avatar


async def test_a_failed_reupload_keeps_serving_the_old_avatar(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore
) -> None:
    old = await ready(service, state)
    old_image = await service.avatar_image(ACME, ZOE, 64)
    upload_id = await upload(service, state, data=image("PNG", BLUE))
    del blobs.blobs[current(state, ZOE).original_key]

    assert await service.process_avatar(ACME.tenant_id, ZOE, upload_id) == "failed"

    assert current(state, ZOE).status is AvatarStatus.FAILED
    assert current(state, ZOE).variants == old.variants
    assert await service.avatar_image(ACME, ZOE, 64) == old_image


async def test_a_user_deleted_meanwhile_does_not_fail_the_job(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, profiles: FakeProfiles
) -> None:
    upload_id = await upload(service, state)
    profiles.deleted.add(ZOE)  # the profile is gone; the user.deleted job will remove the avatar

    assert await service.process_avatar(ACME.tenant_id, ZOE, upload_id) == "ready"
    assert profiles.calls == [AvatarSet(ACME.tenant_id, ZOE, f"/v1/users/{ZOE}/avatar")]

    assert await service.forget_user(ACME.tenant_id, ZOE) == "deleted 1 avatar, 3 blobs"
    assert state.avatars == {}
    assert blobs.blobs == {}


async def test_processing_for_a_forgotten_user_writes_nothing(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, profiles: FakeProfiles
) -> None:
    upload_id = await upload(service, state)
    await service.forget_user(ACME.tenant_id, ZOE)

    assert await service.process_avatar(ACME.tenant_id, ZOE, upload_id) == "superseded"
    assert state.avatars == {}
    assert blobs.blobs == {}
    assert profiles.calls == []


# -- serving ---------------------------------------------------------------------------------------


async def test_no_avatar_until_the_first_processing(service: MediaService, state: MediaState) -> None:
    with pytest.raises(AvatarNotFound):
        await service.avatar_image(ACME, ZOE, 256)
    await upload(service, state)
    with pytest.raises(AvatarNotFound):
        await service.avatar_image(ACME, ZOE, 256)


async def test_a_size_without_a_variant_is_not_found(service: MediaService, state: MediaState) -> None:
    await ready(service, state)
    for size in (128, 0, 512):
        with pytest.raises(AvatarNotFound):
            await service.avatar_image(ACME, ZOE, size)


async def test_another_tenant_never_sees_the_avatar(service: MediaService, state: MediaState) -> None:
    await ready(service, state)
    await ready(service, state, OMAR, principal=GLOBEX)
    for size in AVATAR_SIZES:
        with pytest.raises(AvatarNotFound):
            await service.avatar_image(GLOBEX, ZOE, size)
        with pytest.raises(AvatarNotFound):
            await service.avatar_image(ACME, OMAR, size)
        assert (await service.avatar_image(ACME, ZOE, size)).data != b""


async def test_a_lost_variant_blob_is_not_found(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore
) -> None:
    avatar = await ready(service, state)
    del blobs.blobs[avatar.variants[64].key]
    with pytest.raises(AvatarNotFound):
        await service.avatar_image(ACME, ZOE, 64)
    assert (await service.avatar_image(ACME, ZOE, 256)).etag == avatar.variants[256].etag


# -- forgetting ------------------------------------------------------------------------------------


async def test_forget_user_deletes_that_users_record_and_every_blob(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore
) -> None:
    await ready(service, state, ZOE)
    await upload(service, state, ZOE, data=image("PNG", BLUE))  # a pending re-upload: one more original
    ali = await ready(service, state, ALI)
    omar = await ready(service, state, OMAR, principal=GLOBEX)
    others = blobs.keys(f"avatars/{ACME.tenant_id}/{ALI}/") | blobs.keys(f"avatars/{GLOBEX.tenant_id}/{OMAR}/")
    assert len(others) == 6

    assert await service.forget_user(ACME.tenant_id, ZOE) == "deleted 1 avatar, 4 blobs"

    assert ZOE not in state.avatars
    assert blobs.keys(f"avatars/{ACME.tenant_id}/{ZOE}") == set()
    assert blobs.keys() == others
    assert current(state, ALI) == ali
    assert current(state, OMAR) == omar
    assert (await service.avatar_image(ACME, ALI, 64)).etag == ali.variants[64].etag

    # Idempotent: a redelivered user.deleted finds nothing left.
    assert await service.forget_user(ACME.tenant_id, ZOE) == "deleted 0 avatar, 0 blobs"


async def test_forget_user_is_tenant_scoped(service: MediaService, state: MediaState, blobs: InMemoryBlobStore) -> None:
    avatar = await ready(service, state, ZOE)
    stored = dict(blobs.blobs)
    assert await service.forget_user(GLOBEX.tenant_id, ZOE) == "deleted 0 avatar, 0 blobs"
    assert current(state, ZOE) == avatar
    assert blobs.blobs == stored


async def test_an_upload_that_arrives_while_an_older_one_is_processed_is_not_lost(
    service: MediaService, state: MediaState, blobs: InMemoryBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await upload(service, state, data=image("PNG", RED))
    images = service._images
    make_variant = images.square_variant
    newer: list[uuid.UUID] = []

    async def upload_meanwhile(data: bytes, size: int) -> bytes:
        # The second upload commits while the first one's variants are being made.
        if not newer:
            newer.append(await upload(service, state, data=image("JPEG", BLUE), content_type="image/jpeg"))
        return await make_variant(data, size)

    monkeypatch.setattr(images, "square_variant", upload_meanwhile)
    assert await service.process_avatar(ACME.tenant_id, ZOE, first) == "superseded"
    assert current(state, ZOE).upload_id == newer[0]
    assert current(state, ZOE).status is AvatarStatus.PROCESSING
    assert not blobs.keys(blob_prefix(ACME.tenant_id, ZOE, first))

    monkeypatch.undo()
    assert await service.process_avatar(ACME.tenant_id, ZOE, newer[0]) == "ready"
    assert set(current(state, ZOE).variants) == {64, 256}
