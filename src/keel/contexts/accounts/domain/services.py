"""Accounts use cases. Each one is a single unit of work; the caller's tenant scopes everything."""

from __future__ import annotations

import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, datetime
from functools import cache
from typing import Any

import msgspec

from keel.contexts.accounts.domain import caching
from keel.contexts.accounts.domain.commands import ChangeTenantConfig, ChangeUser, CreateUser, Signup
from keel.contexts.accounts.domain.errors import (
    ApiKeyNotFound,
    OwnerUndeletable,
    TenantNotFound,
    UnknownTimezone,
    UserNotFound,
)
from keel.contexts.accounts.domain.model import (
    API_KEY_DISPLAY_CHARS,
    ApiKey,
    IssuedApiKey,
    Role,
    Tenant,
    TenantConfig,
    User,
    generate_token,
    hash_token,
    normalize_email,
)
from keel.contexts.accounts.ports.repositories import AccountsUnitOfWork
from keel.platform.cache import ReadThroughCache
from keel.platform.domain.events import Event
from keel.platform.domain.ids import new_id
from keel.platform.domain.paging import Page, PageRequest
from keel.platform.domain.tenancy import Principal
from keel.platform.ports.clock import Clock


@dataclass(frozen=True, slots=True)
class SignupResult:
    tenant: Tenant
    owner: User
    api_key: IssuedApiKey


@cache
def _timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _check_timezone(tz: str) -> None:
    if tz not in _timezones():
        raise UnknownTimezone(tz)


