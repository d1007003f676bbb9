"""Schema migrations (alembic) driven from the composition root."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData

from keel.platform.adapters.sql.base import metadata


def all_metadata() -> MetaData:
    """The metadata of every context's tables; importing the model modules registers them."""
    import keel.contexts.accounts.adapters.sql.models
    import keel.contexts.analytics.adapters.sql.models
    import keel.contexts.media.adapters.sql.models
    import keel.contexts.notifications.adapters.sql.models
    import keel.contexts.payments.adapters.sql.models
    import keel.contexts.webhooks.adapters.sql.models
    import keel.platform.adapters.sql.outbox  # noqa: F401

    return metadata


def migrations_dir() -> Path:
    explicit = os.environ.get("KEEL_MIGRATIONS_DIR")
    if explicit:
        return Path(explicit)
    # src/keel/main/db.py -> repository root / migrations
    return Path(__file__).resolve().parents[3] / "migrations"


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["database_url"] = database_url
    return cfg


def _off_loop(fn: Callable[[], None]) -> None:
    """Alembic's env runs its own event loop; from inside a running loop it must use another thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        fn()
        return
    with ThreadPoolExecutor(1) as pool:
        pool.submit(fn).result()


def upgrade(database_url: str, revision: str = "head") -> None:
    _off_loop(lambda: command.upgrade(alembic_config(database_url), revision))


def downgrade(database_url: str, revision: str) -> None:
    _off_loop(lambda: command.downgrade(alembic_config(database_url), revision))
