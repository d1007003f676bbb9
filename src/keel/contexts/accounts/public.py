"""The accounts context as other contexts and the composition root may see it."""

from __future__ import annotations

from typing import Protocol

from keel.platform.domain.tenancy import Principal


class Authenticator(Protocol):
    """Turns a presented API key into the principal it acts for."""

    async def authenticate(self, token: str) -> Principal | None:
        """None for unknown or revoked keys."""
        ...
