from __future__ import annotations

from typing import Any

from litestar import Request

from keel.platform.domain.tenancy import Principal


def provide_principal(request: Request[Principal, Any, Any]) -> Principal:
    """The authenticated caller; the auth middleware guarantees it on every non-public route."""
    return request.user
