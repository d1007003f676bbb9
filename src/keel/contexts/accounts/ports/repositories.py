"""What the accounts core needs from storage. Every read and write is scoped by tenant id."""

from __future__ import annotations

import builtins
import uuid
from datetime import date, datetime
from typing import Protocol

from keel.contexts.accounts.domain.model import ApiKey, Tenant, User
from keel.platform.domain.paging import Page, PageRequest
from keel.platform.ports.uow import UnitOfWork


class TenantRepository(Protocol):
    async def add(self, tenant: Tenant) -> None: ...

    async def get(self, tenant_id: uuid.UUID) -> Tenant | None: ...

    async def update(self, tenant: Tenant) -> None: ...

    async def ids_after(self, after: uuid.UUID | None, limit: int) -> builtins.list[uuid.UUID]:
        """Across tenants, for periodic jobs that visit each one: ids in ascending order."""
        ...


class UserRepository(Protocol):
    async def add(self, user: User) -> None:
        """Raise ``EmailTaken`` when the tenant already has a user with this email."""
        ...

    async def get(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> User | None: ...

    async def list(self, tenant_id: uuid.UUID, page: PageRequest) -> Page[User]: ...

    async def update(self, user: User) -> None:
        """Raise ``EmailTaken`` when the new email belongs to another user of the tenant."""
        ...

    async def delete(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> bool: ...

    async def daily_new(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> builtins.list[tuple[date, int]]:
        """How many of the tenant's users were created on each UTC day of [start, end) (days with none left out)."""
        ...


class ApiKeyRepository(Protocol):
    async def add(self, key: ApiKey) -> None: ...

    async def get(self, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey | None: ...

    async def find_by_hash(self, secret_hash: str) -> ApiKey | None:
        """The one unscoped read: it is how a request learns its tenant."""
        ...

    async def list(self, tenant_id: uuid.UUID, page: PageRequest) -> Page[ApiKey]: ...

    async def update(self, key: ApiKey) -> None: ...


class AccountsUnitOfWork(UnitOfWork, Protocol):
    """One transaction over the accounts repositories; leaving without ``commit`` rolls back."""

    @property
    def tenants(self) -> TenantRepository: ...

    @property
    def users(self) -> UserRepository: ...

    @property
    def api_keys(self) -> ApiKeyRepository: ...
