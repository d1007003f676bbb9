from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from keel.platform.domain.paging import HasId, Page, PageRequest

E = TypeVar("E", bound=HasId)


async def keyset_page(
    session: AsyncSession,
    stmt: Select[Any],
    id_column: InstrumentedAttribute[Any],
    page: PageRequest,
    to_entity: Callable[[Any], E],
    *,
    newest_first: bool = False,
) -> Page[E]:
    """One page of ``stmt`` ordered by a time-ordered id, resuming after ``page.after``."""
    if page.after is not None:
        stmt = stmt.where(id_column < page.after if newest_first else id_column > page.after)
    order = id_column.desc() if newest_first else id_column
    rows = (await session.execute(stmt.order_by(order).limit(page.fetch))).scalars().all()
    return Page.from_overfetch([to_entity(r) for r in rows], page)
