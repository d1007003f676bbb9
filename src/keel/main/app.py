"""The Litestar application factory."""

from __future__ import annotations

import gc
from importlib.metadata import version
from typing import Any

import msgspec
from granian.utils.proxies import wrap_asgi_with_proxy_headers
from litestar import Litestar, MediaType, Request, Response, Router, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException, NotFoundException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from opentelemetry.sdk.trace import TracerProvider

from keel.contexts.accounts.adapters.http.controllers import ROUTES as ACCOUNTS_ROUTES
from keel.contexts.analytics.adapters.http.controllers import ROUTES as ANALYTICS_ROUTES
from keel.contexts.analytics.adapters.http.request_counting import RequestCountingMiddleware
from keel.contexts.media.adapters.http.controllers import ROUTES as MEDIA_ROUTES
from keel.contexts.payments.adapters.http.controllers import ROUTES as PAYMENTS_ROUTES
from keel.contexts.webhooks.adapters.http.controllers import ROUTES as WEBHOOKS_ROUTES
from keel.main.auth import PUBLIC_PATHS, ApiKeyAuthMiddleware
from keel.main.body_deadline import BodyDeadlineMiddleware
from keel.main.container import Container, build_container
from keel.main.errors import describe_problem, handle_exception
from keel.main.health import healthz, livez
from keel.main.idempotency import IdempotencyMiddleware
from keel.main.logging import configure_logging
from keel.main.rate_limit import RateLimitMiddleware
from keel.main.request import KeelRequest
from keel.main.request_context import RequestContextMiddleware, echo_request_id
from keel.main.settings import Settings, settings_or_exit
from keel.main.telemetry import build_tracer_provider, instrument
from keel.platform.adapters.http.jobs import JobController

_BODY_METHODS = {"POST", "PUT", "PATCH"}


async def require_json_body(request: Request[Any, Any, Any]) -> None:
    """415 for a body sent with a media type the handler does not read (JSON unless it says otherwise)."""
    data = request.route_handler.parsed_fn_signature.parameters.get("data")
    raw = request.route_handler.opt.get("raw_body", False)  # the handler reads the bytes itself
    if request.method not in _BODY_METHODS or (data is None and not raw):
        return
    if data is not None and data.has_default and _sent_no_body(request):
        return  # an optional body left out (a full refund, say)
    accepted: tuple[str, ...] = request.route_handler.opt.get("accepts", ("application/json",))
    media_type = request.content_type[0].lower()
    if media_type in accepted or (media_type.endswith("+json") and "application/json" in accepted):
        return
    raise HTTPException(
        status_code=415,
        detail=f"Content-Type must be one of: {', '.join(accepted)}.",
        headers={"Accept-Post" if request.method == "POST" else "Accept-Patch": ", ".join(accepted)}
        if request.method != "PUT"  # there is no Accept-Put header; the OpenAPI document lists the types
        else None,
    )


def _sent_no_body(request: Request[Any, Any, Any]) -> bool:
    h = request.headers
    return "content-type" not in h and "transfer-encoding" not in h and h.get("content-length", "0") == "0"


_DOCS_UI = ScalarRenderPlugin(path="/")


@get("/openapi.json", include_in_schema=False, exclude_from_auth=True, media_type="application/vnd.oai.openapi+json")
async def openapi_json(request: Request[Any, Any, Any]) -> dict[str, Any]:
    return _schema_document(request.app)


@get("/docs", include_in_schema=False, exclude_from_auth=True, media_type=MediaType.HTML)
async def docs(request: Request[Any, Any, Any]) -> bytes:
    return _DOCS_UI.render(request, _schema_document(request.app))


def _publish_body_rules(app: Litestar) -> None:
    """Say in the schema what Litestar leaves out: request bodies reject unknown fields
    (``additionalProperties: false``), a body the handler defaults is optional, and a handler that
    reads raw bytes (``opt raw_body``, e.g. an image upload) takes a binary body of its ``accepts`` types.

    Runs at start-up, before anything renders the document, so every view of it agrees.
    """
    closed: set[str] = set()
    optional: set[tuple[str, str]] = set()
    raw: dict[tuple[str, str], tuple[str, ...]] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            if handler.opt.get("raw_body"):
                raw.update(((route.path_format, m.lower()), handler.opt["accepts"]) for m in handler.http_methods)
            data = handler.parsed_fn_signature.parameters.get("data")
            if data is None:
                continue
            if data.has_default:
                optional.update((route.path_format, m.lower()) for m in handler.http_methods)
            for struct in (data.type_, *(t.annotation for t in data.inner_types)):
                if (
                    isinstance(struct, type)
                    and issubclass(struct, msgspec.Struct)
                    and struct.__struct_config__.forbid_unknown_fields
                ):
                    closed.add(struct.__name__)
    schema = app.openapi_schema
    for name, component in (schema.components.schemas or {}).items():
        if name in closed:
            component.additional_properties = False
    for path, method in optional:
        operation = getattr((schema.paths or {}).get(path), method, None)
        if operation is not None and operation.request_body is not None:
            operation.request_body.required = False
    binary = Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY)
    for (path, method), media_types in raw.items():
        operation = getattr((schema.paths or {}).get(path), method, None)
        if operation is not None:
            content = {t: OpenAPIMediaType(schema=binary) for t in media_types}
            operation.request_body = RequestBody(content=content, required=True)
    _schema_document(app)


