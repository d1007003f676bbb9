from __future__ import annotations

from typing import Any

from litestar import Request

from keel.platform.domain.tenancy import Principal

BEARER_SCHEME = "BearerAuth"
# OpenAPI security requirement for operations that need an API key (set per controller, so
# public operations such as signup are documented as open).
BEARER_AUTH: list[dict[str, list[str]]] = [{BEARER_SCHEME: []}]


def provide_principal(request: Request[Principal, Any, Any]) -> Principal:
    """The authenticated caller; the auth middleware guarantees it on every non-public route."""
    return request.user
