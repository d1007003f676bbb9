"""In-memory accounts storage with real state and real transaction semantics (stage, then commit)."""

from __future__ import annotations

import builtins
import copy
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TypeVar

from keel.contexts.accounts.domain.errors import EmailTaken
from keel.contexts.accounts.domain.model import ApiKey, Tenant, User
from keel.contexts.accounts.domain.services import AccountsService
from keel.main.container import subscribe_cache_invalidation
from keel.platform.adapters.memory.cache import InMemoryCache
from keel.platform.cache import ReadThroughCache
from keel.platform.domain.events import Event, EventDispatcher
from keel.platform.domain.paging import Page, PageRequest
from keel.platform.ports.clock import Clock
from keel.platform.ports.events import CommittedEventPublisher
from tests.fakes.events import InlinePublisher
from tests.fakes.uow import InMemoryUnitOfWork


@dataclass
class AccountsState:
    tenants: dict[uuid.UUID, Tenant] = field(default_factory=dict)
    users: dict[uuid.UUID, User] = field(default_factory=dict)
    api_keys: dict[uuid.UUID, ApiKey] = field(default_factory=dict)
    # Events committed with the data, in order: the fake's outbox.
    outbox: list[Event] = field(default_factory=list)


R = TypeVar("R", User, ApiKey)


def _page(rows: list[R], page: PageRequest) -> Page[R]:
    rows = sorted(rows, key=lambda r: r.id)
    if page.after is not None:
        rows = [r for r in rows if r.id > page.after]
    return Page.from_overfetch(rows[: page.fetch], page)


class InMemoryTenantRepository:
    def __init__(self, state: AccountsState) -> None:
        self._s = state

    async def add(self, tenant: Tenant) -> None:
        self._s.tenants[tenant.id] = copy.deepcopy(tenant)

    async def get(self, tenant_id: uuid.UUID) -> Tenant | None:
        t = self._s.tenants.get(tenant_id)
        return copy.deepcopy(t) if t else None

    async def update(self, tenant: Tenant) -> None:
        if tenant.id in self._s.tenants:
            self._s.tenants[tenant.id] = copy.deepcopy(tenant)

    async def ids_after(self, after: uuid.UUID | None, limit: int) -> builtins.list[uuid.UUID]:
        # Ascending in the SQL adapters' order: UUIDs compare like their 16 bytes, as the GUID columns do.
        ids = sorted(t for t in self._s.tenants if after is None or t > after)
        return ids[:limit]


class InMemoryUserRepository:
    def __init__(self, state: AccountsState) -> None:
        self._s = state

    def _check_email(self, user: User) -> None:
        for other in self._s.users.values():
            if other.tenant_id == user.tenant_id and other.email == user.email and other.id != user.id:
                raise EmailTaken

    async def add(self, user: User) -> None:
        self._check_email(user)
        self._s.users[user.id] = copy.deepcopy(user)

    async def get(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> User | None:
        u = self._s.users.get(user_id)
        return copy.deepcopy(u) if u and u.tenant_id == tenant_id else None

    async def list(self, tenant_id: uuid.UUID, page: PageRequest) -> Page[User]:
        return _page([copy.deepcopy(u) for u in self._s.users.values() if u.tenant_id == tenant_id], page)

    async def update(self, user: User) -> None:
        current = self._s.users.get(user.id)
        if current is None or current.tenant_id != user.tenant_id:
            return
        self._check_email(user)
        self._s.users[user.id] = copy.deepcopy(user)

    async def delete(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        u = self._s.users.get(user_id)
        if u is None or u.tenant_id != tenant_id:
            return False
        del self._s.users[user_id]
        return True

    async def daily_new(self, tenant_id: uuid.UUID, start: datetime, end: datetime) -> builtins.list[tuple[date, int]]:
        days = Counter(
            u.created_at.astimezone(UTC).date()
            for u in self._s.users.values()
            if u.tenant_id == tenant_id and start <= u.created_at < end
        )
        return list(days.items())


class InMemoryApiKeyRepository:
    def __init__(self, state: AccountsState) -> None:
        self._s = state

    async def add(self, key: ApiKey) -> None:
        if any(k.secret_hash == key.secret_hash for k in self._s.api_keys.values()):
            raise ValueError("duplicate secret hash")
        self._s.api_keys[key.id] = copy.deepcopy(key)

    async def get(self, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey | None:
        k = self._s.api_keys.get(key_id)
        return copy.deepcopy(k) if k and k.tenant_id == tenant_id else None

    async def find_by_hash(self, secret_hash: str) -> ApiKey | None:
        return next((copy.deepcopy(k) for k in self._s.api_keys.values() if k.secret_hash == secret_hash), None)

    async def list(self, tenant_id: uuid.UUID, page: PageRequest) -> Page[ApiKey]:
        return _page([copy.deepcopy(k) for k in self._s.api_keys.values() if k.tenant_id == tenant_id], page)

    async def update(self, key: ApiKey) -> None:
        current = self._s.api_keys.get(key.id)
        if current is not None and current.tenant_id == key.tenant_id:
            self._s.api_keys[key.id] = copy.deepcopy(key)


class InMemoryAccountsUnitOfWork(InMemoryUnitOfWork[AccountsState]):
    def _bind(self, staged: AccountsState) -> None:
        self.tenants = InMemoryTenantRepository(staged)
        self.users = InMemoryUserRepository(staged)
        self.api_keys = InMemoryApiKeyRepository(staged)


class HeldPublisher:
    """Keeps committed events until ``release()`` dispatches them: the moment between a commit and the
    outbox relay publishing its events, made observable."""

    def __init__(self, dispatcher: EventDispatcher) -> None:
        self.dispatcher = dispatcher
        self.held: list[Event] = []
        self.published: list[Event] = []

    async def publish_committed(self, events: Sequence[Event]) -> None:
        self.held.extend(events)

    async def release(self) -> None:
        events, self.held = self.held, []
        for event in events:
            await self.dispatcher.dispatch(event)
            self.published.append(event)


def accounts_service(
    state: AccountsState,
    clock: Clock,
    uow: type[InMemoryAccountsUnitOfWork] = InMemoryAccountsUnitOfWork,
    publisher: Callable[[EventDispatcher], CommittedEventPublisher] = InlinePublisher,
) -> AccountsService:
    """The accounts service as the composition root wires it, on in-memory adapters. Committed events go
    to ``publisher``, whose dispatcher invalidates the cache as the app's does."""
    cache = ReadThroughCache(InMemoryCache(clock))
    dispatcher = EventDispatcher()
    subscribe_cache_invalidation(dispatcher, cache)
    events = publisher(dispatcher)
    return AccountsService(lambda: uow(state, events), clock, cache)
