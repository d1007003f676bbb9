"""Every error leaves as RFC 9457 problem+json with a stable type and the request id. Never a traceback."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from litestar import MediaType, Request, Response, get
from litestar.exceptions import HTTPException, NotFoundException, ValidationException
from litestar.params import FromPath
from loguru import logger
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from keel.main.request_context import ensure_request_id
from keel.platform.adapters.http.problems import (
    PROBLEM_MEDIA_TYPE,
    FieldError,
    Problem,
    ProblemError,
    problem_type,
    problem_types,
)
from keel.platform.domain.errors import Conflict, DomainError, InvalidInput, NotFound, Unavailable

MALFORMED = problem_type("malformed-request", 400, "The request could not be parsed (for example invalid JSON).")
BAD_REQUEST = problem_type("bad-request", 400, "The request is not acceptable as sent.")
VALIDATION = problem_type(
    "validation-error",
    422,
    "The request parsed but some values break the schema or a rule; `errors` lists each one with a JSON pointer.",
    title="Validation failed",
)
UNAUTHORIZED = problem_type("unauthorized", 401, "Send a valid API key as `Authorization: Bearer <key>`.")
FORBIDDEN = problem_type("forbidden", 403, "The API key may not perform this operation.")
NOT_FOUND = problem_type("not-found", 404, "No such resource for this tenant.")
METHOD_NOT_ALLOWED = problem_type("method-not-allowed", 405, "The resource does not support this method.")
CONFLICT = problem_type("conflict", 409, "The request clashes with the current state of the resource.")
EMAIL_TAKEN = problem_type("email-taken", 409, "Another user of this tenant already has this email address.")
REQUEST_TIMEOUT = problem_type(
    "request-timeout", 408, "The request body did not arrive in time; send it again, without pauses."
)
TOO_LARGE = problem_type("payload-too-large", 413, "The request body exceeds the size limit.")
UNSUPPORTED_MEDIA = problem_type("unsupported-media-type", 415, "Send the body with a supported Content-Type.")
RATE_LIMITED = problem_type("rate-limited", 429, "Too many requests; wait for `Retry-After` seconds.")
INTERNAL = problem_type("internal-error", 500, "An unexpected error; it has been logged under the request id.")
UNAVAILABLE = problem_type(
    "service-unavailable", 503, "A dependency is temporarily unavailable; retry after a short wait."
)

_BY_STATUS = {
    400: BAD_REQUEST,
    401: UNAUTHORIZED,
    403: FORBIDDEN,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    408: REQUEST_TIMEOUT,
    409: CONFLICT,
    413: TOO_LARGE,
    415: UNSUPPORTED_MEDIA,
    422: VALIDATION,
    429: RATE_LIMITED,
    503: UNAVAILABLE,
}


def problem_response(
    request: Request[Any, Any, Any],
    status: int,
    detail: str | None,
    *,
    slug: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Problem]:
    ptype = problem_types().get(slug) if slug else None
    ptype = ptype or _BY_STATUS.get(status) or (INTERNAL if status >= 500 else BAD_REQUEST)
    body = Problem(
        type=ptype.uri,
        title=ptype.title,
        status=status,
        detail=detail,
        instance=request.url.path,
        request_id=ensure_request_id(request.scope),
        errors=errors,
    )
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _field_error(message: str, key: str | None, source: object) -> FieldError:
    source = getattr(source, "value", source)
    if "matching regex" in message:
        # The raw pattern helps nobody; the OpenAPI document carries it for those who want it.
        message = "Invalid format."
    if source in (None, "body"):
        # msgspec paths: "data.items[2].name"; a dict value is "[...]" (msgspec does not name the key).
        parts = [p for p in re.split(r"\.|\[(\d+)\]|\[\.\.\.\]", key or "") if p]
        if parts[:1] == ["data"]:
            parts = parts[1:]
        escaped = "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)
        return FieldError(detail=message, pointer="#/" + escaped if escaped else "#")
    return FieldError(detail=message, parameter=key, location=str(source))


def _sent_name(request: Request[Any, Any, Any], key: str | None, source: object) -> str | None:
    """The name the client sent: Litestar reports a parameter by its Python name (``start`` for
    ``?from=``, a keyword Python cannot take)."""
    if key is None or getattr(source, "value", source) in (None, "body"):
        return key
    param = request.route_handler.parsed_fn_signature.parameters.get(key)
    definition = getattr(param, "kwarg_definition", None)
    return getattr(definition, "name", None) or getattr(definition, "query", None) or key


def _validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Problem]:
    extra = exc.extra if isinstance(exc.extra, list) else []
    errors = [
        _field_error(
            str(item.get("message", "Invalid value.")),
            _sent_name(request, item.get("key"), item.get("source")),
            item.get("source"),
        )
        for item in extra
        if isinstance(item, dict)
    ]
    if not errors:
        return problem_response(request, 400, _clean(exc.detail), slug=MALFORMED.slug)
    return problem_response(request, 422, "The request does not match the schema.", errors=errors)


def _clean(detail: str) -> str:
    return detail.split("\n", 1)[0][:500]


# SQLSTATEs that mean "no database right now", not "this request is wrong": connection exceptions
# (class 08), the server shutting down or starting up (57P01-57P03), too many connections (53300).
# asyncpg raises some of them while connecting (CannotConnectNowError), where SQLAlchemy does not wrap.
_UNAVAILABLE_STATES = ("08", "57P01", "57P02", "57P03", "53300")


def _is_db_unavailable(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):  # the exception and what caused it: drivers' errors arrive wrapped
        if seen is None:
            return False
        if isinstance(seen, (OperationalError, InterfaceError, PoolTimeoutError, ConnectionError, TimeoutError)):
            return True
        if isinstance(seen, DBAPIError) and seen.connection_invalidated:
            return True
        state = getattr(seen, "sqlstate", None) or getattr(getattr(seen, "orig", None), "sqlstate", None)
        if isinstance(state, str) and state.startswith(_UNAVAILABLE_STATES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    if isinstance(exc, ValidationException):
        return _validation(request, exc)
    if isinstance(exc, HTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 401:
            headers.setdefault("WWW-Authenticate", 'Bearer realm="keel"')
        if isinstance(exc, ProblemError):
            # Deliberate answers (503 when a dependency is down, 409, 422 …): already logged where raised.
            return problem_response(request, exc.status_code, exc.detail, slug=exc.slug, headers=headers)
        if exc.status_code >= 500:
            logger.opt(exception=exc).error("server error")
            return problem_response(request, exc.status_code, None, headers=headers)
        # Litestar's generic details merely repeat the status phrase.
        detail = None if exc.detail == HTTPStatus(exc.status_code).phrase else _clean(exc.detail)
        # A bare 400 from the framework means the body could not be decoded.
        slug = MALFORMED.slug if exc.status_code == 400 else None
        return problem_response(request, exc.status_code, detail, slug=slug, headers=headers)
    if isinstance(exc, DomainError):
        return _domain(request, exc)
    if _is_db_unavailable(exc):
        logger.warning("dependency unavailable: {}", type(exc).__name__)
        return problem_response(request, 503, "A dependency is temporarily unavailable.", headers={"Retry-After": "1"})
    logger.opt(exception=exc).error("unhandled error")
    return problem_response(request, 500, None)


def _domain(request: Request[Any, Any, Any], exc: DomainError) -> Response[Problem]:
    if isinstance(exc, InvalidInput):
        errors = [FieldError(detail=exc.detail, pointer=exc.pointer or "#")]
        return problem_response(request, 422, exc.detail, slug=exc.code, errors=errors)
    status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 503
    if isinstance(exc, Unavailable):
        return problem_response(request, status, exc.detail, slug=exc.code, headers={"Retry-After": "1"})
    return problem_response(request, status, exc.detail, slug=exc.code)


@get("/problems/{slug:str}", exclude_from_auth=True, include_in_schema=False, media_type=MediaType.JSON)
async def describe_problem(slug: FromPath[str]) -> dict[str, Any]:
    """Human-readable documentation for each problem ``type`` URI."""
    ptype = problem_types().get(slug)
    if ptype is None:
        raise NotFoundException(f"No problem type {slug!r}.")
    return {"type": ptype.uri, "title": ptype.title, "status": ptype.status, "description": ptype.description}
