"""One contract for the accounts storage ports, run against the fake, SQLite and Postgres."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from keel.contexts.accounts.adapters.sql.repositories import SqlAccountsUnitOfWork
from keel.contexts.accounts.domain.errors import EmailTaken
from keel.contexts.accounts.domain.model import ApiKey, Role, Tenant, TenantConfig, User, hash_token
from keel.contexts.accounts.ports.repositories import AccountsUnitOfWork
from keel.platform.domain.ids import new_id
from keel.platform.domain.paging import PageRequest
from tests.fakes.accounts import AccountsState, InMemoryAccountsUnitOfWork
from tests.support.storage import BACKENDS, backend_of, uow_factory

NOW = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)

UowFactory = Callable[[], AccountsUnitOfWork]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return backend_of(request)


@pytest.fixture
async def uow(backend: str) -> AsyncIterator[UowFactory]:
    state = AccountsState()
    async with uow_factory(backend, lambda: InMemoryAccountsUnitOfWork(state), SqlAccountsUnitOfWork) as factory:
        yield factory


def tenant(name: str = "Acme") -> Tenant:
    return Tenant(
        id=new_id(),
        name=name,
        config=TenantConfig(display_name=name, timezone="Europe/Paris", locale="fr-FR", rate_limit_per_minute=120),
        created_at=NOW,
        updated_at=NOW,
    )


def user(t: Tenant, email: str, name: str = "Someone") -> User:
    return User(id=new_id(), tenant_id=t.id, email=email, name=name, role=Role.MEMBER, created_at=NOW, updated_at=NOW)


def key(t: Tenant, token: str) -> ApiKey:
    return ApiKey(
        id=new_id(),
        tenant_id=t.id,
        name="k",
        display_prefix=token[:12],
        secret_hash=hash_token(token),
        created_at=NOW,
    )


async def seed(uow: UowFactory, *tenants: Tenant) -> None:
    async with uow() as u:
        for t in tenants:
            await u.tenants.add(t)
        await u.commit()


async def test_tenant_round_trip_keeps_config_and_times(uow: UowFactory) -> None:
    t = tenant()
    await seed(uow, t)
    async with uow() as u:
        assert await u.tenants.get(t.id) == t
        changed = replace(t, config=replace_config(t.config), updated_at=NOW + timedelta(minutes=5))
        await u.tenants.update(changed)
        await u.commit()
    async with uow() as u:
        assert await u.tenants.get(t.id) == changed
        assert await u.tenants.get(new_id()) is None


def replace_config(c: TenantConfig) -> TenantConfig:
    import msgspec

    return msgspec.structs.replace(c, display_name="Renamed", rate_limit_per_minute=None)


async def test_leaving_without_commit_discards_everything(uow: UowFactory) -> None:
    t = tenant()
    async with uow() as u:
        await u.tenants.add(t)
        await u.users.add(user(t, "a@x.test"))
    async with uow() as u:
        assert await u.tenants.get(t.id) is None


async def test_users_are_scoped_to_their_tenant(uow: UowFactory) -> None:
    a, b = tenant("A"), tenant("B")
    await seed(uow, a, b)
    ua = user(a, "same@x.test")
    async with uow() as u:
        await u.users.add(ua)
        # The same email in another tenant is a different person.
        await u.users.add(user(b, "same@x.test"))
        await u.commit()
    async with uow() as u:
        assert await u.users.get(a.id, ua.id) == ua
        assert await u.users.get(b.id, ua.id) is None
        assert await u.users.delete(b.id, ua.id) is False
        await u.users.update(replace(ua, tenant_id=b.id, name="hijack"))
        await u.commit()
    async with uow() as u:
        assert (await u.users.get(a.id, ua.id)) == ua


async def test_email_is_unique_within_a_tenant(uow: UowFactory) -> None:
    t = tenant()
    await seed(uow, t)
    first, second = user(t, "one@x.test"), user(t, "two@x.test")
    async with uow() as u:
        await u.users.add(first)
        await u.users.add(second)
        await u.commit()
    async with uow() as u:
        with pytest.raises(EmailTaken):
            await u.users.add(user(t, "one@x.test"))
    async with uow() as u:
        with pytest.raises(EmailTaken):
            await u.users.update(replace(second, email="one@x.test"))


async def test_user_update_and_delete(uow: UowFactory) -> None:
    t = tenant()
    await seed(uow, t)
    x = user(t, "x@x.test")
    async with uow() as u:
        await u.users.add(x)
        await u.commit()
    changed = replace(x, email="new@x.test", name="New Name", updated_at=NOW + timedelta(hours=1))
    async with uow() as u:
        await u.users.update(changed)
        await u.commit()
    async with uow() as u:
        assert await u.users.get(t.id, x.id) == changed
        assert await u.users.delete(t.id, x.id) is True
        await u.commit()
    async with uow() as u:
        assert await u.users.get(t.id, x.id) is None
        assert await u.users.delete(t.id, x.id) is False


async def test_a_user_without_an_avatar_reads_back_with_none(uow: UowFactory) -> None:
    t = tenant()
    await seed(uow, t)
    x = user(t, "plain@x.test")
    assert x.avatar_url is None
    async with uow() as u:
        await u.users.add(x)
        await u.commit()
    async with uow() as u:
        found = await u.users.get(t.id, x.id)
    assert found == x
    assert found is not None
    assert found.avatar_url is None


async def test_avatar_url_round_trips_and_update_writes_it(uow: UowFactory) -> None:
    t = tenant()
    await seed(uow, t)
    # Added with an avatar already set (the column holds up to 300 characters).
    longest = "/v1/users/" + "a" * 283 + "/avatar"
    assert len(longest) == 300
    pictured = replace(user(t, "pictured@x.test"), avatar_url=longest)
    x = user(t, "x@x.test")
    async with uow() as u:
        await u.users.add(pictured)
        await u.users.add(x)
        await u.commit()
    async with uow() as u:
        assert await u.users.get(t.id, pictured.id) == pictured

    # Update sets it...
    with_avatar = replace(x, avatar_url=f"/v1/users/{x.id}/avatar", updated_at=NOW + timedelta(minutes=1))
    async with uow() as u:
        await u.users.update(with_avatar)
        await u.commit()
    async with uow() as u:
        assert await u.users.get(t.id, x.id) == with_avatar
        listed = await u.users.list(t.id, PageRequest(limit=10))
    assert {v.id: v.avatar_url for v in listed.items} == {pictured.id: longest, x.id: with_avatar.avatar_url}

    # ...changes it along with other fields, and clears it.
    renamed = replace(
        with_avatar, name="Renamed", avatar_url="/v1/users/other/avatar", updated_at=NOW + timedelta(days=2)
    )
    async with uow() as u:
        await u.users.update(renamed)
        await u.commit()
    async with uow() as u:
        assert await u.users.get(t.id, x.id) == renamed
    cleared = replace(renamed, avatar_url=None, updated_at=NOW + timedelta(days=3))
    async with uow() as u:
        await u.users.update(cleared)
        await u.commit()
    async with uow() as u:
        assert await u.users.get(t.id, x.id) == cleared
        # The other user was not touched by any of it.
        assert await u.users.get(t.id, pictured.id) == pictured


async def test_an_avatar_url_update_without_commit_is_discarded(uow: UowFactory) -> None:
    t = tenant()
    await seed(uow, t)
    x = user(t, "x@x.test")
    async with uow() as u:
        await u.users.add(x)
        await u.commit()
    async with uow() as u:
        await u.users.update(replace(x, avatar_url=f"/v1/users/{x.id}/avatar"))
    async with uow() as u:
        assert await u.users.get(t.id, x.id) == x


async def test_another_tenant_cannot_set_a_users_avatar_url(uow: UowFactory) -> None:
    a, b = tenant("A"), tenant("B")
    await seed(uow, a, b)
    x = user(a, "x@x.test")
    async with uow() as u:
        await u.users.add(x)
        await u.commit()
    async with uow() as u:
        await u.users.update(replace(x, tenant_id=b.id, avatar_url="/v1/users/hijack/avatar"))
        await u.commit()
    async with uow() as u:
        assert await u.users.get(a.id, x.id) == x


async def test_user_pages_follow_creation_order_without_gaps_or_repeats(uow: UowFactory) -> None:
    a, b = tenant("A"), tenant("B")
    await seed(uow, a, b)
    created = [user(a, f"u{i}@x.test") for i in range(7)]
    async with uow() as u:
        for x in created:
            await u.users.add(x)
        await u.users.add(user(b, "foreign@x.test"))
        await u.commit()
    seen: list[User] = []
    after = None
    pages = 0
    while True:
        async with uow() as u:
            page = await u.users.list(a.id, PageRequest(limit=3, after=after))
        seen.extend(page.items)
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert [x.id for x in seen] == [x.id for x in created]
    assert pages == 3
    async with uow() as u:
        exact = await u.users.list(a.id, PageRequest(limit=7))
    assert len(exact.items) == 7
    assert exact.next_after is None


async def test_api_keys_resolve_by_hash_and_revoke(uow: UowFactory) -> None:
    a, b = tenant("A"), tenant("B")
    await seed(uow, a, b)
    ka, kb = key(a, "keel_token_a_0123456789"), key(b, "keel_token_b_0123456789")
    async with uow() as u:
        await u.api_keys.add(ka)
        await u.api_keys.add(kb)
        await u.commit()
    async with uow() as u:
        assert await u.api_keys.find_by_hash(hash_token("keel_token_a_0123456789")) == ka
        assert await u.api_keys.find_by_hash(hash_token("nope")) is None
        assert await u.api_keys.get(a.id, ka.id) == ka
        assert await u.api_keys.get(b.id, ka.id) is None
        page = await u.api_keys.list(a.id, PageRequest(limit=10))
        assert [k.id for k in page.items] == [ka.id]
        revoked = ka.revoked(NOW + timedelta(days=1))
        await u.api_keys.update(revoked)
        await u.commit()
    async with uow() as u:
        found = await u.api_keys.find_by_hash(ka.secret_hash)
        assert found is not None
        assert found.revoked_at == NOW + timedelta(days=1)
        assert not found.is_active


# -- statistics (analytics) -------------------------------------------------------------------------

LAST_OF_DAY = datetime(2026, 2, 27, 23, 59, 59, 999999, tzinfo=UTC)
FIRST_OF_NEXT = datetime(2026, 2, 28, 0, 0, tzinfo=UTC)
DAY1, DAY2 = LAST_OF_DAY.date(), FIRST_OF_NEXT.date()


def created(t: Tenant, email: str, at: datetime) -> User:
    return replace(user(t, email), created_at=at, updated_at=at)


async def daily_new(uow: UowFactory, t: Tenant, start: datetime, end: datetime) -> dict[date, int]:
    async with uow() as u:
        rows = await u.users.daily_new(t.id, start, end)
    days = dict(rows)
    assert len(days) == len(rows), f"a day appears twice: {rows}"
    assert all(type(d) is date and type(n) is int for d, n in rows)
    return days


async def test_daily_new_users_count_by_utc_day(uow: UowFactory) -> None:
    a, b = tenant("A"), tenant("B")
    await seed(uow, a, b)
    new_york, tokyo = timezone(timedelta(hours=-5)), timezone(timedelta(hours=9))
    gone = created(a, "gone@x.test", LAST_OF_DAY - timedelta(hours=2))
    async with uow() as u:
        for x in (
            created(a, "late@x.test", LAST_OF_DAY),
            created(a, "early@x.test", FIRST_OF_NEXT),
            # 20:00 in New York on the 27th is the 28th in UTC; 08:00 in Tokyo on the 28th is the 27th.
            created(a, "ny@x.test", datetime(2026, 2, 27, 20, 0, tzinfo=new_york)),
            created(a, "tokyo@x.test", datetime(2026, 2, 28, 8, 0, tzinfo=tokyo)),
            created(a, "older@x.test", LAST_OF_DAY - timedelta(days=3)),
            gone,
            created(b, "foreign@x.test", LAST_OF_DAY),
        ):
            await u.users.add(x)
        await u.commit()
    async with uow() as u:
        assert await u.users.delete(a.id, gone.id)
        await u.commit()
    start, end = datetime(2026, 2, 27, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)
    # Deleted users are not counted: the count is of users still there.
    assert await daily_new(uow, a, start, end) == {DAY1: 2, DAY2: 2}
    assert await daily_new(uow, b, start, end) == {DAY1: 1}
    assert await daily_new(uow, tenant("C"), start, end) == {}


async def test_daily_new_users_take_a_half_open_range(uow: UowFactory) -> None:
    t = tenant()
    await seed(uow, t)
    async with uow() as u:
        await u.users.add(created(t, "late@x.test", LAST_OF_DAY))
        await u.users.add(created(t, "early@x.test", FIRST_OF_NEXT))
        await u.commit()
    assert await daily_new(uow, t, FIRST_OF_NEXT, FIRST_OF_NEXT + timedelta(days=1)) == {DAY2: 1}
    assert await daily_new(uow, t, FIRST_OF_NEXT - timedelta(days=1), FIRST_OF_NEXT) == {DAY1: 1}
    assert await daily_new(uow, t, LAST_OF_DAY + timedelta(microseconds=1), FIRST_OF_NEXT) == {}
    # Bounds in another offset mean the same instants.
    paris = timezone(timedelta(hours=1))
    day2 = (FIRST_OF_NEXT.astimezone(paris), (FIRST_OF_NEXT + timedelta(days=1)).astimezone(paris))
    assert await daily_new(uow, t, *day2) == {DAY2: 1}


async def test_tenant_ids_come_in_ascending_pages(uow: UowFactory) -> None:
    tenants = [tenant(f"T{i}") for i in range(7)]
    await seed(uow, *tenants)
    expected = sorted(t.id for t in tenants)
    async with uow() as u:
        assert await u.tenants.ids_after(None, 100) == expected
        assert await u.tenants.ids_after(None, 3) == expected[:3]
        # ``after`` is exclusive; paging by the last id seen visits each tenant once.
        assert await u.tenants.ids_after(expected[2], 3) == expected[3:6]
        assert await u.tenants.ids_after(expected[5], 3) == expected[6:]
        assert await u.tenants.ids_after(expected[-1], 3) == []
        # An id that is no tenant's still orders: the ones above it.
        assert await u.tenants.ids_after(uuid.UUID(int=0), 100) == expected
        assert await u.tenants.ids_after(uuid.UUID(int=2**128 - 1), 100) == []
    seen: list[uuid.UUID] = []
    after = None
    while True:
        async with uow() as u:
            page = await u.tenants.ids_after(after, 2)
        seen += page
        if len(page) < 2:
            break
        after = page[-1]
    assert seen == expected
