"""The accounts use cases, driven through the in-memory fakes and a manual clock."""

from __future__ import annotations

import copy
import hashlib
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Self

import pytest

from keel.contexts.accounts.domain.commands import ChangeTenantConfig, ChangeUser, CreateUser, Signup
from keel.contexts.accounts.domain.errors import (
    ApiKeyNotFound,
    EmailTaken,
    OwnerUndeletable,
    TenantNotFound,
    UnknownTimezone,
    UserNotFound,
)
from keel.contexts.accounts.domain.model import API_KEY_PREFIX, ApiKey, Role, TenantConfig, User
from keel.contexts.accounts.domain.services import AccountsService, SignupResult
from keel.contexts.accounts.public import AccountsDirectory, Profiles
from keel.platform.domain.events import EventDispatcher
from keel.platform.domain.paging import PageRequest
from keel.platform.domain.tenancy import Principal
from tests.fakes.accounts import AccountsState, HeldPublisher, InMemoryAccountsUnitOfWork, accounts_service
from tests.fakes.clock import ManualClock

START = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def state() -> AccountsState:
    return AccountsState()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def service(state: AccountsState, clock: ManualClock) -> AccountsService:
    return accounts_service(state, clock)


def principal(result: SignupResult) -> Principal:
    return Principal(tenant_id=result.tenant.id, api_key_id=result.api_key.key.id)


def snapshot(state: AccountsState) -> AccountsState:
    return copy.deepcopy(state)


async def do_signup(service: AccountsService, org: str = "Acme", email: str = "owner@acme.test") -> SignupResult:
    return await service.signup(Signup(organization=org, owner_email=email, owner_name="Olivia Owner"))


# -- signup ------------------------------------------------------------------------------------


async def test_signup_creates_tenant_owner_and_key(
    service: AccountsService, state: AccountsState, clock: ManualClock
) -> None:
    result = await service.signup(
        Signup(
            organization="Acme Corp",
            owner_email="  Olivia.Owner@ACME.Test ",
            owner_name="Olivia",
            timezone="Europe/Paris",
            locale="fr-FR",
        )
    )

    tenant, owner, issued = result.tenant, result.owner, result.api_key
    assert tenant.name == "Acme Corp"
    assert tenant.config == TenantConfig(display_name="Acme Corp", timezone="Europe/Paris", locale="fr-FR")
    assert tenant.config.rate_limit_per_minute is None
    assert tenant.created_at == tenant.updated_at == START

    assert owner.tenant_id == tenant.id
    assert owner.role is Role.OWNER
    assert owner.email == "olivia.owner@acme.test"
    assert owner.name == "Olivia"
    assert owner.created_at == owner.updated_at == START

    assert issued.token.startswith(API_KEY_PREFIX)
    assert issued.token.startswith("keel_")
    assert len(issued.token) > len(API_KEY_PREFIX) + 32
    assert issued.key.tenant_id == tenant.id
    assert issued.key.name == "default"
    assert issued.key.created_at == START
    assert issued.key.revoked_at is None
    assert issued.key.is_active

    # Everything is committed: exactly one tenant, one user, one key.
    assert state.tenants == {tenant.id: tenant}
    assert state.users == {owner.id: owner}
    assert state.api_keys == {issued.key.id: issued.key}


async def test_signup_defaults(service: AccountsService) -> None:
    result = await do_signup(service)
    assert result.tenant.config.timezone == "UTC"
    assert result.tenant.config.locale == "en"


async def test_signup_stores_only_the_token_hash(service: AccountsService, state: AccountsState) -> None:
    result = await do_signup(service)
    token = result.api_key.token
    (stored,) = state.api_keys.values()

    assert stored.secret_hash == hashlib.sha256(token.encode()).hexdigest()
    # The display prefix is a short, non-secret head of the token, never the whole of it.
    assert token.startswith(stored.display_prefix)
    assert len(stored.display_prefix) < len(token) // 2
    # The token text is nowhere in storage, nor in the repr of the issued key.
    assert token not in repr(state)
    assert all(token not in str(v) for v in (stored.id, stored.name, stored.display_prefix, stored.secret_hash))
    assert token not in repr(result.api_key)


