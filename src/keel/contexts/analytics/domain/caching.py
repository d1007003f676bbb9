"""Cache keys of the analytics context.

A summary is computed from many rows, so it cannot be invalidated key by key. Each key embeds the
tenant's *generation*: a token kept in the cache and replaced (deleted) by anything that changes a
summary's inputs; entries of an old generation are never read again and expire. There are two
generations, so that today's activity (every payment) leaves summaries of past days cached:

- ``live``: today's figures. Part of the key only when the range includes today.
- ``history``: closed days. A rollup, a late change to a closed day (a refund of last week's
  payment), or API requests flushed after midnight replace it.
"""

from __future__ import annotations

import uuid
from datetime import date
from typing import Literal

Scope = Literal["live", "history"]

SUMMARY_TTL = 300.0  # the safety net under event-driven invalidation
GENERATION_TTL = 2 * 86400.0  # a lapsed generation only costs one recomputation

_VERSION = "1"  # bump when Summary changes shape


def generation_key(tenant_id: uuid.UUID, scope: Scope) -> str:
    return f"analytics:gen:v{_VERSION}:{tenant_id}:{scope}"


def summary_key(
    tenant_id: uuid.UUID, history: str, live: str | None, start: date, end: date, currency: str | None
) -> str:
    return f"analytics:summary:v{_VERSION}:{tenant_id}:{history}:{live or '-'}:{start}:{end}:{currency or '*'}"
