"""SQL for calendar days in UTC, the same on Postgres and SQLite."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import Date
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement


class utc_date(FunctionElement[date]):
    """The UTC calendar day of a timestamp column. Postgres's ``date()`` would use the session's time
    zone; SQLite stores DateTimeUTC columns as UTC text already."""

    type = Date()
    name = "utc_date"
    inherit_cache = True


@compiles(utc_date, "postgresql")
def _utc_date_postgres(element: utc_date, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(({compiler.process(element.clauses, **kw)}) AT TIME ZONE 'UTC')::date"


@compiles(utc_date, "sqlite")
def _utc_date_sqlite(element: utc_date, compiler: SQLCompiler, **kw: Any) -> str:
    return f"date({compiler.process(element.clauses, **kw)})"