async def test_signup_issues_distinct_tokens(service: AccountsService) -> None:
    a = await do_signup(service, "Acme", "a@acme.test")
    b = await do_signup(service, "Globex", "b@globex.test")
    assert a.api_key.token != b.api_key.token
    assert a.api_key.key.secret_hash != b.api_key.key.secret_hash
    assert a.tenant.id != b.tenant.id


async def test_same_email_in_two_tenants_is_fine(service: AccountsService, state: AccountsState) -> None:
    await do_signup(service, "Acme", "same@example.test")
    await do_signup(service, "Globex", "SAME@example.test")
    assert len(state.users) == 2


async def test_signup_with_unknown_timezone_commits_nothing(service: AccountsService, state: AccountsState) -> None:
    with pytest.raises(UnknownTimezone) as exc:
        await service.signup(
            Signup(organization="Acme", owner_email="o@acme.test", owner_name="O", timezone="Mars/Olympus_Mons")
        )
    assert exc.value.pointer == "#/timezone"
    assert "Mars/Olympus_Mons" in exc.value.detail
    assert state == AccountsState()


# -- authentication and API keys --------------------------------------------------------------


async def test_authenticate_good_token(service: AccountsService) -> None:
    result = await do_signup(service)
    who = await service.authenticate(result.api_key.token)
    assert who == Principal(tenant_id=result.tenant.id, api_key_id=result.api_key.key.id)


@pytest.mark.parametrize("token", ["", "keel_", "keel_unknown", "not-a-token"])
async def test_authenticate_unknown_token(service: AccountsService, token: str) -> None:
    await do_signup(service)
    assert await service.authenticate(token) is None


async def test_authenticate_rejects_near_miss_and_hash(service: AccountsService) -> None:
    result = await do_signup(service)
    token = result.api_key.token
    assert await service.authenticate(token + "x") is None
    assert await service.authenticate(token[:-1]) is None
    assert await service.authenticate(token.upper()) is None
    # Knowing the stored hash is not enough to authenticate.
    assert await service.authenticate(result.api_key.key.secret_hash) is None


async def test_revoke_is_immediate_idempotent_and_timestamped(
    service: AccountsService, state: AccountsState, clock: ManualClock
) -> None:
    result = await do_signup(service)
    who = principal(result)
    extra = await service.create_api_key(who, "ci")

    clock.advance(minutes=5)
    revoked = await service.revoke_api_key(who, extra.key.id)
    assert revoked.id == extra.key.id
    assert revoked.revoked_at == START + timedelta(minutes=5)
    assert not revoked.is_active
    assert state.api_keys[extra.key.id].revoked_at == START + timedelta(minutes=5)
    # Immediate: the very next authentication fails; the other key still works.
    assert await service.authenticate(extra.token) is None
    assert await service.authenticate(result.api_key.token) == who

    clock.advance(hours=1)
    before = snapshot(state)
    again = await service.revoke_api_key(who, extra.key.id)
    assert again.revoked_at == START + timedelta(minutes=5)
    assert state == before
    assert await service.authenticate(extra.token) is None


async def test_a_key_can_revoke_itself(service: AccountsService) -> None:
    result = await do_signup(service)
    who = principal(result)
    await service.revoke_api_key(who, who.api_key_id)
    assert await service.authenticate(result.api_key.token) is None


async def test_create_api_key(service: AccountsService, state: AccountsState, clock: ManualClock) -> None:
    result = await do_signup(service)
    who = principal(result)
    clock.advance(seconds=30)

    issued = await service.create_api_key(who, "deploy bot")

    assert issued.token.startswith("keel_")
    assert issued.token != result.api_key.token
    assert issued.key.name == "deploy bot"
    assert issued.key.tenant_id == who.tenant_id
    assert issued.key.created_at == START + timedelta(seconds=30)
    assert issued.key.revoked_at is None
    assert issued.key.secret_hash == hashlib.sha256(issued.token.encode()).hexdigest()
    assert issued.token.startswith(issued.key.display_prefix)
    assert state.api_keys[issued.key.id] == issued.key
    assert issued.token not in repr(state)
    assert await service.authenticate(issued.token) == Principal(tenant_id=who.tenant_id, api_key_id=issued.key.id)

    page = await service.list_api_keys(who, PageRequest())
    assert [k.id for k in page.items] == sorted([result.api_key.key.id, issued.key.id])
    assert page.next_after is None


