"""What the accounts context caches, under which deterministic keys, and which events invalidate them.

Keys carry a schema version: changing the shape of a cached type means bumping ``SCHEMA``, and old
entries simply age out.
"""

from __future__ import annotations

import uuid

from keel.platform.domain.events import Event

SCHEMA = 2  # 2: users carry avatar_url
_PREFIX = f"keel:accounts:v{SCHEMA}"

API_KEY_TTL = 300.0
USER_TTL = 300.0
TENANT_TTL = 300.0


def api_key_key(secret_hash: str) -> str:
    return f"{_PREFIX}:api-key:{secret_hash}"


def user_key(tenant_id: uuid.UUID, user_id: uuid.UUID) -> str:
    return f"{_PREFIX}:user:{tenant_id}:{user_id}"


def tenant_key(tenant_id: uuid.UUID) -> str:
    return f"{_PREFIX}:tenant:{tenant_id}"


def keys_to_invalidate(event: Event) -> list[str]:
    match event.type:
        case "user.updated" | "user.deleted":
            return [user_key(event.tenant_id, uuid.UUID(event.data["user_id"]))]
        case "tenant.updated":
            return [tenant_key(event.tenant_id)]
        case "api_key.revoked":
            return [api_key_key(event.data["secret_hash"])]
        case _:
            return []
