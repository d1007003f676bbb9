from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession


def is_unique_violation(exc: IntegrityError, constraint: str) -> bool:
    """True when ``exc`` was raised by the named unique constraint (Postgres) or its columns (SQLite)."""
    orig = exc.orig
    name = getattr(getattr(orig, "__cause__", None), "constraint_name", None) or getattr(orig, "constraint_name", None)
    if name is not None:
        return bool(name == constraint)
    return "UNIQUE constraint failed" in str(orig)


async def insert_unless_exists(
    session: AsyncSession, model: Any, values: Mapping[str, Any], unique: Sequence[str]
) -> bool:
    """INSERT … ON CONFLICT (unique) DO NOTHING; True when the row was inserted.

    Preferred to catching the violation inside a SAVEPOINT: on SQLite a savepoint that is the first
    write of a transaction *is* the transaction, and releasing it commits the row early.
    """
    dialect = postgresql if session.bind.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(model).values(**values).on_conflict_do_nothing(index_elements=list(unique))
    result = await session.execute(stmt)
    return bool(getattr(result, "rowcount", 0))