async def test_list_api_keys_is_tenant_scoped_and_paged(service: AccountsService) -> None:
    acme = await do_signup(service, "Acme", "o@acme.test")
    globex = await do_signup(service, "Globex", "o@globex.test")
    ids = [acme.api_key.key.id]
    for i in range(4):
        ids.append((await service.create_api_key(principal(acme), f"k{i}")).key.id)
    await service.create_api_key(principal(globex), "theirs")

    seen: list[uuid.UUID] = []
    after = None
    while True:
        page = await service.list_api_keys(principal(acme), PageRequest(limit=2, after=after))
        seen.extend(k.id for k in page.items)
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == sorted(ids)


async def test_revoke_other_tenants_key_is_not_found(service: AccountsService, state: AccountsState) -> None:
    acme = await do_signup(service, "Acme", "o@acme.test")
    globex = await do_signup(service, "Globex", "o@globex.test")
    before = snapshot(state)
    with pytest.raises(ApiKeyNotFound):
        await service.revoke_api_key(principal(acme), globex.api_key.key.id)
    with pytest.raises(ApiKeyNotFound):
        await service.revoke_api_key(principal(acme), uuid.uuid4())
    assert state == before
    assert await service.authenticate(globex.api_key.token) == principal(globex)


# -- tenant config ----------------------------------------------------------------------------


async def test_get_tenant(service: AccountsService) -> None:
    result = await do_signup(service)
    assert await service.get_tenant(principal(result)) == result.tenant


async def test_get_missing_tenant(service: AccountsService) -> None:
    with pytest.raises(TenantNotFound):
        await service.get_tenant(Principal(tenant_id=uuid.uuid4(), api_key_id=uuid.uuid4()))
    with pytest.raises(TenantNotFound):
        await service.change_tenant_config(
            Principal(tenant_id=uuid.uuid4(), api_key_id=uuid.uuid4()), ChangeTenantConfig(locale="de")
        )


async def test_change_tenant_config_partial(service: AccountsService, state: AccountsState, clock: ManualClock) -> None:
    result = await service.signup(
        Signup(organization="Acme", owner_email="o@acme.test", owner_name="O", timezone="Europe/Paris", locale="fr")
    )
    who = principal(result)

    clock.advance(minutes=1)
    t1 = await service.change_tenant_config(who, ChangeTenantConfig(rate_limit_per_minute=600))
    assert t1.config == TenantConfig(
        display_name="Acme", timezone="Europe/Paris", locale="fr", rate_limit_per_minute=600
    )
    assert t1.updated_at == START + timedelta(minutes=1)
    assert t1.created_at == START
    assert state.tenants[who.tenant_id] == t1

    clock.advance(minutes=1)
    t2 = await service.change_tenant_config(who, ChangeTenantConfig(display_name="Acme Inc.", timezone="Asia/Tokyo"))
    assert t2.config == TenantConfig(
        display_name="Acme Inc.", timezone="Asia/Tokyo", locale="fr", rate_limit_per_minute=600
    )
    assert t2.updated_at == START + timedelta(minutes=2)
    # The tenant's name is not its display name.
    assert t2.name == "Acme"

    clock.advance(minutes=1)
    t3 = await service.change_tenant_config(who, ChangeTenantConfig(rate_limit_per_minute=None))
    assert t3.config == TenantConfig(display_name="Acme Inc.", timezone="Asia/Tokyo", locale="fr")
    assert t3.config.rate_limit_per_minute is None
    assert t3.updated_at == START + timedelta(minutes=3)
    assert await service.get_tenant(who) == t3


