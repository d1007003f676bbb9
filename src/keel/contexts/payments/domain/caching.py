"""What the payments context caches and which of its events invalidate it (see accounts' caching)."""

from __future__ import annotations

import uuid

from keel.platform.domain.events import Event

SCHEMA = 1
_PREFIX = f"keel:payments:v{SCHEMA}"

PAYMENT_TTL = 300.0

# Every event that changes a stored payment after its creation.
_CHANGES_PAYMENT = frozenset(
    {"payment.succeeded", "payment.failed", "payment.refunded", "payment.refund_failed", "refund.created"}
)


def payment_key(tenant_id: uuid.UUID, payment_id: uuid.UUID) -> str:
    return f"{_PREFIX}:payment:{tenant_id}:{payment_id}"


def keys_to_invalidate(event: Event) -> list[str]:
    if event.type in _CHANGES_PAYMENT:
        return [payment_key(event.tenant_id, uuid.UUID(event.data["payment_id"]))]
    return []
