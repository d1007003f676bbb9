"""One declarative base and metadata for every context's tables, so one alembic history covers them.

advanced-alchemy supplies the registry: its naming convention (stable constraint names across
SQLite and Postgres) and portable column types (GUID, DateTimeUTC, JsonB).
"""

from __future__ import annotations

from advanced_alchemy.base import DefaultBase

Base = DefaultBase
metadata = Base.metadata
