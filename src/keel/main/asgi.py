"""ASGI entry point for servers: ``keel.main.asgi:create_app`` (factory) or ``keel.main.asgi:app``."""

from __future__ import annotations

from litestar import Litestar

from keel.main.app import create_app


def __getattr__(name: str) -> Litestar:
    # Built on first access so importing this module has no side effects.
    if name == "app":
        app = create_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


__all__ = ["create_app"]
