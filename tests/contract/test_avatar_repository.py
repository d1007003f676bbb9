"""One contract for the avatar repository, run against the fake, SQLite and Postgres."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from keel.contexts.media.adapters.sql.repositories import SqlMediaUnitOfWork
from keel.contexts.media.domain.model import Avatar, AvatarStatus, Variant, blob_prefix
from keel.contexts.media.ports.repositories import MediaUnitOfWork
from keel.platform.domain.ids import new_id
from tests.fakes.media import InMemoryMediaUnitOfWork, MediaState
from tests.support.storage import BACKENDS, backend_of, uow_factory

NOW = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)

UowFactory = Callable[[], MediaUnitOfWork]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return backend_of(request)


@pytest.fixture
async def uow(backend: str) -> AsyncIterator[UowFactory]:
    state = MediaState()
    async with uow_factory(backend, lambda: InMemoryMediaUnitOfWork(state), SqlMediaUnitOfWork) as factory:
        yield factory


def avatar(tenant_id: uuid.UUID, user_id: uuid.UUID | None = None, *, created: datetime = NOW) -> Avatar:
    user_id = user_id or new_id()
    upload_id = new_id()
    return Avatar(
        tenant_id=tenant_id,
        user_id=user_id,
        upload_id=upload_id,
        status=AvatarStatus.PROCESSING,
        original_key=f"{blob_prefix(tenant_id, user_id, upload_id)}/original",
        original_type="image/png",
        created_at=created,
        updated_at=created,
    )


def variants(a: Avatar) -> dict[int, Variant]:
    prefix = blob_prefix(a.tenant_id, a.user_id, a.upload_id)
    return {
        64: Variant(key=f"{prefix}/64.webp", etag="0f" * 16, size_bytes=1234),
        256: Variant(key=f"{prefix}/256.webp", etag="a1" * 16, size_bytes=98765),
    }


def processed(a: Avatar, at: datetime) -> Avatar:
    return replace(a, status=AvatarStatus.READY, variants=variants(a), updated_at=at)


async def save(uow: UowFactory, *avatars: Avatar) -> None:
    async with uow() as u:
        for a in avatars:
            await u.avatars.save(a)
        await u.commit()


async def get(uow: UowFactory, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Avatar | None:
    async with uow() as u:
        return await u.avatars.get(tenant_id, user_id)


async def test_save_inserts_a_record_that_reads_back_equal(uow: UowFactory) -> None:
    tenant = new_id()
    a = avatar(tenant)
    assert await get(uow, tenant, a.user_id) is None
    await save(uow, a)
    got = await get(uow, tenant, a.user_id)
    assert got == a
    assert got is not None
    assert got.status is AvatarStatus.PROCESSING
    assert got.variants == {}
    assert got.error is None


async def test_save_again_replaces_the_record_but_keeps_its_creation_time(uow: UowFactory) -> None:
    tenant = new_id()
    first = avatar(tenant)
    await save(uow, first)
    ready = processed(first, NOW + timedelta(seconds=3))
    await save(uow, ready)
    assert await get(uow, tenant, first.user_id) == ready

    # A new upload: another upload id and original, still serving the variants of the first.
    upload_id = new_id()
    later = NOW + timedelta(days=2)
    second = replace(
        ready,
        upload_id=upload_id,
        status=AvatarStatus.PROCESSING,
        original_key=f"{blob_prefix(tenant, first.user_id, upload_id)}/original",
        original_type="image/jpeg",
        created_at=later,  # whatever the caller says, the record was created with the first upload
        updated_at=later,
    )
    await save(uow, second)
    got = await get(uow, tenant, first.user_id)
    assert got == replace(second, created_at=NOW)
    assert got is not None
    assert got.variants == variants(first)

    # One record per user, whatever the number of saves.
    async with uow() as u:
        assert await u.avatars.delete(tenant, first.user_id) is True
        assert await u.avatars.delete(tenant, first.user_id) is False


async def test_variants_round_trip_with_int_sizes(uow: UowFactory) -> None:
    tenant = new_id()
    a = processed(avatar(tenant), NOW + timedelta(seconds=1))
    await save(uow, a)
    got = await get(uow, tenant, a.user_id)
    assert got is not None
    assert set(got.variants) == {64, 256}
    assert all(type(size) is int for size in got.variants)
    assert all(isinstance(v, Variant) for v in got.variants.values())
    assert got.variants[64] == Variant(key=variants(a)[64].key, etag="0f" * 16, size_bytes=1234)
    assert got.variants[256].size_bytes == 98765
    assert got.variants == a.variants


async def test_a_failure_and_its_reason_round_trip(uow: UowFactory) -> None:
    tenant = new_id()
    a = processed(avatar(tenant), NOW + timedelta(seconds=1))
    failed = replace(a, status=AvatarStatus.FAILED, error="L'original est introuvable \u2014 \U0001f5bc missing")
    await save(uow, failed)
    got = await get(uow, tenant, a.user_id)
    assert got == failed
    assert got is not None
    assert got.status is AvatarStatus.FAILED


async def test_datetimes_in_any_offset_come_back_as_the_same_instant(uow: UowFactory) -> None:
    tenant = new_id()
    local = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
    a = replace(avatar(tenant, created=local), updated_at=local + timedelta(seconds=1))
    await save(uow, a)
    got = await get(uow, tenant, a.user_id)
    assert got is not None
    assert got.created_at == NOW
    assert got.updated_at == NOW + timedelta(seconds=1)
    assert got.created_at.tzinfo is not None
    assert got.updated_at.tzinfo is not None


async def test_reads_and_deletes_are_tenant_scoped(uow: UowFactory) -> None:
    acme, globex = new_id(), new_id()
    mine = avatar(acme)
    theirs = avatar(globex)
    await save(uow, mine, theirs)

    assert await get(uow, globex, mine.user_id) is None
    assert await get(uow, acme, theirs.user_id) is None
    async with uow() as u:
        assert await u.avatars.delete(globex, mine.user_id) is False
        await u.commit()
    assert await get(uow, acme, mine.user_id) == mine
    assert await get(uow, globex, theirs.user_id) == theirs


async def test_delete_removes_only_that_users_record(uow: UowFactory) -> None:
    tenant = new_id()
    gone, kept = avatar(tenant), avatar(tenant)
    await save(uow, gone, kept)
    async with uow() as u:
        assert await u.avatars.delete(tenant, gone.user_id) is True
        await u.commit()
    assert await get(uow, tenant, gone.user_id) is None
    assert await get(uow, tenant, kept.user_id) == kept
    async with uow() as u:
        assert await u.avatars.delete(tenant, gone.user_id) is False
        assert await u.avatars.delete(tenant, new_id()) is False


async def test_leaving_without_commit_discards_everything(uow: UowFactory) -> None:
    tenant = new_id()
    kept = avatar(tenant)
    await save(uow, kept)
    fresh = avatar(tenant)
    async with uow() as u:
        await u.avatars.save(fresh)
        await u.avatars.save(processed(kept, NOW + timedelta(minutes=1)))
        # Visible inside its own transaction ...
        assert await u.avatars.get(tenant, fresh.user_id) == fresh
    # ... and nowhere once it is left without commit.
    assert await get(uow, tenant, fresh.user_id) is None
    assert await get(uow, tenant, kept.user_id) == kept

    async with uow() as u:
        assert await u.avatars.delete(tenant, kept.user_id) is True
        assert await u.avatars.get(tenant, kept.user_id) is None
    assert await get(uow, tenant, kept.user_id) == kept


async def test_save_processed_writes_only_while_the_upload_is_the_latest(uow: UowFactory) -> None:
    tenant = new_id()
    first = avatar(tenant)
    await save(uow, first)
    done = processed(first, LATER)
    async with uow() as u:
        assert await u.avatars.save_processed(done)
        await u.commit()
    assert await get(uow, tenant, first.user_id) == done

    newer = replace(avatar(tenant, first.user_id), variants=done.variants)
    await save(uow, newer)
    async with uow() as u:  # the first upload's outcome comes again, after the newer upload
        assert not await u.avatars.save_processed(processed(first, LATER))
        await u.commit()
    assert await get(uow, tenant, first.user_id) == replace(newer, created_at=first.created_at)


async def test_save_processed_is_tenant_scoped(uow: UowFactory) -> None:
    a = avatar(new_id())
    await save(uow, a)
    async with uow() as u:
        assert not await u.avatars.save_processed(replace(processed(a, LATER), tenant_id=new_id()))
        await u.commit()
    assert await get(uow, a.tenant_id, a.user_id) == a
