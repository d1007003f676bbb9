"""Ambient request context, readable from any layer (logs, jobs, outgoing calls)."""

from __future__ import annotations

from contextvars import ContextVar

request_id_var: ContextVar[str | None] = ContextVar("keel_request_id", default=None)
