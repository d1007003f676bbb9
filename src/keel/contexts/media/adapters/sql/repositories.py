from __future__ import annotations

import uuid

import msgspec
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keel.contexts.media.adapters.sql.models import AvatarRow
from keel.contexts.media.domain.model import Avatar, AvatarStatus, Variant
from keel.platform.adapters.sql.uow import SqlUnitOfWork


def _avatar(row: AvatarRow) -> Avatar:
    return Avatar(
        tenant_id=row.tenant_id,
        user_id=row.user_id,
        upload_id=row.upload_id,
        status=AvatarStatus(row.status),
        original_key=row.original_key,
        original_type=row.original_type,
        variants={int(size): msgspec.convert(v, Variant) for size, v in row.variants.items()},
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _variants_column(avatar: Avatar) -> dict[str, object]:
    return {str(size): msgspec.to_builtins(v) for size, v in avatar.variants.items()}


class SqlAvatarRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def _row(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> AvatarRow | None:
        stmt = select(AvatarRow).where(AvatarRow.tenant_id == tenant_id, AvatarRow.user_id == user_id)
        return (await self._s.execute(stmt)).scalar_one_or_none()

    async def get(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Avatar | None:
        row = await self._row(tenant_id, user_id)
        return _avatar(row) if row is not None else None

    async def save(self, avatar: Avatar) -> None:
        row = await self._row(avatar.tenant_id, avatar.user_id)
        if row is None:
            row = AvatarRow(user_id=avatar.user_id, tenant_id=avatar.tenant_id, created_at=avatar.created_at)
            self._s.add(row)
        row.upload_id = avatar.upload_id
        row.status = avatar.status.value
        row.original_key = avatar.original_key
        row.original_type = avatar.original_type
        row.variants = _variants_column(avatar)
        row.error = avatar.error
        row.updated_at = avatar.updated_at
        await self._s.flush()

    async def save_processed(self, avatar: Avatar) -> bool:
        stmt = (
            update(AvatarRow)
            .where(
                AvatarRow.tenant_id == avatar.tenant_id,
                AvatarRow.user_id == avatar.user_id,
                AvatarRow.upload_id == avatar.upload_id,
            )
            .values(
                status=avatar.status.value,
                variants=_variants_column(avatar),
                error=avatar.error,
                updated_at=avatar.updated_at,
            )
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(await self._s.execute(stmt), "rowcount", 0))

    async def delete(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        stmt = delete(AvatarRow).where(AvatarRow.tenant_id == tenant_id, AvatarRow.user_id == user_id)
        return bool(getattr(await self._s.execute(stmt), "rowcount", 0))


class SqlMediaUnitOfWork(SqlUnitOfWork):
    avatars: SqlAvatarRepository

    def _bind(self, session: AsyncSession) -> None:
        self.avatars = SqlAvatarRepository(session)
