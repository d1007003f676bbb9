"""Thin controllers for payments and refunds."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.params import FromPath, FromQuery, JSONBody, Parameter

from keel.contexts.payments.adapters.http.schemas import (
    PaymentAccepted,
    PaymentIn,
    PaymentList,
    PaymentOut,
    RefundAccepted,
    RefundIn,
    RefundList,
    RefundOut,
)
from keel.contexts.payments.domain.commands import CreatePayment, CreateRefund
from keel.contexts.payments.domain.model import PaymentStatus
from keel.contexts.payments.domain.services import PaymentsService
from keel.contexts.payments.ports.repositories import PaymentFilter
from keel.platform.adapters.http.auth import BEARER_AUTH, Authenticated
from keel.platform.adapters.http.idempotency import IdempotencyKeyHeader
from keel.platform.adapters.http.jobs import accepted_as, job_status_url
from keel.platform.adapters.http.paging import CursorParam, LimitParam, encode_cursor, page_request
from keel.platform.adapters.http.problems import problem_responses, problem_type
from keel.platform.adapters.http.schemas import require_json_integers, to_command

problem_type(
    "payment-state-conflict",
    409,
    "The payment's status does not allow this operation (for example refunding a payment that is not succeeded).",
)
problem_type(
    "refund-exceeds-payment",
    409,
    "Refunds of a payment, those in progress included, cannot add up to more than its captured amount.",
)

Payments = NamedDependency[PaymentsService]
_AUTH = (400, 401, 415, 422, 429)
Created = Annotated[
    datetime | None,
    Parameter(description="ISO 8601 with a UTC offset, e.g. `2026-11-01T00:00:00Z`."),
]


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValidationException(
            extra=[{"key": name, "source": "query", "message": "Include a UTC offset (for example Z)."}]
        )
    return value


class PaymentController(Controller):
    path = "/v1/payments"
    tags = ["payments"]
    security = BEARER_AUTH

    @post(
        "/",
        status_code=202,
        idempotency="required",
        summary="Create a payment",
        description=(
            "Stores the payment as `pending` and answers at once with the job that charges it; the payment "
            "then becomes `succeeded` or `failed` (watch `status_url`, `GET /v1/payments/{id}`, or the "
            "`payment.succeeded` / `payment.failed` webhooks). Requires `Idempotency-Key`."
        ),
        responses=problem_responses(*_AUTH, 409, 413, 503),
    )
    async def create_payment(
        self,
        request: Authenticated,
        data: JSONBody[PaymentIn],
        payments: Payments,
        idempotency_key: IdempotencyKeyHeader,
    ) -> Response[PaymentAccepted]:
        await require_json_integers(request, "amount")
        done = await payments.create_payment(request.user, to_command(data, CreatePayment))
        body = PaymentAccepted(
            payment=PaymentOut.of(done.value), job_id=done.job_id, status_url=job_status_url(done.job_id)
        )
        return accepted_as(body, done.job_id)

    @get("/", summary="List payments, newest first", responses=problem_responses(*_AUTH))
    async def list_payments(
        self,
        payments: Payments,
        request: Authenticated,
        status: FromQuery[PaymentStatus | None] = None,
        created_from: Created = None,
        created_to: Created = None,
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> PaymentList:
        where = PaymentFilter(
            status=status,
            created_from=_aware("created_from", created_from),
            created_to=_aware("created_to", created_to),
        )
        page = await payments.list_payments(request.user, where, page_request(limit, cursor))
        return PaymentList(items=[PaymentOut.of(p) for p in page.items], next_cursor=encode_cursor(page.next_after))

    @get("/{payment_id:uuid}", summary="Read a payment", responses=problem_responses(*_AUTH, 404))
    async def get_payment(
        self, payment_id: FromPath[uuid.UUID], payments: Payments, request: Authenticated
    ) -> PaymentOut:
        return PaymentOut.of(await payments.get_payment(request.user, payment_id))

    @post(
        "/{payment_id:uuid}/refunds",
        status_code=202,
        idempotency="required",
        summary="Refund a payment, in full or in part",
        description=(
            "Without `amount` (or without a body), refunds everything not yet refunded. The amount is reserved "
            "at once, so refunds in progress count against what is left (409 beyond it). "
            "Requires `Idempotency-Key`."
        ),
        responses=problem_responses(*_AUTH, 404, 409, 413, 503),
    )
    async def create_refund(
        self,
        payment_id: FromPath[uuid.UUID],
        payments: Payments,
        idempotency_key: IdempotencyKeyHeader,
        request: Authenticated,
        data: JSONBody[RefundIn | None] = None,
    ) -> Response[RefundAccepted]:
        if data is not None:
            await require_json_integers(request, "amount")
        cmd = to_command(data, CreateRefund) if data is not None else CreateRefund()
        done = await payments.request_refund(request.user, payment_id, cmd)
        body = RefundAccepted(
            refund=RefundOut.of(done.value), job_id=done.job_id, status_url=job_status_url(done.job_id)
        )
        return accepted_as(body, done.job_id)

    @get(
        "/{payment_id:uuid}/refunds",
        summary="List a payment's refunds, newest first",
        responses=problem_responses(*_AUTH, 404),
    )
    async def list_refunds(
        self,
        payment_id: FromPath[uuid.UUID],
        payments: Payments,
        request: Authenticated,
        limit: LimitParam = 50,
        cursor: CursorParam = None,
    ) -> RefundList:
        page = await payments.list_refunds(request.user, payment_id, page_request(limit, cursor))
        return RefundList(items=[RefundOut.of(r) for r in page.items], next_cursor=encode_cursor(page.next_after))

    @get(
        "/{payment_id:uuid}/refunds/{refund_id:uuid}", summary="Read a refund", responses=problem_responses(*_AUTH, 404)
    )
    async def get_refund(
        self,
        payment_id: FromPath[uuid.UUID],
        refund_id: FromPath[uuid.UUID],
        payments: Payments,
        request: Authenticated,
    ) -> RefundOut:
        return RefundOut.of(await payments.get_refund(request.user, payment_id, refund_id))


ROUTES = [PaymentController]
