from __future__ import annotations

from datetime import datetime
from typing import Protocol


class Clock(Protocol):
    """Source of the current time; tests substitute a controllable one."""

    def now(self) -> datetime:
        """Timezone-aware UTC now."""
        ...
