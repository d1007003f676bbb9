"""Bearer API-key authentication for every route not marked public."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import ASGIApp

from keel.contexts.accounts.public import Authenticator

PUBLIC_PATHS = ["^/healthz$", "^/livez$", "^/openapi", "^/docs", "^/problems"]
_MAX_TOKEN_LEN = 256


class ApiKeyAuthMiddleware(AbstractAuthenticationMiddleware):
    def __init__(self, app: ASGIApp, authenticator: Authenticator, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._authenticator = authenticator

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        header = connection.headers.get("authorization")
        if not header:
            raise NotAuthorizedException("Send your API key as 'Authorization: Bearer <key>'.")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN_LEN:
            raise NotAuthorizedException("The Authorization header must be 'Bearer <key>'.")
        principal = await self._authenticator.authenticate(token)
        if principal is None:
            raise NotAuthorizedException("The API key is unknown or revoked.")
        return AuthenticationResult(user=principal, auth=principal.api_key_id)
