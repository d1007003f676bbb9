"""Edge validation shared by every context's HTTP adapter."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec
from litestar import Request
from litestar.exceptions import ValidationException
from msgspec import Meta

T = TypeVar("T")

# Printable text: no control characters, no line breaks of any kind (NEL, LINE and PARAGRAPH
# SEPARATOR break email headers too), no invisible formatting characters that can disguise a name
# (bidi overrides and isolates, zero-width characters, BOM), no surrounding whitespace.
_BAD = r"\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
_TEXT = rf"[^\s{_BAD}](?:[^{_BAD}]*[^\s{_BAD}])?"


def whole(pattern: str) -> str:
    """A pattern that must match the whole value. msgspec tests patterns with ``re.search``, where
    ``$`` also matches before a final newline; ``(?!\n)`` closes that gap (and means the same in the
    ECMA dialect the OpenAPI document is read in)."""
    return rf"^(?:{pattern})$(?!\n)"


TEXT_PATTERN = whole(_TEXT)
OPTIONAL_TEXT_PATTERN = whole(rf"(?:{_TEXT})?")  # the same, or empty

Email = Annotated[
    str,
    Meta(
        min_length=3,
        max_length=320,
        pattern=whole(
            r"[^@\s\x00-\x1f\x7f]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
        ),
        description="Email address.",
        examples=["ada@example.com"],
    ),
]


class StrictInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Inputs reject unknown fields: a typo must not be silently ignored."""


def to_command(data: msgspec.Struct, into: type[T]) -> T:
    """Edge DTO -> domain command; UNSET fields are left out so the command's defaults apply."""
    fields = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not msgspec.UNSET}
    return msgspec.convert(fields, into)


async def require_json_integers(request: Request[Any, Any, Any], *fields: str) -> None:
    """Refuse strings and decimals where a body must hold JSON integers.

    Litestar converts bodies leniently: ``"25.00"`` and ``25.0`` both become ``25``. For an amount in
    minor units that reading is a tenfold-or-worse mistake waiting to happen (``"25.00"`` meant
    25 euros, not 25 cents), so such fields must be integers as sent. The body is already parsed and
    cached by the time a handler runs; this reads the cached value.
    """
    body = await request.json()
    if not isinstance(body, dict):
        return
    errors = [
        {"key": name, "source": "body", "message": "Expected a JSON integer (an amount in minor units)."}
        for name in fields
        if name in body and type(body[name]) is not int
    ]
    if errors:
        raise ValidationException(extra=errors)
