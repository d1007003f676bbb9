"""RFC 9457 problem documents: one schema for every error Keel returns."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

import msgspec
from litestar.exceptions import HTTPException
from litestar.openapi.datastructures import ResponseSpec

PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(msgspec.Struct, frozen=True, omit_defaults=True):
    """One invalid value: ``pointer`` (JSON pointer) into the body, or the name of a query/path/header ``parameter``."""

    detail: str
    pointer: str | None = None
    parameter: str | None = None
    location: str | None = None


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = None


@dataclass(frozen=True, slots=True)
class ProblemType:
    slug: str
    title: str
    status: int
    description: str

    @property
    def uri(self) -> str:
        return f"/problems/{self.slug}"


_TYPES: dict[str, ProblemType] = {}


def problem_type(slug: str, status: int, description: str, title: str | None = None) -> ProblemType:
    """Register (or fetch) a problem type; ``GET /problems/{slug}`` documents each one."""
    if slug not in _TYPES:
        _TYPES[slug] = ProblemType(slug, title or HTTPStatus(status).phrase, status, description)
    return _TYPES[slug]


def problem_types() -> dict[str, ProblemType]:
    return dict(_TYPES)


class ProblemError(HTTPException):
    """An HTTP error with its own problem type, for errors raised outside the domain (middleware)."""

    def __init__(self, status: int, detail: str, slug: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.slug = slug


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the error statuses an operation can answer."""
    return {
        s: ResponseSpec(
            data_container=Problem,
            description=HTTPStatus(s).phrase,
            media_type=PROBLEM_MEDIA_TYPE,
            generate_examples=False,
        )
        for s in statuses
    }
