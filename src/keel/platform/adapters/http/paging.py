"""Opaque cursors for keyset pagination: base64url of the last id seen."""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Annotated

from litestar.params import Parameter

from keel.platform.domain.errors import InvalidInput
from keel.platform.domain.paging import MAX_PAGE_SIZE, PageRequest

LimitParam = Annotated[int, Parameter(ge=1, le=MAX_PAGE_SIZE, description="Page size (1-100).")]
CursorParam = Annotated[
    str | None,
    Parameter(max_length=64, description="Opaque cursor from the previous page's `next_cursor`."),
]


_CURSOR_LEN = 22  # 16 bytes in unpadded base64url


class InvalidCursor(InvalidInput):
    def __init__(self) -> None:
        super().__init__("The cursor is not one this API issued.", pointer="#/cursor")


def encode_cursor(after: uuid.UUID | None) -> str | None:
    return base64.urlsafe_b64encode(after.bytes).rstrip(b"=").decode() if after is not None else None


def decode_cursor(cursor: str | None) -> uuid.UUID | None:
    if cursor is None:
        return None
    if len(cursor) != _CURSOR_LEN:
        raise InvalidCursor
    try:
        # validate=True: characters outside the alphabet are an error, not silently skipped.
        raw = base64.b64decode(cursor + "==", altchars=b"-_", validate=True)
        return uuid.UUID(bytes=raw)
    except (binascii.Error, ValueError):
        raise InvalidCursor from None


def page_request(limit: int, cursor: str | None) -> PageRequest:
    return PageRequest(limit=limit, after=decode_cursor(cursor))