async def test_change_tenant_config_empty_change_keeps_config(service: AccountsService) -> None:
    result = await do_signup(service)
    t = await service.change_tenant_config(principal(result), ChangeTenantConfig())
    assert t.config == result.tenant.config


async def test_change_tenant_config_unknown_timezone(service: AccountsService, state: AccountsState) -> None:
    result = await do_signup(service)
    before = snapshot(state)
    with pytest.raises(UnknownTimezone):
        await service.change_tenant_config(
            principal(result), ChangeTenantConfig(timezone="Not/AZone", locale="de", rate_limit_per_minute=5)
        )
    assert state == before


async def test_change_tenant_config_is_tenant_scoped(service: AccountsService, state: AccountsState) -> None:
    acme = await do_signup(service, "Acme", "o@acme.test")
    globex = await do_signup(service, "Globex", "o@globex.test")
    await service.change_tenant_config(principal(acme), ChangeTenantConfig(locale="de"))
    assert state.tenants[globex.tenant.id] == globex.tenant


# -- users ------------------------------------------------------------------------------------


async def test_create_get_list_users(service: AccountsService, state: AccountsState, clock: ManualClock) -> None:
    result = await do_signup(service)
    who = principal(result)
    clock.advance(seconds=10)

    user = await service.create_user(who, CreateUser(email=" Bob@Example.TEST", name="Bob"))
    assert user.email == "bob@example.test"
    assert user.name == "Bob"
    assert user.role is Role.MEMBER
    assert user.tenant_id == who.tenant_id
    assert user.created_at == user.updated_at == START + timedelta(seconds=10)
    assert state.users[user.id] == user

    assert await service.get_user(who, user.id) == user
    assert await service.get_user(who, result.owner.id) == result.owner

    page = await service.list_users(who, PageRequest())
    assert sorted(u.id for u in page.items) == sorted([result.owner.id, user.id])
    assert page.next_after is None


async def test_list_users_is_tenant_scoped_and_paged(service: AccountsService) -> None:
    acme = await do_signup(service, "Acme", "o@acme.test")
    await do_signup(service, "Globex", "o@globex.test")
    ids = [acme.owner.id]
    for i in range(4):
        ids.append((await service.create_user(principal(acme), CreateUser(email=f"u{i}@acme.test", name="U"))).id)

    first = await service.list_users(principal(acme), PageRequest(limit=3))
    assert len(first.items) == 3
    assert first.next_after == first.items[-1].id
    second = await service.list_users(principal(acme), PageRequest(limit=3, after=first.next_after))
    assert second.next_after is None
    assert [u.id for u in [*first.items, *second.items]] == sorted(ids)


@pytest.mark.parametrize("email", ["bob@example.test", "BOB@example.test", "  Bob@Example.Test  "])
async def test_create_user_duplicate_email(service: AccountsService, state: AccountsState, email: str) -> None:
    result = await do_signup(service)
    who = principal(result)
    await service.create_user(who, CreateUser(email="bob@example.test", name="Bob"))
    before = snapshot(state)
    with pytest.raises(EmailTaken) as exc:
        await service.create_user(who, CreateUser(email=email, name="Other Bob"))
    assert exc.value.pointer == "#/email"
    assert state == before


async def test_create_user_with_owner_email(service: AccountsService, state: AccountsState) -> None:
    result = await do_signup(service, email="owner@acme.test")
    before = snapshot(state)
    with pytest.raises(EmailTaken):
        await service.create_user(principal(result), CreateUser(email="OWNER@acme.test", name="Impostor"))
    assert state == before


