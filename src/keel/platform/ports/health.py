from __future__ import annotations

from typing import Protocol


class HealthCheck(Protocol):
    """One dependency probed by readiness (``/healthz``)."""

    name: str
    component_type: str

    async def check(self) -> None:
        """Return when the dependency answers; raise when it does not."""
        ...
