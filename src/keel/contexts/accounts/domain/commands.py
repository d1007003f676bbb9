"""Inputs of the accounts use cases, already validated for shape at the edge."""

from __future__ import annotations

import msgspec


class Signup(msgspec.Struct, frozen=True, kw_only=True):
    organization: str
    owner_email: str
    owner_name: str
    timezone: str = "UTC"
    locale: str = "en"


class CreateUser(msgspec.Struct, frozen=True, kw_only=True):
    email: str
    name: str


class ChangeUser(msgspec.Struct, frozen=True, kw_only=True):
    email: str | msgspec.UnsetType = msgspec.UNSET
    name: str | msgspec.UnsetType = msgspec.UNSET


class ChangeTenantConfig(msgspec.Struct, frozen=True, kw_only=True):
    display_name: str | msgspec.UnsetType = msgspec.UNSET
    timezone: str | msgspec.UnsetType = msgspec.UNSET
    locale: str | msgspec.UnsetType = msgspec.UNSET
    # None resets to the platform default, UNSET leaves it alone.
    rate_limit_per_minute: int | msgspec.UnsetType | None = msgspec.UNSET