async def test_change_user(service: AccountsService, state: AccountsState, clock: ManualClock) -> None:
    result = await do_signup(service)
    who = principal(result)
    user = await service.create_user(who, CreateUser(email="bob@example.test", name="Bob"))

    clock.advance(minutes=1)
    renamed = await service.change_user(who, user.id, ChangeUser(name="Robert"))
    assert renamed.name == "Robert"
    assert renamed.email == "bob@example.test"
    assert renamed.created_at == START
    assert renamed.updated_at == START + timedelta(minutes=1)
    assert state.users[user.id] == renamed

    clock.advance(minutes=1)
    moved = await service.change_user(who, user.id, ChangeUser(email=" Robert@Example.TEST "))
    assert moved.email == "robert@example.test"
    assert moved.name == "Robert"
    assert moved.updated_at == START + timedelta(minutes=2)
    assert await service.get_user(who, user.id) == moved


@pytest.mark.parametrize(
    "change",
    [
        ChangeUser(),
        ChangeUser(name="Bob"),
        ChangeUser(email="bob@example.test"),
        ChangeUser(email="  BOB@Example.test"),
        ChangeUser(email="Bob@example.test", name="Bob"),
    ],
)
async def test_change_user_with_no_effect_leaves_updated_at(
    service: AccountsService, state: AccountsState, clock: ManualClock, change: ChangeUser
) -> None:
    result = await do_signup(service)
    who = principal(result)
    user = await service.create_user(who, CreateUser(email="bob@example.test", name="Bob"))
    clock.advance(hours=1)
    before = snapshot(state)

    same = await service.change_user(who, user.id, change)
    assert same == user
    assert same.updated_at == START
    assert state == before


async def test_change_user_to_taken_email(service: AccountsService, state: AccountsState, clock: ManualClock) -> None:
    result = await do_signup(service, email="owner@acme.test")
    who = principal(result)
    user = await service.create_user(who, CreateUser(email="bob@example.test", name="Bob"))
    clock.advance(minutes=1)
    before = snapshot(state)
    with pytest.raises(EmailTaken):
        # Name and email in one change: neither part may be applied.
        await service.change_user(who, user.id, ChangeUser(email="Owner@Acme.test", name="Robert"))
    assert state == before
    assert await service.get_user(who, user.id) == user


async def test_delete_user(service: AccountsService, state: AccountsState) -> None:
    result = await do_signup(service)
    who = principal(result)
    user = await service.create_user(who, CreateUser(email="bob@example.test", name="Bob"))

    await service.delete_user(who, user.id)
    assert user.id not in state.users
    with pytest.raises(UserNotFound):
        await service.get_user(who, user.id)
    with pytest.raises(UserNotFound):
        await service.delete_user(who, user.id)
    # The email is free again.
    again = await service.create_user(who, CreateUser(email="bob@example.test", name="Bob II"))
    assert again.id != user.id


async def test_owner_cannot_be_deleted(service: AccountsService, state: AccountsState) -> None:
    result = await do_signup(service)
    before = snapshot(state)
    with pytest.raises(OwnerUndeletable):
        await service.delete_user(principal(result), result.owner.id)
    assert state == before


async def test_other_tenants_users_are_not_found(service: AccountsService, state: AccountsState) -> None:
    acme = await do_signup(service, "Acme", "o@acme.test")
    globex = await do_signup(service, "Globex", "o@globex.test")
    theirs = await service.create_user(principal(globex), CreateUser(email="bob@globex.test", name="Bob"))
    before = snapshot(state)
    me = principal(acme)

    for user_id in (theirs.id, globex.owner.id, uuid.uuid4()):
        with pytest.raises(UserNotFound):
            await service.get_user(me, user_id)
        with pytest.raises(UserNotFound):
            await service.change_user(me, user_id, ChangeUser(name="Hijacked"))
        with pytest.raises(UserNotFound):
            await service.delete_user(me, user_id)
    assert state == before
    listed = await service.list_users(me, PageRequest())
    assert [u.id for u in listed.items] == [acme.owner.id]


# -- avatars (set by the media context through accounts.public.Profiles) -------------------------


def avatar_url(user: User) -> str:
    return f"/v1/users/{user.id}/avatar"


