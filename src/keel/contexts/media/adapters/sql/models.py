from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from advanced_alchemy.types import GUID, DateTimeUTC, JsonB
from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from keel.platform.adapters.sql.base import Base


class AvatarRow(Base):
    __tablename__ = "avatars"

    # One avatar per user; user ids are unique across tenants, and every read also names the tenant.
    user_id: Mapped[uuid.UUID] = mapped_column(GUID, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(GUID)
    upload_id: Mapped[uuid.UUID] = mapped_column(GUID)
    status: Mapped[str] = mapped_column(String(20))
    original_key: Mapped[str] = mapped_column(String(300))
    original_type: Mapped[str] = mapped_column(String(50))
    # {"64": {"key": …, "etag": …, "size_bytes": …}, …}
    variants: Mapped[dict[str, Any]] = mapped_column(JsonB)
    error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTimeUTC(timezone=True))
