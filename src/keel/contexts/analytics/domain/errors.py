from __future__ import annotations

from keel.platform.domain.errors import InvalidInput


class InvalidRange(InvalidInput):
    """A date range the summary or a rollup cannot take (reported as a validation error)."""
