"""Who is calling: every tenant-scoped operation takes the principal's tenant id."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID
