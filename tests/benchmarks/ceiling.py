"""The framework ceiling of the load benchmark (tests/benchmarks/load.py, scenario a).

A bare Litestar app with one handler on the profile route, ``GET /v1/users/{user_id:uuid}``, that returns a
constant JSON body exactly as long as a real profile response: no middleware, no auth, no dependency, no
database, no cache. Litestar still routes, parses the UUID and encodes the body (msgspec) on every
request, as it does for Keel's handler, so the difference between this and the cached read is what Keel
itself adds. It is served by granian with the options ``keel serve`` uses (src/keel/main/cli.py
``_serve``: ASGI interface, the standard asyncio loop, an app factory, N workers, default HTTP settings,
no access log, failed workers respawned).

    uv run --no-sync python -m tests.benchmarks.ceiling --port 8100 --body-bytes 245 [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import uuid
from typing import Any

import msgspec
from litestar import Litestar, get

BODY_BYTES_ENV = "KEEL_CEILING_BODY_BYTES"  # granian builds the app in its workers, from the factory


def body_of(size: int) -> dict[str, str]:
    """A dict whose JSON encoding (as Litestar sends it) is exactly ``size`` bytes."""
    base = {"id": str(uuid.UUID(int=0)), "padding": ""}
    overhead = len(msgspec.json.encode(base))
    if size < overhead:
        raise ValueError(f"a body of {size} bytes is shorter than the {overhead} bytes of its frame")
    body = {**base, "padding": "x" * (size - overhead)}
    assert len(msgspec.json.encode(body)) == size
    return body


def create_app() -> Litestar:
    body = body_of(int(os.environ[BODY_BYTES_ENV]))

    @get("/v1/users/{user_id:uuid}")
    async def profile(user_id: uuid.UUID) -> dict[str, str]:
        return body

    # No OpenAPI routes: the ceiling serves one route, as lean as Litestar gets.
    return Litestar([profile], openapi_config=None)


def main(argv: Any = None) -> None:
    from granian import Granian
    from granian.constants import Interfaces, Loops

    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--body-bytes", type=int, required=True, help="length of the JSON body to return")
    args = parser.parse_args(argv)
    body_of(args.body_bytes)  # a size that cannot be met fails here, not in every worker
    os.environ[BODY_BYTES_ENV] = str(args.body_bytes)
    Granian(
        "tests.benchmarks.ceiling:create_app",
        factory=True,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        loop=Loops.asyncio,
        workers=args.workers,
        log_access=False,
        respawn_failed_workers=True,
    ).serve()


if __name__ == "__main__":
    main()