class AccountsService:
    def __init__(self, uow: Callable[[], AccountsUnitOfWork], clock: Clock, cache: ReadThroughCache) -> None:
        self._uow = uow
        self._clock = clock
        self._cache = cache

    def _event(self, type_: str, tenant_id: uuid.UUID, **data: Any) -> Event:
        return Event(type=type_, tenant_id=tenant_id, occurred_at=self._clock.now(), data=data)

    # -- signup and authentication ------------------------------------------------------------

    async def signup(self, cmd: Signup) -> SignupResult:
        _check_timezone(cmd.timezone)
        now = self._clock.now()
        tenant = Tenant(
            id=new_id(),
            name=cmd.organization,
            config=TenantConfig(display_name=cmd.organization, timezone=cmd.timezone, locale=cmd.locale),
            created_at=now,
            updated_at=now,
        )
        owner = User(
            id=new_id(),
            tenant_id=tenant.id,
            email=normalize_email(cmd.owner_email),
            name=cmd.owner_name,
            role=Role.OWNER,
            created_at=now,
            updated_at=now,
        )
        issued = self._new_key(tenant.id, "default")
        async with self._uow() as uow:
            await uow.tenants.add(tenant)
            await uow.users.add(owner)
            await uow.api_keys.add(issued.key)
            uow.record(
                self._event(
                    "tenant.created",
                    tenant.id,
                    name=tenant.name,
                    owner_user_id=str(owner.id),
                    owner_email=owner.email,
                    owner_name=owner.name,
                )
            )
            await uow.commit()
        return SignupResult(tenant=tenant, owner=owner, api_key=issued)

    async def authenticate(self, token: str) -> Principal | None:
        secret_hash = hash_token(token)

        async def load() -> ApiKey | None:
            async with self._uow() as uow:
                return await uow.api_keys.find_by_hash(secret_hash)

        # Unknown tokens are not cached (None is never stored), so guessing cannot fill the cache.
        key = await self._cache.get_or_load(caching.api_key_key(secret_hash), ApiKey, load, caching.API_KEY_TTL)
        if key is None or not key.is_active:
            return None
        return Principal(tenant_id=key.tenant_id, api_key_id=key.id)

    # -- tenant --------------------------------------------------------------------------------

    async def get_tenant(self, who: Principal) -> Tenant:
        tenant = await self.find_tenant(who.tenant_id)
        if tenant is None:
            raise TenantNotFound
        return tenant

    async def find_tenant(self, tenant_id: uuid.UUID) -> Tenant | None:
        """For the platform and other contexts (jobs), which act for a tenant without a principal."""

        async def load() -> Tenant | None:
            async with self._uow() as uow:
                return await uow.tenants.get(tenant_id)

        return await self._cache.get_or_load(caching.tenant_key(tenant_id), Tenant, load, caching.TENANT_TTL)

    async def rate_limit(self, who: Principal) -> int | None:
        """The tenant's own per-key quota (requests per minute), or None for the platform default."""
        return (await self.get_tenant(who)).config.rate_limit_per_minute

    async def change_tenant_config(self, who: Principal, change: ChangeTenantConfig) -> Tenant:
        if isinstance(change.timezone, str):
            _check_timezone(change.timezone)
        async with self._uow() as uow:
            tenant = await uow.tenants.get(who.tenant_id)
            if tenant is None:
                raise TenantNotFound
            changes = {k: v for k, v in msgspec.structs.asdict(change).items() if v is not msgspec.UNSET}
            tenant = replace(
                tenant,
                config=msgspec.structs.replace(tenant.config, **changes),
                updated_at=self._clock.now(),
            )
            await uow.tenants.update(tenant)
            uow.record(self._event("tenant.updated", tenant.id, changed=sorted(changes)))
            await uow.commit()
        return tenant

    # -- API keys ------------------------------------------------------------------------------

    def _new_key(self, tenant_id: uuid.UUID, name: str) -> IssuedApiKey:
        token = generate_token()
        key = ApiKey(
            id=new_id(),
            tenant_id=tenant_id,
            name=name,
            display_prefix=token[:API_KEY_DISPLAY_CHARS],
            secret_hash=hash_token(token),
            created_at=self._clock.now(),
        )
        return IssuedApiKey(key=key, token=token)

    async def create_api_key(self, who: Principal, name: str) -> IssuedApiKey:
        issued = self._new_key(who.tenant_id, name)
        async with self._uow() as uow:
            await uow.api_keys.add(issued.key)
            uow.record(self._event("api_key.created", who.tenant_id, api_key_id=str(issued.key.id), name=name))
            await uow.commit()
        return issued

    async def list_api_keys(self, who: Principal, page: PageRequest) -> Page[ApiKey]:
        async with self._uow() as uow:
            return await uow.api_keys.list(who.tenant_id, page)

    async def revoke_api_key(self, who: Principal, key_id: uuid.UUID) -> ApiKey:
        async with self._uow() as uow:
            key = await uow.api_keys.get(who.tenant_id, key_id)
            if key is None:
                raise ApiKeyNotFound
            if key.is_active:
                key = key.revoked(self._clock.now())
                await uow.api_keys.update(key)
                uow.record(
                    self._event("api_key.revoked", who.tenant_id, api_key_id=str(key.id), secret_hash=key.secret_hash)
                )
                await uow.commit()
        return key

    # -- users ---------------------------------------------------------------------------------

    async def create_user(self, who: Principal, cmd: CreateUser) -> User:
        now = self._clock.now()
        user = User(
            id=new_id(),
            tenant_id=who.tenant_id,
            email=normalize_email(cmd.email),
            name=cmd.name,
            role=Role.MEMBER,
            created_at=now,
            updated_at=now,
        )
        async with self._uow() as uow:
            await uow.users.add(user)
            uow.record(
                self._event("user.created", who.tenant_id, user_id=str(user.id), email=user.email, name=user.name)
            )
            await uow.commit()
        return user

    async def list_users(self, who: Principal, page: PageRequest) -> Page[User]:
        async with self._uow() as uow:
            return await uow.users.list(who.tenant_id, page)

    async def get_user(self, who: Principal, user_id: uuid.UUID) -> User:
        user = await self.find_user(who.tenant_id, user_id)
        if user is None:
            raise UserNotFound
        return user

    async def daily_new_users(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> list[tuple[date, int]]:
        async with self._uow() as uow:
            return await uow.users.daily_new(tenant_id, start, end)

    async def tenant_ids(self, after: uuid.UUID | None, limit: int) -> list[uuid.UUID]:
        async with self._uow() as uow:
            return await uow.tenants.ids_after(after, limit)

    async def find_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> User | None:
        async def load() -> User | None:
            async with self._uow() as uow:
                return await uow.users.get(tenant_id, user_id)

        return await self._cache.get_or_load(caching.user_key(tenant_id, user_id), User, load, caching.USER_TTL)

    async def change_user(self, who: Principal, user_id: uuid.UUID, change: ChangeUser) -> User:
        async with self._uow() as uow:
            user = await uow.users.get(who.tenant_id, user_id)
            if user is None:
                raise UserNotFound
            updated = user
            if isinstance(change.email, str):
                updated = replace(updated, email=normalize_email(change.email))
            if isinstance(change.name, str):
                updated = replace(updated, name=change.name)
            if updated == user:
                return user
            changed = [f for f in ("email", "name") if getattr(updated, f) != getattr(user, f)]
            updated = replace(updated, updated_at=self._clock.now())
            await uow.users.update(updated)
            uow.record(self._event("user.updated", who.tenant_id, user_id=str(user_id), changed=changed))
            await uow.commit()
        return updated

    async def set_avatar(self, tenant_id: uuid.UUID, user_id: uuid.UUID, avatar_url: str | None) -> bool:
        """Point the profile at its avatar (media jobs call this); False when the user is gone."""
        async with self._uow() as uow:
            user = await uow.users.get(tenant_id, user_id)
            if user is None:
                return False
            if user.avatar_url == avatar_url:
                return True
            await uow.users.update(replace(user, avatar_url=avatar_url, updated_at=self._clock.now()))
            uow.record(self._event("user.updated", tenant_id, user_id=str(user_id), changed=["avatar_url"]))
            await uow.commit()
        return True

    async def delete_user(self, who: Principal, user_id: uuid.UUID) -> None:
        async with self._uow() as uow:
            user = await uow.users.get(who.tenant_id, user_id)
            if user is None:
                raise UserNotFound
            if user.role is Role.OWNER:
                raise OwnerUndeletable
            await uow.users.delete(who.tenant_id, user_id)
            # ``created_at`` is internal: it tells analytics which day's new-user count the deletion changes.
            event = self._event(
                "user.deleted", who.tenant_id, user_id=str(user_id), created_at=user.created_at.isoformat()
            )
            uow.record(event)
            await uow.commit()
