"""The ``Idempotency-Key`` header as operations document it. An operation *requires* the key with
``@post(..., idempotency="required")``; the composition root's middleware enforces it."""

from __future__ import annotations

from typing import Annotated

from litestar.params import HeaderParameter

# Declared as a handler parameter so the OpenAPI document shows the header as required.
IdempotencyKeyHeader = Annotated[
    str,
    HeaderParameter(
        name="Idempotency-Key",
        description=(
            "A unique value (1-255 visible ASCII characters) per logical operation, sent unchanged on "
            "retries: a replay answers with the first response (`Idempotent-Replayed: true`) and creates "
            "nothing. The same key with a different body is a 422; while the first request runs, a 409."
        ),
    ),
]