async def test_set_avatar_points_the_profile_at_it_and_records_one_user_updated(
    service: AccountsService, state: AccountsState, clock: ManualClock
) -> None:
    result = await do_signup(service)
    user = await service.create_user(principal(result), CreateUser(email="bob@example.test", name="Bob"))
    assert user.avatar_url is None
    published = len(state.outbox)
    clock.advance(minutes=3)

    assert await service.set_avatar(result.tenant.id, user.id, avatar_url(user)) is True

    stored = state.users[user.id]
    assert stored == replace(user, avatar_url=avatar_url(user), updated_at=START + timedelta(minutes=3))
    (event,) = state.outbox[published:]
    assert event.type == "user.updated"
    assert event.tenant_id == result.tenant.id
    assert event.occurred_at == START + timedelta(minutes=3)
    assert dict(event.data) == {"user_id": str(user.id), "changed": ["avatar_url"]}
    # Nobody else changed.
    assert state.users[result.owner.id] == result.owner


async def test_set_avatar_to_the_same_url_again_changes_nothing(
    service: AccountsService, state: AccountsState, clock: ManualClock
) -> None:
    result = await do_signup(service)
    user = await service.create_user(principal(result), CreateUser(email="bob@example.test", name="Bob"))
    assert await service.set_avatar(result.tenant.id, user.id, avatar_url(user)) is True
    clock.advance(hours=1)
    before = snapshot(state)

    # A job that runs twice (or a newer upload of the same user) sets the same URL: found, nothing written.
    assert await service.set_avatar(result.tenant.id, user.id, avatar_url(user)) is True
    assert state == before
    assert state.users[user.id].updated_at == START


async def test_set_avatar_to_none_clears_it_with_an_event(
    service: AccountsService, state: AccountsState, clock: ManualClock
) -> None:
    result = await do_signup(service)
    user = await service.create_user(principal(result), CreateUser(email="bob@example.test", name="Bob"))
    await service.set_avatar(result.tenant.id, user.id, avatar_url(user))
    published = len(state.outbox)
    clock.advance(minutes=1)

    assert await service.set_avatar(result.tenant.id, user.id, None) is True
    assert state.users[user.id].avatar_url is None
    assert state.users[user.id].updated_at == START + timedelta(minutes=1)
    assert [(e.type, dict(e.data)) for e in state.outbox[published:]] == [
        ("user.updated", {"user_id": str(user.id), "changed": ["avatar_url"]})
    ]
    # Already clear: nothing more.
    before = snapshot(state)
    assert await service.set_avatar(result.tenant.id, user.id, None) is True
    assert state == before


async def test_set_avatar_of_an_unknown_or_other_tenants_user_writes_nothing(
    service: AccountsService, state: AccountsState
) -> None:
    acme = await do_signup(service, "Acme", "o@acme.test")
    globex = await do_signup(service, "Globex", "o@globex.test")
    theirs = await service.create_user(principal(globex), CreateUser(email="bob@globex.test", name="Bob"))
    gone = await service.create_user(principal(acme), CreateUser(email="gone@acme.test", name="Gone"))
    await service.delete_user(principal(acme), gone.id)
    before = snapshot(state)

    for user_id in (theirs.id, globex.owner.id, gone.id, uuid.uuid4()):
        assert await service.set_avatar(acme.tenant.id, user_id, f"/v1/users/{user_id}/avatar") is False
    # A user under a tenant that does not exist at all.
    assert await service.set_avatar(uuid.uuid4(), theirs.id, avatar_url(theirs)) is False
    assert state == before
    assert state.users[theirs.id].avatar_url is None


