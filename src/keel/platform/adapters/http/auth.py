from __future__ import annotations

from typing import Any

from litestar import Request

from keel.platform.domain.tenancy import Principal

BEARER_SCHEME = "BearerAuth"
# OpenAPI security requirement for operations that need an API key (set per controller, so
# public operations such as signup are documented as open).
BEARER_AUTH: list[dict[str, list[str]]] = [{BEARER_SCHEME: []}]


# The request of an authenticated route: its ``user`` is the caller, which the auth middleware
# guarantees on every non-public route. Handlers take it instead of a ``principal`` dependency
# because Litestar resolves two dependencies of one handler concurrently, in an anyio task group per
# request: 30-60 us, a fifth of a cached read.
Authenticated = Request[Principal, Any, Any]
