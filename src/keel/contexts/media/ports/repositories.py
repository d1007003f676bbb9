from __future__ import annotations

import uuid
from typing import Protocol

from keel.contexts.media.domain.model import Avatar
from keel.platform.ports.uow import UnitOfWork


class AvatarRepository(Protocol):
    async def get(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Avatar | None: ...

    async def save(self, avatar: Avatar) -> None:
        """Insert or replace the user's avatar record."""
        ...

    async def save_processed(self, avatar: Avatar) -> bool:
        """Write the outcome of processing ``avatar.upload_id`` only if that upload is still the user's
        latest (compare-and-set); False, nothing written, when a newer upload came in meanwhile."""
        ...

    async def delete(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> bool: ...


class MediaUnitOfWork(UnitOfWork, Protocol):
    @property
    def avatars(self) -> AvatarRepository: ...
