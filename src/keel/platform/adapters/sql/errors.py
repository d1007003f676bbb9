from __future__ import annotations

from sqlalchemy.exc import IntegrityError


def is_unique_violation(exc: IntegrityError, constraint: str) -> bool:
    """True when ``exc`` was raised by the named unique constraint (Postgres) or its columns (SQLite)."""
    orig = exc.orig
    name = getattr(getattr(orig, "__cause__", None), "constraint_name", None) or getattr(orig, "constraint_name", None)
    if name is not None:
        return bool(name == constraint)
    return "UNIQUE constraint failed" in str(orig)
