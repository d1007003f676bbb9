"""Thin controllers for webhook endpoints and their delivery history."""

from __future__ import annotations

import uuid

from litestar import Controller, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from keel.contexts.webhooks.adapters.http.schemas import (
    DeliveryList,
    DeliveryOut,
    EndpointCreatedOut,
    EndpointIn,
    EndpointList,
    EndpointOut,
    EndpointPatch,
    EventTypeList,
    SecretOut,
)
from keel.contexts.webhooks.domain.commands import ChangeEndpoint, CreateEndpoint
from keel.contexts.webhooks.domain.services import WebhooksService
from keel.platform.adapters.http.auth import BEARER_AUTH, Authenticated
from keel.platform.adapters.http.jobs import JobAccepted, accepted
from keel.platform.adapters.http.paging import CursorParam, LimitParam, encode_cursor, page_request
from keel.platform.adapters.http.problems import problem_responses
from keel.platform.adapters.http.schemas import to_command

Webhooks = NamedDependency[WebhooksService]
_AUTH = (400, 401, 415, 422, 429)


class EndpointController(Controller):
    path = "/v1/webhook-endpoints"
    tags = ["webhooks"]
    security = BEARER_AUTH

    @post(
        "/",
        status_code=HTTP_201_CREATED,
        summary="Register a webhook endpoint",
        description="The signing `secret` (`whsec_…`) is shown in this response only.",
        responses=problem_responses(*_AUTH, 413),
    )
    async def create_endpoint(
        self, data: JSONBody[EndpointIn], webhooks: Webhooks, request: Authenticated
    ) -> Response[EndpointCreatedOut]:
        endpoint = await webhooks.create_endpoint(request.user, to_command(data, CreateEndpoint))
        return Response(
            EndpointCreatedOut.created(endpoint),
            status_code=HTTP_201_CREATED,
            headers={"Location": f"/v1/webhook-endpoints/{endpoint.id}"},
        )

    @get("/", summary="List webhook endpoints", responses=problem_responses(*_AUTH))
    async def list_endpoints(
        self, webhooks: Webhooks, request: Authenticated, limit: LimitParam = 50, cursor: CursorParam = None
    ) -> EndpointList:
        page = await webhooks.list_endpoints(request.user, page_request(limit, cursor))
        return EndpointList(items=[EndpointOut.of(e) for e in page.items], next_cursor=encode_cursor(page.next_after))

    @get("/{endpoint_id:uuid}", summary="Read a webhook endpoint", responses=problem_responses(*_AUTH, 404))
    async def get_endpoint(
        self, endpoint_id: FromPath[uuid.UUID], webhooks: Webhooks, request: Authenticated
    ) -> EndpointOut:
        return EndpointOut.of(await webhooks.get_endpoint(request.user, endpoint_id))

    @patch(
        "/{endpoint_id:uuid}",
        summary="Change a webhook endpoint",
        description="Setting `enabled: true` re-enables an endpoint Keel disabled, and clears its failure streak.",
        responses=problem_responses(*_AUTH, 404, 413),
    )
    async def patch_endpoint(
        self,
        endpoint_id: FromPath[uuid.UUID],
        data: JSONBody[EndpointPatch],
        webhooks: Webhooks,
        request: Authenticated,
    ) -> EndpointOut:
        return EndpointOut.of(
            await webhooks.change_endpoint(request.user, endpoint_id, to_command(data, ChangeEndpoint))
        )

    @delete(
        "/{endpoint_id:uuid}",
        status_code=HTTP_204_NO_CONTENT,
        summary="Delete a webhook endpoint and its delivery history",
        responses=problem_responses(*_AUTH, 404),
    )
    async def delete_endpoint(
        self, endpoint_id: FromPath[uuid.UUID], webhooks: Webhooks, request: Authenticated
    ) -> None:
        await webhooks.delete_endpoint(request.user, endpoint_id)

    @post(
        "/{endpoint_id:uuid}/rotate-secret",
        status_code=200,
        summary="Rotate the signing secret",
        description=(
            "Returns the new secret (shown once). Until `previous_secret_expires_at` (24 hours), deliveries "
            "carry a signature with each secret, so receivers can switch without losing a delivery."
        ),
        responses=problem_responses(*_AUTH, 404),
    )
    async def rotate_secret(
        self, endpoint_id: FromPath[uuid.UUID], webhooks: Webhooks, request: Authenticated
    ) -> SecretOut:
        e = await webhooks.rotate_secret(request.user, endpoint_id)
        return SecretOut(secret=e.secret, previous_secret_expires_at=e.previous_secret_expires_at)

    @get(
        "/{endpoint_id:uuid}/deliveries",
        summary="Delivery history, newest first",
        description="Each delivery lists its attempts (status code, latency, error) and its next retry.",
        responses=problem_responses(*_AUTH, 404),
    )
    async def list_deliveries(
        self,
        endpoint_id: FromPath[uuid.UUID],
        webhooks: Webhooks,
        request: Authenticated,
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> DeliveryList:
        page = await webhooks.list_deliveries(request.user, endpoint_id, page_request(limit, cursor))
        return DeliveryList(items=[DeliveryOut.of(v) for v in page.items], next_cursor=encode_cursor(page.next_after))

    @get(
        "/{endpoint_id:uuid}/deliveries/{delivery_id:uuid}",
        summary="Read one delivery",
        responses=problem_responses(*_AUTH, 404),
    )
    async def get_delivery(
        self,
        endpoint_id: FromPath[uuid.UUID],
        delivery_id: FromPath[uuid.UUID],
        webhooks: Webhooks,
        request: Authenticated,
    ) -> DeliveryOut:
        return DeliveryOut.of(await webhooks.get_delivery(request.user, endpoint_id, delivery_id))

    @post(
        "/{endpoint_id:uuid}/deliveries/{delivery_id:uuid}/retry",
        status_code=202,
        summary="Attempt a delivery again now",
        description="Answers 202 with the job making the attempt; 409 while the delivery is already scheduled.",
        responses=problem_responses(*_AUTH, 404, 409, 503),
    )
    async def retry_delivery(
        self,
        endpoint_id: FromPath[uuid.UUID],
        delivery_id: FromPath[uuid.UUID],
        webhooks: Webhooks,
        request: Authenticated,
    ) -> Response[JobAccepted]:
        return accepted(await webhooks.retry_delivery(request.user, endpoint_id, delivery_id))


class EventTypeController(Controller):
    path = "/v1/webhook-event-types"
    tags = ["webhooks"]
    security = BEARER_AUTH

    @get("/", summary="Event types an endpoint can subscribe to", responses=problem_responses(401, 429))
    async def list_event_types(self, webhooks: Webhooks) -> EventTypeList:
        return EventTypeList(items=webhooks.event_types)


ROUTES = [EndpointController, EventTypeController]
