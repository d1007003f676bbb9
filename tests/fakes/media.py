"""In-memory media storage with real state and transaction semantics (stage, then commit), a blob
store with the filesystem adapter's key rules and ``delete_prefix`` semantics, and fakes of the
accounts ports media depends on (a directory of users, profiles that record ``set_avatar``)."""

from __future__ import annotations

import builtins
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from keel.contexts.accounts.public import TenantSummary, UserSummary
from keel.contexts.media.adapters.pillow_images import PillowImageProcessor
from keel.contexts.media.domain.model import MAX_PIXELS, Avatar
from keel.contexts.media.domain.services import MediaService
from keel.contexts.media.ports.storage import Blob
from keel.platform.domain.events import Event
from keel.platform.ports.clock import Clock
from tests.fakes.uow import InMemoryUnitOfWork


@dataclass
class MediaState:
    # By user id, like the SQL table (user ids are unique across tenants); reads also name the tenant.
    avatars: dict[uuid.UUID, Avatar] = field(default_factory=dict)
    outbox: list[Event] = field(default_factory=list)


class InMemoryAvatarRepository:
    def __init__(self, state: MediaState) -> None:
        self._s = state

    async def get(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Avatar | None:
        a = self._s.avatars.get(user_id)
        return a if a is not None and a.tenant_id == tenant_id else None

    async def save(self, avatar: Avatar) -> None:
        current = self._s.avatars.get(avatar.user_id)
        if current is not None and current.tenant_id != avatar.tenant_id:
            raise ValueError("duplicate avatar user id")  # the SQL primary key would refuse it too
        # Like the SQL adapter: a replaced record keeps the creation time of the first one.
        self._s.avatars[avatar.user_id] = avatar if current is None else replace(avatar, created_at=current.created_at)

    async def save_processed(self, avatar: Avatar) -> bool:
        current = await self.get(avatar.tenant_id, avatar.user_id)
        if current is None or current.upload_id != avatar.upload_id:
            return False
        self._s.avatars[avatar.user_id] = replace(avatar, created_at=current.created_at)
        return True

    async def delete(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        if await self.get(tenant_id, user_id) is None:
            return False
        del self._s.avatars[user_id]
        return True


class InMemoryMediaUnitOfWork(InMemoryUnitOfWork[MediaState]):
    avatars: InMemoryAvatarRepository

    def _bind(self, staged: MediaState) -> None:
        self.avatars = InMemoryAvatarRepository(staged)


# -- blobs ---------------------------------------------------------------------------------------

# The filesystem adapter's rule: segments of [A-Za-z0-9._-] starting with a letter or digit.
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def _check(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"invalid blob key {key!r}")
    return key


class InMemoryBlobStore:
    """Blobs in a dict; ``delete_prefix(p)`` deletes the keys under the folder ``p`` (``p + "/"``)."""

    def __init__(self) -> None:
        self.blobs: dict[str, Blob] = {}

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        self.blobs[_check(key)] = Blob(data=bytes(data), content_type=content_type)

    async def get(self, key: str) -> Blob | None:
        return self.blobs.get(_check(key))

    async def delete_prefix(self, prefix: str) -> int:
        folder = _check(prefix) + "/"
        doomed = [k for k in self.blobs if k.startswith(folder)]
        for k in doomed:
            del self.blobs[k]
        return len(doomed)

    def keys(self, prefix: str = "") -> builtins.set[str]:
        """The stored keys that start with ``prefix`` (a plain string prefix), for assertions."""
        return {k for k in self.blobs if k.startswith(prefix)}


# -- accounts ports ------------------------------------------------------------------------------


class FakeDirectory:
    """Knows the users in ``users``, a set of (tenant id, user id)."""

    def __init__(self, users: Iterable[tuple[uuid.UUID, uuid.UUID]] = ()) -> None:
        self.users: set[tuple[uuid.UUID, uuid.UUID]] = set(users)

    def add(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> None:
        self.users.add((tenant_id, user_id))

    async def find_tenant(self, tenant_id: uuid.UUID) -> TenantSummary | None:
        if not any(t == tenant_id for t, _ in self.users):
            return None
        return TenantSummary(id=tenant_id, name=f"Tenant {tenant_id.hex[:6]}", locale="en")

    async def find_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> UserSummary | None:
        if (tenant_id, user_id) not in self.users:
            return None
        return UserSummary(id=user_id, tenant_id=tenant_id, email=f"{user_id.hex[:8]}@example.test", name="Zoë")


@dataclass(frozen=True)
class AvatarSet:
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    avatar_url: str | None


class FakeProfiles:
    """Records every ``set_avatar``; answers False for the users in ``deleted``."""

    def __init__(self) -> None:
        self.calls: list[AvatarSet] = []
        self.deleted: set[uuid.UUID] = set()

    async def set_avatar(self, tenant_id: uuid.UUID, user_id: uuid.UUID, avatar_url: str | None) -> bool:
        self.calls.append(AvatarSet(tenant_id, user_id, avatar_url))
        return user_id not in self.deleted


def media_service(
    state: MediaState,
    blobs: InMemoryBlobStore,
    directory: FakeDirectory,
    profiles: FakeProfiles,
    clock: Clock,
    *,
    max_pixels: int = MAX_PIXELS,
) -> MediaService:
    """The media service as the composition root wires it: in-memory storage, the real Pillow processor."""
    return MediaService(
        lambda: InMemoryMediaUnitOfWork(state),
        blobs,
        PillowImageProcessor(max_pixels=max_pixels),
        directory,
        profiles,
        clock,
    )
