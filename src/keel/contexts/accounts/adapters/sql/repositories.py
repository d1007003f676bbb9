"""SQL repositories for accounts. Every statement carries the tenant id in its WHERE clause."""

from __future__ import annotations

import builtins
import uuid
from datetime import date, datetime

import msgspec
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from keel.contexts.accounts.adapters.sql.models import ApiKeyRow, TenantRow, UserRow
from keel.contexts.accounts.domain.errors import EmailTaken
from keel.contexts.accounts.domain.model import ApiKey, Role, Tenant, TenantConfig, User
from keel.platform.adapters.sql.dates import utc_date
from keel.platform.adapters.sql.errors import is_unique_violation
from keel.platform.adapters.sql.paging import keyset_page
from keel.platform.adapters.sql.uow import SqlUnitOfWork
from keel.platform.domain.paging import Page, PageRequest


def _tenant(row: TenantRow) -> Tenant:
    return Tenant(
        id=row.id,
        name=row.name,
        config=msgspec.convert(row.config, TenantConfig),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _user(row: UserRow) -> User:
    return User(
        id=row.id,
        tenant_id=row.tenant_id,
        email=row.email,
        name=row.name,
        role=Role(row.role),
        created_at=row.created_at,
        updated_at=row.updated_at,
        avatar_url=row.avatar_url,
    )


def _key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        tenant_id=row.tenant_id,
        name=row.name,
        display_prefix=row.display_prefix,
        secret_hash=row.secret_hash,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


class SqlTenantRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, tenant: Tenant) -> None:
        self._s.add(
            TenantRow(
                id=tenant.id,
                name=tenant.name,
                config=msgspec.to_builtins(tenant.config),
                created_at=tenant.created_at,
                updated_at=tenant.updated_at,
            )
        )
        await self._s.flush()

    async def get(self, tenant_id: uuid.UUID) -> Tenant | None:
        row = await self._s.get(TenantRow, tenant_id)
        return _tenant(row) if row is not None else None

    async def update(self, tenant: Tenant) -> None:
        row = await self._s.get(TenantRow, tenant.id)
        if row is None:
            return
        row.name = tenant.name
        row.config = msgspec.to_builtins(tenant.config)
        row.updated_at = tenant.updated_at
        await self._s.flush()

    async def ids_after(self, after: uuid.UUID | None, limit: int) -> builtins.list[uuid.UUID]:
        stmt = select(TenantRow.id).order_by(TenantRow.id).limit(limit)
        if after is not None:
            stmt = stmt.where(TenantRow.id > after)
        return list((await self._s.execute(stmt)).scalars())


class SqlUserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def _flush(self) -> None:
        try:
            await self._s.flush()
        except IntegrityError as exc:
            if is_unique_violation(exc, "uq_users_tenant_email"):
                raise EmailTaken from exc
            raise

    async def _row(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> UserRow | None:
        stmt = select(UserRow).where(UserRow.tenant_id == tenant_id, UserRow.id == user_id)
        return (await self._s.execute(stmt)).scalar_one_or_none()

    async def add(self, user: User) -> None:
        self._s.add(
            UserRow(
                id=user.id,
                tenant_id=user.tenant_id,
                email=user.email,
                name=user.name,
                role=user.role.value,
                avatar_url=user.avatar_url,
                created_at=user.created_at,
                updated_at=user.updated_at,
            )
        )
        await self._flush()

    async def get(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> User | None:
        row = await self._row(tenant_id, user_id)
        return _user(row) if row is not None else None

    async def list(self, tenant_id: uuid.UUID, page: PageRequest) -> Page[User]:
        return await keyset_page(
            self._s, select(UserRow).where(UserRow.tenant_id == tenant_id), UserRow.id, page, _user
        )

    async def daily_new(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> builtins.list[tuple[date, int]]:
        day = utc_date(UserRow.created_at)
        stmt = (
            select(day, func.count())
            .where(UserRow.tenant_id == tenant_id, UserRow.created_at >= start, UserRow.created_at < end)
            .group_by(day)
        )
        return [(d, n) for d, n in (await self._s.execute(stmt)).tuples()]

    async def update(self, user: User) -> None:
        row = await self._row(user.tenant_id, user.id)
        if row is None:
            return
        row.email = user.email
        row.name = user.name
        row.role = user.role.value
        row.avatar_url = user.avatar_url
        row.updated_at = user.updated_at
        await self._flush()

    async def delete(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        stmt = delete(UserRow).where(UserRow.tenant_id == tenant_id, UserRow.id == user_id)
        result = await self._s.execute(stmt)
        return bool(getattr(result, "rowcount", 0))


class SqlApiKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._s = session

    async def add(self, key: ApiKey) -> None:
        self._s.add(
            ApiKeyRow(
                id=key.id,
                tenant_id=key.tenant_id,
                name=key.name,
                display_prefix=key.display_prefix,
                secret_hash=key.secret_hash,
                created_at=key.created_at,
                revoked_at=key.revoked_at,
            )
        )
        await self._s.flush()

    async def get(self, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey | None:
        stmt = select(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id, ApiKeyRow.id == key_id)
        row = (await self._s.execute(stmt)).scalar_one_or_none()
        return _key(row) if row is not None else None

    async def find_by_hash(self, secret_hash: str) -> ApiKey | None:
        stmt = select(ApiKeyRow).where(ApiKeyRow.secret_hash == secret_hash)
        row = (await self._s.execute(stmt)).scalar_one_or_none()
        return _key(row) if row is not None else None

    async def list(self, tenant_id: uuid.UUID, page: PageRequest) -> Page[ApiKey]:
        stmt = select(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id)
        return await keyset_page(self._s, stmt, ApiKeyRow.id, page, _key)

    async def update(self, key: ApiKey) -> None:
        stmt = select(ApiKeyRow).where(ApiKeyRow.tenant_id == key.tenant_id, ApiKeyRow.id == key.id)
        row = (await self._s.execute(stmt)).scalar_one_or_none()
        if row is None:
            return
        row.name = key.name
        row.revoked_at = key.revoked_at
        await self._s.flush()


class SqlAccountsUnitOfWork(SqlUnitOfWork):
    tenants: SqlTenantRepository
    users: SqlUserRepository
    api_keys: SqlApiKeyRepository

    def _bind(self, session: AsyncSession) -> None:
        self.tenants = SqlTenantRepository(session)
        self.users = SqlUserRepository(session)
        self.api_keys = SqlApiKeyRepository(session)
