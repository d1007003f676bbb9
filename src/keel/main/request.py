"""Keel's Request: undecodable JSON is the client's fault (400), whatever the decoder raised."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.exceptions import ClientException


class KeelRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        if not await self.body():
            raise ClientException("The request body is empty; send a JSON document.")
        try:
            return await super().json()
        except UnicodeDecodeError:
            raise ClientException("JSON is malformed: the body is not valid UTF-8.") from None
        except RecursionError:
            # msgspec recurses once per nesting level; a hostile body can exhaust the stack.
            raise ClientException("JSON is malformed: nesting is too deep.") from None