def _freeze_startup_objects() -> None:
    """Move everything built at start-up (the app, its routes, the container, imported modules) out of
    the collector's reach. Otherwise every full collection walks those ~200k long-lived objects again,
    and busy request handling triggers one every few dozen responses: measured as 110-200 ms pauses in
    the summary benchmark, gone after freezing."""
    gc.collect()
    gc.freeze()


def _schema_not_found_as_problem(response: Response[Any]) -> Response[Any]:
    # Litestar answers unknown paths under the schema router with an HTML page; Keel answers problem+json.
    if response.status_code == 404:
        raise NotFoundException
    return response


def _schema_document(app: Litestar) -> dict[str, Any]:
    # Rendering the schema to a dict costs tens of milliseconds; it never changes once the app is built.
    document: dict[str, Any] | None = app.state.get("openapi_document")
    if document is None:
        document = app.state["openapi_document"] = app.openapi_schema.to_schema()
    return document


def create_app(
    settings: Settings | None = None,
    *,
    container: Container | None = None,
    tracer_provider: TracerProvider | None = None,
    configure_logs: bool = True,
) -> Litestar:
    settings = settings or settings_or_exit()
    if configure_logs:
        configure_logging(settings.log_level, settings.log_json)
    container = container or build_container(settings)
    provider = tracer_provider or build_tracer_provider(settings)

    plugins: list[Any] = []
    if provider is not None:
        instrument(provider, container.engine)
        container.trace_jobs(provider)
        plugins.append(OpenTelemetryPlugin(OpenTelemetryConfig(tracer_provider=provider)))

    return Litestar(
        route_handlers=[
            *ACCOUNTS_ROUTES,
            *WEBHOOKS_ROUTES,
            *PAYMENTS_ROUTES,
            *MEDIA_ROUTES,
            *ANALYTICS_ROUTES,
            JobController,
            healthz,
            livez,
            describe_problem,
            openapi_json,
            docs,
        ],
        dependencies={
            "accounts": Provide(lambda: container.accounts, sync_to_thread=False),
            "webhooks": Provide(lambda: container.webhooks, sync_to_thread=False),
            "payments": Provide(lambda: container.payments, sync_to_thread=False),
            "media": Provide(lambda: container.media, sync_to_thread=False),
            "analytics": Provide(lambda: container.analytics, sync_to_thread=False),
            "jobs": Provide(lambda: container.jobs, sync_to_thread=False),
            "health": Provide(lambda: container.health, sync_to_thread=False),
        },
        middleware=[
            # Behind a load balancer the connection's address is the balancer's: take the client's from
            # X-Forwarded-For, but only when the peer is a proxy the operator trusts.
            *(
                [DefineMiddleware(wrap_asgi_with_proxy_headers, trusted_hosts=list(settings.trusted_proxies))]
                if settings.trusted_proxies
                else []
            ),
            RequestContextMiddleware,
            DefineMiddleware(BodyDeadlineMiddleware, timeout=settings.body_read_timeout),
            DefineMiddleware(ApiKeyAuthMiddleware, authenticator=container.accounts, exclude=PUBLIC_PATHS),
            DefineMiddleware(RequestCountingMiddleware, counter=container.request_counter),
            DefineMiddleware(
                RateLimitMiddleware,
                limiter=container.limiter,
                quota=container.accounts.rate_limit,
                per_minute=settings.rate_limit_per_minute,
                signup_per_hour=settings.signup_rate_limit_per_hour,
                stats=container.rate_limit_stats,
            ),
            DefineMiddleware(
                IdempotencyMiddleware,
                store=container.idempotency,
                clock=container.clock,
                max_body=settings.max_body_bytes,
            ),
        ],
        before_request=require_json_body,
        before_send=[echo_request_id],
        exception_handlers={Exception: handle_exception},
        on_startup=[_publish_body_rules, container.start, _freeze_startup_objects],
        on_shutdown=[container.aclose],
        plugins=plugins,
        openapi_config=OpenAPIConfig(
            title="Keel API",
            version=version("keel"),
            description="Multi-tenant SaaS API backbone. Authenticate with `Authorization: Bearer <API key>`.",
            # Litestar's own schema router lives under /openapi; /openapi.json and /docs above are the
            # documented entry points.
            path="/openapi",
            render_plugins=[_DOCS_UI],
            openapi_router=Router(
                "/openapi", route_handlers=[], include_in_schema=False, after_request=_schema_not_found_as_problem
            ),
            components=Components(
                security_schemes={"BearerAuth": SecurityScheme(type="http", scheme="bearer", description="API key")}
            ),
        ),
        request_class=KeelRequest,
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
        state=State({"container": container}),
        debug=False,
    )
