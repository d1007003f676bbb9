"""Accounts entities and value objects. Pure Python: no framework, no driver."""

from __future__ import annotations

import enum
import hashlib
import secrets
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime

import msgspec

from keel.contexts.accounts.domain.errors import EmailTooLong

API_KEY_PREFIX = "keel_"
# Enough of the token to recognise a key in a list without making it guessable.
API_KEY_DISPLAY_CHARS = 12


class Role(enum.StrEnum):
    OWNER = "owner"
    MEMBER = "member"


class TenantConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Typed per-tenant settings, stored as one document so new settings need no migration.

    Unknown keys are tolerated when loading so that a rollback to an older release still reads
    documents written by a newer one.
    """

    display_name: str
    timezone: str = "UTC"
    locale: str = "en"
    # Requests per minute per API key; None means the platform default.
    rate_limit_per_minute: int | None = None


@dataclass(slots=True, kw_only=True)
class Tenant:
    id: uuid.UUID
    name: str
    config: TenantConfig
    created_at: datetime
    updated_at: datetime


@dataclass(slots=True, kw_only=True)
class User:
    id: uuid.UUID
    tenant_id: uuid.UUID
    email: str
    name: str
    role: Role
    created_at: datetime
    updated_at: datetime
    avatar_url: str | None = None  # set by the media context once the avatar's variants exist


@dataclass(slots=True, kw_only=True)
class ApiKey:
    id: uuid.UUID
    tenant_id: uuid.UUID
    name: str
    display_prefix: str
    secret_hash: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def revoked(self, at: datetime) -> ApiKey:
        return self if self.revoked_at is not None else replace(self, revoked_at=at)


@dataclass(frozen=True, slots=True)
class IssuedApiKey:
    """A freshly created key together with its secret: the only time the token exists in clear."""

    key: ApiKey
    token: str = field(repr=False)


def hash_token(token: str) -> str:
    # A plain SHA-256 suffices: tokens carry 256 bits of randomness, so there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def generate_token() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


MAX_EMAIL_LENGTH = 320


def normalize_email(email: str) -> str:
    """Lower-cased for uniqueness; rejected if that makes it too long ("İ".lower() is two characters)."""
    normalized = email.strip().lower()
    if len(normalized) > MAX_EMAIL_LENGTH:
        raise EmailTooLong
    return normalized
