"""Errors the core raises; the composition root maps each kind to one HTTP problem type."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a user can cause through the core.

    ``code`` is the stable slug of the problem type the HTTP layer reports.
    """

    code = "domain-error"

    def __init__(self, detail: str, *, pointer: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.pointer = pointer


class NotFound(DomainError):
    """The resource does not exist, or belongs to another tenant (never tell which)."""

    code = "not-found"


class Conflict(DomainError):
    """The request is valid but clashes with the current state (uniqueness, state machine)."""

    code = "conflict"


class InvalidInput(DomainError):
    """Well-formed input that breaks a domain rule (reported like a validation error)."""

    code = "validation-error"


class Unavailable(DomainError):
    """A dependency the request needs is down; the client may retry."""

    code = "service-unavailable"