async def test_the_cached_user_shows_the_new_avatar_once_its_event_is_dispatched(
    state: AccountsState, clock: ManualClock
) -> None:
    publishers: list[HeldPublisher] = []

    def held(dispatcher: EventDispatcher) -> HeldPublisher:
        publishers.append(HeldPublisher(dispatcher))
        return publishers[-1]

    service = accounts_service(state, clock, publisher=held)
    (publisher,) = publishers
    result = await do_signup(service)
    user = await service.create_user(principal(result), CreateUser(email="bob@example.test", name="Bob"))
    await publisher.release()
    # Read once: the user is now cached.
    assert (await service.find_user(result.tenant.id, user.id)) == user
    state.users[user.id] = replace(user, name="Behind the service's back")
    assert (await service.find_user(result.tenant.id, user.id)) == user, "the read should come from the cache"
    state.users[user.id] = user

    clock.advance(minutes=1)
    assert await service.set_avatar(result.tenant.id, user.id, avatar_url(user)) is True
    assert [e.type for e in publisher.held] == ["user.updated"]
    await publisher.release()

    expected = replace(user, avatar_url=avatar_url(user), updated_at=START + timedelta(minutes=1))
    assert await service.find_user(result.tenant.id, user.id) == expected
    assert await service.get_user(principal(result), user.id) == expected
    # And that value is what is cached now (avatar_url survives the cache's encoding).
    state.users[user.id] = user
    assert await service.find_user(result.tenant.id, user.id) == expected


async def test_changing_a_user_keeps_their_avatar(
    service: AccountsService, state: AccountsState, clock: ManualClock
) -> None:
    result = await do_signup(service)
    who = principal(result)
    user = await service.create_user(who, CreateUser(email="bob@example.test", name="Bob"))
    await service.set_avatar(result.tenant.id, user.id, avatar_url(user))
    clock.advance(minutes=1)
    renamed = await service.change_user(who, user.id, ChangeUser(name="Robert", email="robert@example.test"))
    assert renamed.avatar_url == avatar_url(user)
    assert state.users[user.id].avatar_url == avatar_url(user)
    assert await service.get_user(who, user.id) == renamed


async def test_the_public_profiles_port_sets_the_avatar_through_the_service(
    service: AccountsService, state: AccountsState
) -> None:
    profiles: Profiles = AccountsDirectory(service)
    result = await do_signup(service)
    user = await service.create_user(principal(result), CreateUser(email="bob@example.test", name="Bob"))
    assert await profiles.set_avatar(result.tenant.id, user.id, avatar_url(user)) is True
    assert state.users[user.id].avatar_url == avatar_url(user)
    assert state.outbox[-1].type == "user.updated"
    assert await profiles.set_avatar(result.tenant.id, uuid.uuid4(), "/v1/users/x/avatar") is False


# -- atomicity --------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


@dataclass
class _FailingKeys:
    inner: object

    async def add(self, key: ApiKey) -> None:
        raise Boom("disk full")


@dataclass
class _FailingUsers:
    inner: object

    async def add(self, user: User) -> None:
        await self.inner.add(user)  # type: ignore[attr-defined]

    async def update(self, user: User) -> None:
        await self.inner.update(user)  # type: ignore[attr-defined]
        raise Boom("connection lost")

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class FailingUnitOfWork(InMemoryAccountsUnitOfWork):
    """Fails after part of the use case's writes were staged: adding a key, or right after a user update."""

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self.api_keys = _FailingKeys(self.api_keys)  # type: ignore[assignment]
        self.users = _FailingUsers(self.users)  # type: ignore[assignment]
        return self


async def test_signup_failure_midway_commits_nothing(state: AccountsState, clock: ManualClock) -> None:
    failing = accounts_service(state, clock, FailingUnitOfWork)
    with pytest.raises(Boom):
        await do_signup(failing)
    # Tenant and owner were staged before the key failed; none of it is visible.
    assert state == AccountsState()


async def test_change_user_failure_midway_commits_nothing(
    service: AccountsService, state: AccountsState, clock: ManualClock
) -> None:
    result = await do_signup(service)
    who = principal(result)
    user = await service.create_user(who, CreateUser(email="bob@example.test", name="Bob"))
    before = snapshot(state)
    clock.advance(minutes=1)

    failing = accounts_service(state, clock, FailingUnitOfWork)
    with pytest.raises(Boom):
        await failing.change_user(who, user.id, ChangeUser(name="Robert"))
    with pytest.raises(Boom):
        await failing.create_api_key(who, "never")
    assert state == before
    assert await service.get_user(who, user.id) == user
