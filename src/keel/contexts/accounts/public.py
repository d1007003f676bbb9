"""The accounts context as other contexts and the composition root may see it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from keel.contexts.accounts.domain.services import AccountsService
from keel.platform.domain.tenancy import Principal


class Authenticator(Protocol):
    """Turns a presented API key into the principal it acts for."""

    async def authenticate(self, token: str) -> Principal | None:
        """None for unknown or revoked keys."""
        ...


@dataclass(frozen=True, slots=True)
class TenantSummary:
    id: uuid.UUID
    name: str
    locale: str


@dataclass(frozen=True, slots=True)
class UserSummary:
    id: uuid.UUID
    tenant_id: uuid.UUID
    email: str
    name: str


class Directory(Protocol):
    """Read-only lookups for work done on a tenant's behalf outside a request (jobs)."""

    async def find_tenant(self, tenant_id: uuid.UUID) -> TenantSummary | None: ...

    async def find_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> UserSummary | None: ...


class Profiles(Protocol):
    """What other contexts may change on a user's profile."""

    async def set_avatar(self, tenant_id: uuid.UUID, user_id: uuid.UUID, avatar_url: str | None) -> bool:
        """False when the user no longer exists. Emits ``user.updated`` (the cached profile is invalidated)."""
        ...


class UserStatistics(Protocol):
    """Aggregates for reporting (the analytics context's rollups)."""

    async def daily_new_users(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> Sequence[tuple[date, int]]:
        """Users created on each UTC day of [start, end) and not deleted since (days with none left out)."""
        ...

    async def tenant_ids(self, after: uuid.UUID | None, limit: int) -> Sequence[uuid.UUID]:
        """Every tenant's id in ascending order, a page at a time (for jobs that visit each tenant)."""
        ...


class AccountsDirectory:
    def __init__(self, service: AccountsService) -> None:
        self._service = service

    async def find_tenant(self, tenant_id: uuid.UUID) -> TenantSummary | None:
        t = await self._service.find_tenant(tenant_id)
        return TenantSummary(id=t.id, name=t.name, locale=t.config.locale) if t else None

    async def find_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> UserSummary | None:
        u = await self._service.find_user(tenant_id, user_id)
        return UserSummary(id=u.id, tenant_id=u.tenant_id, email=u.email, name=u.name) if u else None

    async def set_avatar(self, tenant_id: uuid.UUID, user_id: uuid.UUID, avatar_url: str | None) -> bool:
        return await self._service.set_avatar(tenant_id, user_id, avatar_url)

    async def daily_new_users(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> Sequence[tuple[date, int]]:
        return await self._service.daily_new_users(tenant_id, start, end)

    async def tenant_ids(self, after: uuid.UUID | None, limit: int) -> Sequence[uuid.UUID]:
        return await self._service.tenant_ids(after, limit)


# Events other contexts may react to, with the fields of their data that may leave Keel (webhooks).
# Anything else in an event's data (a key's hash, say) is internal.
PUBLIC_EVENTS: Mapping[str, Sequence[str]] = {
    "tenant.updated": ("changed",),
    "user.created": ("user_id", "email", "name"),
    "user.updated": ("user_id", "changed"),
    "user.deleted": ("user_id",),
    "api_key.created": ("api_key_id", "name"),
    "api_key.revoked": ("api_key_id",),
}
