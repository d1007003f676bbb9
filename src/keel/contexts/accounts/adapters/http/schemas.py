"""Request and response bodies of the accounts API. Validation happens here, at the edge."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from keel.contexts.accounts.domain.model import ApiKey, Role, Tenant, TenantConfig, User
from keel.platform.adapters.http.schemas import TEXT_PATTERN, Email, StrictInput, whole

_TEXT = TEXT_PATTERN

PersonName = Annotated[str, Meta(min_length=1, max_length=200, pattern=_TEXT, examples=["Ada Lovelace"])]
OrgName = Annotated[str, Meta(min_length=1, max_length=200, pattern=_TEXT, examples=["Analytical Engines Ltd"])]
KeyName = Annotated[str, Meta(min_length=1, max_length=100, pattern=_TEXT, examples=["ci-pipeline"])]
Timezone = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=whole(r"[A-Za-z0-9_+\-/]+"),
        description="IANA timezone.",
        examples=["Europe/London"],
    ),
]
Locale = Annotated[
    str,
    Meta(
        max_length=35,
        pattern=whole("[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*"),
        description="BCP 47 tag.",
        examples=["en-GB"],
    ),
]
RateLimit = Annotated[int, Meta(ge=1, le=100_000, description="Requests per minute per API key.")]


_In = StrictInput


class SignupIn(_In, frozen=True, kw_only=True, forbid_unknown_fields=True):
    organization: OrgName
    owner_email: Email
    owner_name: PersonName
    timezone: Timezone = "UTC"
    locale: Locale = "en"


class UserIn(_In, frozen=True, kw_only=True, forbid_unknown_fields=True):
    email: Email
    name: PersonName


class UserPatch(_In, frozen=True, kw_only=True, forbid_unknown_fields=True):
    email: Email | msgspec.UnsetType = msgspec.UNSET
    name: PersonName | msgspec.UnsetType = msgspec.UNSET


class TenantConfigPatch(_In, frozen=True, kw_only=True, forbid_unknown_fields=True):
    display_name: OrgName | msgspec.UnsetType = msgspec.UNSET
    timezone: Timezone | msgspec.UnsetType = msgspec.UNSET
    locale: Locale | msgspec.UnsetType = msgspec.UNSET
    rate_limit_per_minute: RateLimit | msgspec.UnsetType | None = msgspec.UNSET


class ApiKeyIn(_In, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: KeyName


class TenantConfigOut(msgspec.Struct, frozen=True, kw_only=True):
    display_name: str
    timezone: str
    locale: str
    rate_limit_per_minute: int | None

    @classmethod
    def of(cls, c: TenantConfig) -> TenantConfigOut:
        return cls(
            display_name=c.display_name,
            timezone=c.timezone,
            locale=c.locale,
            rate_limit_per_minute=c.rate_limit_per_minute,
        )


class TenantOut(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    name: str
    config: TenantConfigOut
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, t: Tenant) -> TenantOut:
        return cls(
            id=t.id, name=t.name, config=TenantConfigOut.of(t.config), created_at=t.created_at, updated_at=t.updated_at
        )


class UserOut(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    email: str
    name: str
    role: Role
    avatar_url: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, u: User) -> UserOut:
        return cls(
            id=u.id,
            email=u.email,
            name=u.name,
            role=u.role,
            avatar_url=u.avatar_url,
            created_at=u.created_at,
            updated_at=u.updated_at,
        )


class UserList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[UserOut]
    next_cursor: str | None


class ApiKeyOut(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, k: ApiKey) -> ApiKeyOut:
        return cls(id=k.id, name=k.name, prefix=k.display_prefix, created_at=k.created_at, revoked_at=k.revoked_at)


class ApiKeyList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[ApiKeyOut]
    next_cursor: str | None


class IssuedApiKeyOut(ApiKeyOut, frozen=True, kw_only=True):
    token: str


class SignupOut(msgspec.Struct, frozen=True, kw_only=True):
    tenant: TenantOut
    user: UserOut
    api_key: IssuedApiKeyOut
