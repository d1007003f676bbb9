"""A request body must arrive whole within a deadline.

granian bounds the time headers may take but not the body: a client sending one byte of its body every
few seconds would hold a connection and a request for as long as it likes (a slow-body attack). The
deadline starts with the first read of the body and covers all of it; when it passes, the request is
answered 408 problem+json and the server stops waiting.
"""

from __future__ import annotations

import asyncio

from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send


class BodyDeadlineMiddleware:
    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self._timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        deadline: float | None = None
        whole = False

        async def within_deadline() -> ReceiveMessage:
            nonlocal deadline, whole
            if whole:
                return await receive()  # later reads only watch for a disconnect
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self._timeout
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    status_code=408,
                    detail=f"The request body did not arrive within {self._timeout:g} seconds.",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                whole = True
            return message

        await self.app(scope, within_deadline, send)
