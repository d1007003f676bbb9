"""Avatar use cases. The request validates the image completely (type, size, decodability, pixel
count) and stores the original; a job makes the variants and points the profile at them."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from keel.contexts.accounts.public import Directory, Profiles
from keel.contexts.media.domain.errors import AvatarNotFound, InvalidImage, UserNotFound
from keel.contexts.media.domain.model import (
    ACCEPTED_TYPES,
    AVATAR_SIZES,
    VARIANT_TYPE,
    Avatar,
    AvatarStatus,
    Variant,
    blob_prefix,
)
from keel.contexts.media.ports.images import ImageProcessor
from keel.contexts.media.ports.repositories import MediaUnitOfWork
from keel.contexts.media.ports.storage import BlobStore
from keel.platform.domain.events import Event, event_job_id
from keel.platform.domain.ids import new_id
from keel.platform.domain.tenancy import Principal
from keel.platform.ports.clock import Clock

PROCESS_JOB = "media.process_avatar"
FORGET_JOB = "media.forget_user"
# ``avatar.uploaded`` carries the upload's id, so the processing job's id follows from the upload.
TRIGGERS = {"avatar.uploaded": PROCESS_JOB, "user.deleted": FORGET_JOB}


@dataclass(frozen=True, slots=True)
class AvatarImage:
    data: bytes
    etag: str
    content_type: str = VARIANT_TYPE


def avatar_url(user_id: uuid.UUID) -> str:
    return f"/v1/users/{user_id}/avatar"


class MediaService:
    def __init__(
        self,
        uow: Callable[[], MediaUnitOfWork],
        blobs: BlobStore,
        images: ImageProcessor,
        directory: Directory,
        profiles: Profiles,
        clock: Clock,
    ) -> None:
        self._uow = uow
        self._blobs = blobs
        self._images = images
        self._directory = directory
        self._profiles = profiles
        self._clock = clock

    async def upload_avatar(self, who: Principal, user_id: uuid.UUID, data: bytes, content_type: str) -> str:
        """Store a validated original and return the id of the job that processes it."""
        if await self._directory.find_user(who.tenant_id, user_id) is None:
            raise UserNotFound
        info = await self._images.inspect(data)
        if ACCEPTED_TYPES.get(content_type) != info.format:
            raise InvalidImage(f"The body is a {info.format} image, not {content_type}.")
        upload_id = new_id()
        original_key = f"{blob_prefix(who.tenant_id, user_id, upload_id)}/original"
        await self._blobs.put(original_key, data, content_type)
        now = self._clock.now()
        async with self._uow() as uow:
            current = await uow.avatars.get(who.tenant_id, user_id)
            await uow.avatars.save(
                Avatar(
                    tenant_id=who.tenant_id,
                    user_id=user_id,
                    upload_id=upload_id,
                    status=AvatarStatus.PROCESSING,
                    original_key=original_key,
                    original_type=content_type,
                    # Until the new variants exist, the previous ones keep being served.
                    variants=current.variants if current else {},
                    created_at=current.created_at if current else now,
                    updated_at=now,
                )
            )
            facts = {"user_id": str(user_id), "upload_id": str(upload_id)}
            uow.record(
                Event(id=upload_id, type="avatar.uploaded", tenant_id=who.tenant_id, occurred_at=now, data=facts)
            )
            await uow.commit()
        return event_job_id(upload_id, PROCESS_JOB)

    async def avatar_image(self, who: Principal, user_id: uuid.UUID, size: int) -> AvatarImage:
        async with self._uow() as uow:
            avatar = await uow.avatars.get(who.tenant_id, user_id)
        variant = avatar.variants.get(size) if avatar else None
        if variant is None:
            raise AvatarNotFound
        blob = await self._blobs.get(variant.key)
        if blob is None:
            raise AvatarNotFound
        return AvatarImage(data=blob.data, etag=variant.etag, content_type=blob.content_type)

    async def process_avatar(self, tenant_id: uuid.UUID, user_id: uuid.UUID, upload_id: uuid.UUID) -> str:
        """Make the variants of an upload; idempotent, and a newer upload supersedes this one."""
        async with self._uow() as uow:
            avatar = await uow.avatars.get(tenant_id, user_id)
        prefix = blob_prefix(tenant_id, user_id, upload_id)
        if avatar is None or avatar.upload_id != upload_id:
            # A newer upload replaced this one before it was processed: its original is garbage, unless
            # (a late duplicate of this job) its variants are the ones being served.
            if avatar is None or not any(v.key.startswith(prefix + "/") for v in avatar.variants.values()):
                await self._blobs.delete_prefix(prefix)
            return "superseded"
        if avatar.status is AvatarStatus.READY:
            # A retry of a run that died after saving: the profile may not point at the avatar yet.
            await self._profiles.set_avatar(tenant_id, user_id, avatar_url(user_id))
            return "already ready"
        if avatar.status is not AvatarStatus.PROCESSING:
            return f"already {avatar.status.value}"
        original = await self._blobs.get(avatar.original_key)
        if original is None:
            return await self._fail(avatar, "The original upload is missing.")
        variants: dict[int, Variant] = {}
        try:
            for size in AVATAR_SIZES:
                webp = await self._images.square_variant(original.data, size)
                key = f"{prefix}/{size}.webp"
                await self._blobs.put(key, webp, VARIANT_TYPE)
                variants[size] = Variant(key=key, etag=hashlib.sha256(webp).hexdigest()[:32], size_bytes=len(webp))
        except InvalidImage as exc:  # validated at upload; only a decoder change could get here
            return await self._fail(avatar, exc.detail)
        previous = avatar.variants
        ready = replace(avatar, status=AvatarStatus.READY, variants=variants, error=None, updated_at=self._clock.now())
        async with self._uow() as uow:
            if not await uow.avatars.save_processed(ready):
                await self._blobs.delete_prefix(prefix)  # a newer upload came in while this one was processed
                return "superseded"
            await uow.commit()
        await self._forget_uploads_before(previous, upload_id)
        await self._profiles.set_avatar(tenant_id, user_id, avatar_url(user_id))
        return "ready"

    async def _forget_uploads_before(self, previous: Mapping[int, Variant], upload_id: uuid.UUID) -> None:
        """Delete the blobs of the upload this one replaced: nothing references them any more."""
        for prefix in {v.key.rsplit("/", 1)[0] for v in previous.values()}:
            if not prefix.endswith(str(upload_id)):
                await self._blobs.delete_prefix(prefix)

    async def _fail(self, avatar: Avatar, reason: str) -> str:
        failed = replace(avatar, status=AvatarStatus.FAILED, error=reason, updated_at=self._clock.now())
        async with self._uow() as uow:
            if await uow.avatars.save_processed(failed):
                await uow.commit()
        return "failed"

    async def forget_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> str:
        """A deleted user's avatar goes with them: the record and every blob."""
        async with self._uow() as uow:
            deleted = await uow.avatars.delete(tenant_id, user_id)
            await uow.commit()
        removed = await self._blobs.delete_prefix(f"avatars/{tenant_id}/{user_id}")
        return f"deleted {int(deleted)} avatar, {removed} blobs"
