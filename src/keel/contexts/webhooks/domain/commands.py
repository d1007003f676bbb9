from __future__ import annotations

import msgspec


class CreateEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    event_types: list[str]
    description: str = ""
    enabled: bool = True


class ChangeEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    url: str | None = None
    event_types: list[str] | None = None
    description: str | None = None
    enabled: bool | None = None
