"""Stripe as the payment provider, on the official SDK: PaymentIntents confirmed on creation
(authorize and capture in one step) and Refunds, both under Keel's idempotency keys.

The SDK's own network retries are off: the job retries with backoff under the same key, and a job
that is retried is visible in ``GET /v1/jobs/{id}``. The secret key is handed to the SDK only; it is
never logged (the SDK's logging stays off unless STRIPE_LOG asks for it, and even then omits keys).
"""

from __future__ import annotations

from typing import Any

import stripe

from keel.contexts.payments.domain.model import (
    ChargeOrder,
    Failure,
    FailureReason,
    ProviderResult,
    ProviderUnavailable,
    RefundOrder,
)

_TIMEOUT = 30.0  # seconds; Stripe recommends allowing long requests rather than abandoning them


class StripePaymentProvider:
    def __init__(self, secret_key: str, *, api_base: str | None = None, timeout: float = _TIMEOUT) -> None:
        self._http = stripe.HTTPXClient(timeout=timeout)
        self._client = stripe.StripeClient(
            secret_key,
            base_addresses={"api": api_base} if api_base else None,
            http_client=self._http,
            max_network_retries=0,
        )

    @property
    def name(self) -> str:
        return "stripe"

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def capture(self, order: ChargeOrder) -> ProviderResult:
        params: dict[str, Any] = {
            "amount": order.amount,
            "currency": order.currency.lower(),
            "payment_method": order.payment_method,
            "confirm": True,
            # Server-side confirmation: no redirect-based methods, whose outcome arrives later.
            "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
            "metadata": dict(order.metadata),
        }
        if order.description:
            params["description"] = order.description
        try:
            intent = await self._client.v1.payment_intents.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": order.idempotency_key},
            )
            if intent.status == "processing":
                # A replay of the key answers with the first response; ask for the current state.
                intent = await self._client.v1.payment_intents.retrieve_async(intent.id)
        except stripe.CardError as exc:
            return _failure(_decline_reason(exc), exc)
        except stripe.InvalidRequestError as exc:
            reason = (
                FailureReason.INVALID_PAYMENT_METHOD
                if exc.param == "payment_method" or exc.code == "payment_method_unactivated"
                else FailureReason.PROVIDER_ERROR
            )
            return _failure(reason, exc)
        except stripe.StripeError as exc:
            return _unavailable_or_failure(exc, FailureReason.PROVIDER_ERROR)
        match intent.status:
            case "succeeded" | "requires_capture":
                return ProviderResult(reference=intent.id)
            case "processing":
                raise ProviderUnavailable("Stripe is still processing the payment.")
            case "requires_action":
                return ProviderResult(
                    failure=Failure(
                        reason=FailureReason.AUTHENTICATION_REQUIRED,
                        message="The card requires authentication, which server-side capture cannot perform.",
                    )
                )
            case _:
                error = intent.last_payment_error
                message = (error.message if error else None) or f"The payment ended as {intent.status}."
                return ProviderResult(failure=Failure(reason=FailureReason.CARD_DECLINED, message=message[:500]))

    async def refund(self, order: RefundOrder) -> ProviderResult:
        params: dict[str, Any] = {"payment_intent": order.charge_reference, "amount": order.amount}
        if order.reason is not None:
            params["reason"] = order.reason.value
        try:
            refund = await self._client.v1.refunds.create_async(
                params,  # type: ignore[arg-type]
                {"idempotency_key": order.idempotency_key},
            )
        except stripe.InvalidRequestError as exc:
            return _failure(FailureReason.REFUND_REJECTED, exc)
        except stripe.StripeError as exc:
            return _unavailable_or_failure(exc, FailureReason.REFUND_REJECTED)
        # A pending card refund has been accepted; only the bank's booking is still to come.
        if refund.status in ("succeeded", "pending"):
            return ProviderResult(reference=refund.id)
        return ProviderResult(
            failure=Failure(reason=FailureReason.REFUND_REJECTED, message=f"The refund ended as {refund.status}.")
        )


_NOT_DEFINITIVE = (
    stripe.APIConnectionError,
    stripe.RateLimitError,
    stripe.APIError,
    stripe.AuthenticationError,
    stripe.PermissionError,
)


def _decline_reason(exc: stripe.CardError) -> FailureReason:
    decline = getattr(exc.error, "decline_code", None) if exc.error else None
    if decline == "insufficient_funds" or exc.code == "insufficient_funds":
        return FailureReason.INSUFFICIENT_FUNDS
    if exc.code == "authentication_required" or decline == "authentication_required":
        return FailureReason.AUTHENTICATION_REQUIRED
    return FailureReason.CARD_DECLINED


def _message(exc: stripe.StripeError) -> str:
    return (exc.user_message or "The payment provider refused the request.")[:500]


def _failure(reason: FailureReason, exc: stripe.StripeError) -> ProviderResult:
    return ProviderResult(failure=Failure(reason=reason, message=_message(exc)))


def _unavailable_or_failure(exc: stripe.StripeError, reason: FailureReason) -> ProviderResult:
    """Network errors, rate limits, 5xx, and a key Stripe refuses (an operator can fix it while the
    job retries) are not definitive; other refusals are."""
    status = exc.http_status
    if isinstance(exc, _NOT_DEFINITIVE) or status is None or status >= 500 or status == 429:
        raise ProviderUnavailable(f"Stripe: {type(exc).__name__} (HTTP {status or 'n/a'})") from None
    return _failure(reason, exc)
