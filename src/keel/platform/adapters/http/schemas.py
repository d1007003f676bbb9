"""Edge validation shared by every context's HTTP adapter."""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec
from msgspec import Meta

T = TypeVar("T")

# Printable text: no control characters, no invisible formatting characters that can disguise a
# name (bidi overrides and isolates, zero-width characters, BOM), no surrounding whitespace.
_BAD = r"\x00-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
TEXT_PATTERN = rf"^[^\s{_BAD}](?:[^{_BAD}]*[^\s{_BAD}])?$"

Email = Annotated[
    str,
    Meta(
        min_length=3,
        max_length=320,
        pattern=r"^[^@\s\x00-\x1f\x7f]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$",
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
