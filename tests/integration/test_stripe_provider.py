"""The Stripe adapter over real HTTP, against a local Stripe stand-in (tests/support/stripe_stub.py): what the
official SDK puts on the wire, which answers are definitive and which are worth a retry, that the secret key
stays secret, how settings select it, and a payment through the whole app settled by Stripe."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe

from keel.contexts.payments.adapters.stripe_provider import StripePaymentProvider
from keel.contexts.payments.domain.model import (
    ChargeOrder,
    FailureReason,
    ProviderUnavailable,
    RefundOrder,
    RefundReason,
    capture_key,
    refund_key,
)
from keel.main.container import build_container
from keel.main.settings import SettingsError, load_settings
from keel.platform.domain.ids import new_id
from tests.support.app import client_for, make_settings, signup
from tests.support.servers import free_port
from tests.support.stripe_stub import StripeStub, StubReply, running_stripe_stub
from tests.support.waiting import eventually

# The SDK's httpx client passes its form body as ``data=``, which httpx deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

KEY = "sk_test_keel"


@pytest.fixture
def stub() -> Iterator[StripeStub]:
    with running_stripe_stub() as s:
        yield s


@pytest.fixture
async def provider(stub: StripeStub) -> AsyncIterator[StripePaymentProvider]:
    p = StripePaymentProvider(KEY, api_base=stub.url)
    yield p
    await p.aclose()


def charge(token: str = "pm_card_visa", **changes: Any) -> ChargeOrder:
    fields: dict[str, Any] = {
        "idempotency_key": capture_key(new_id()),
        "amount": 2500,
        "currency": "EUR",
        "payment_method": token,
        "description": "Order #1042",
        "customer_email": "ada@example.test",
        "metadata": {"order_id": "1042", "customer": "Zo\u00eb"},
        **changes,
    }
    return ChargeOrder(**fields)


# -- the stub speaks Stripe -------------------------------------------------------------------------


async def test_the_sdk_builds_its_objects_from_the_stubs_answers(stub: StripeStub) -> None:
    http = stripe.HTTPXClient()
    client = stripe.StripeClient(KEY, base_addresses={"api": stub.url}, http_client=http, max_network_retries=0)
    try:
        intent = await client.v1.payment_intents.create_async(
            {"amount": 1200, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
        )
        assert isinstance(intent, stripe.PaymentIntent)
        assert (intent.status, intent.amount, intent.currency) == ("succeeded", 1200, "usd")
        assert intent.id.startswith("pi_")
        again = await client.v1.payment_intents.retrieve_async(intent.id)
        assert isinstance(again, stripe.PaymentIntent)
        assert again.id == intent.id
        refund = await client.v1.refunds.create_async({"payment_intent": intent.id, "amount": 200})
        assert isinstance(refund, stripe.Refund)
        assert (refund.status, refund.amount, refund.payment_intent) == ("succeeded", 200, intent.id)

        with pytest.raises(stripe.CardError) as declined:
            await client.v1.payment_intents.create_async(
                {"amount": 1200, "currency": "usd", "payment_method": "pm_card_chargeDeclined", "confirm": True}
            )
        assert declined.value.code == "card_declined"
        assert declined.value.http_status == 402
        assert declined.value.error is not None
        assert declined.value.error.decline_code == "generic_decline"
        with pytest.raises(stripe.InvalidRequestError) as missing:
            await client.v1.payment_intents.retrieve_async("pi_nope")
        assert missing.value.code == "resource_missing"
        with pytest.raises(stripe.InvalidRequestError) as too_much:
            await client.v1.refunds.create_async({"payment_intent": intent.id, "amount": 1001})
        assert too_much.value.http_status == 400
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    assert stub.charges()[0]["amount"] == 1200
    assert [r["amount"] for r in stub.refunds()] == [200]


async def test_the_stub_wants_a_secret_key_and_holds_idempotency_keys_to_their_parameters(
    stub: StripeStub,
) -> None:
    http = stripe.HTTPXClient()
    try:
        anonymous = stripe.StripeClient(
            "pk_test_publishable", base_addresses={"api": stub.url}, http_client=http, max_network_retries=0
        )
        with pytest.raises(stripe.AuthenticationError):
            await anonymous.v1.payment_intents.retrieve_async("pi_123")
        client = stripe.StripeClient(KEY, base_addresses={"api": stub.url}, http_client=http, max_network_retries=0)
        params: Any = {"amount": 500, "currency": "eur", "payment_method": "pm_card_visa", "confirm": True}
        first = await client.v1.payment_intents.create_async(params, {"idempotency_key": "k-1"})
        again = await client.v1.payment_intents.create_async(params, {"idempotency_key": "k-1"})
        assert again.id == first.id
        changed: Any = {**params, "amount": 501}
        with pytest.raises(stripe.IdempotencyError):
            await client.v1.payment_intents.create_async(changed, {"idempotency_key": "k-1"})
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]
    assert len(stub.charges()) == 1


# -- what goes on the wire --------------------------------------------------------------------------


async def test_a_capture_sends_the_key_the_idempotency_key_and_the_order(
    provider: StripePaymentProvider, stub: StripeStub
) -> None:
    order = charge()
    result = await provider.capture(order)
    assert result.reference is not None
    assert result.reference.startswith("pi_")
    [sent] = stub.intent_creates()
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.idempotency_key == order.idempotency_key
    assert sent.form == {
        "amount": "2500",
        "currency": "eur",
        "payment_method": "pm_card_visa",
        "confirm": "true",
        "automatic_payment_methods[enabled]": "true",
        "automatic_payment_methods[allow_redirects]": "never",
        "metadata[order_id]": "1042",
        "metadata[customer]": "Zo\u00eb",
        "description": "Order #1042",
    }
    # No description, no metadata: nothing sent for them.
    await provider.capture(charge(description="", metadata={}))
    bare = stub.intent_creates()[-1].form
    assert "description" not in bare
    assert not [k for k in bare if k.startswith("metadata")]
    assert stub.charges()[0]["id"] == result.reference


async def test_a_refund_sends_the_payment_intent_amount_reason_and_its_own_key(
    provider: StripePaymentProvider, stub: StripeStub
) -> None:
    captured = await provider.capture(charge())
    assert captured.reference is not None
    order = RefundOrder(
        idempotency_key=refund_key(new_id()),
        charge_reference=captured.reference,
        amount=900,
        currency="EUR",
        reason=RefundReason.DUPLICATE,
    )
    result = await provider.refund(order)
    assert result.reference is not None
    assert result.reference.startswith("re_")
    [sent] = stub.calls("POST", "/v1/refunds")
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.idempotency_key == order.idempotency_key
    assert sent.form == {"payment_intent": captured.reference, "amount": "900", "reason": "duplicate"}
    # No reason: none is sent.
    await provider.refund(
        RefundOrder(
            idempotency_key=refund_key(new_id()), charge_reference=captured.reference, amount=100, currency="EUR"
        )
    )
    assert "reason" not in stub.calls("POST", "/v1/refunds")[-1].form


# -- definitive answers and retryable ones ----------------------------------------------------------


async def test_a_refused_api_key_is_worth_a_retry_not_a_failure(stub: StripeStub) -> None:
    stub.accepted_keys = {KEY}
    revoked = StripePaymentProvider("sk_test_revoked000", api_base=stub.url)
    fixed = StripePaymentProvider(KEY, api_base=stub.url)
    order = charge()
    try:
        with pytest.raises(ProviderUnavailable):
            await revoked.capture(order)
        assert stub.charges() == []
        # The operator fixes the key while the job retries: the same order goes through, once.
        result = await fixed.capture(order)
        assert result.reference is not None
        assert await fixed.capture(order) == result
    finally:
        await revoked.aclose()
        await fixed.aclose()
    assert len(stub.charges()) == 1
    assert [r.headers["authorization"] for r in stub.intent_creates()] == [
        "Bearer sk_test_revoked000",
        f"Bearer {KEY}",
        f"Bearer {KEY}",
    ]


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_rate_limits_and_server_errors_are_worth_a_retry(
    provider: StripePaymentProvider, stub: StripeStub, status: int
) -> None:
    order = charge()
    stub.fail_next(status)
    with pytest.raises(ProviderUnavailable):
        await provider.capture(order)
    assert stub.charges() == []
    result = await provider.capture(order)
    assert result.reference is not None
    assert len(stub.charges()) == 1

    refund = RefundOrder(
        idempotency_key=refund_key(new_id()), charge_reference=result.reference, amount=100, currency="EUR"
    )
    stub.fail_next(status)
    with pytest.raises(ProviderUnavailable):
        await provider.refund(refund)
    assert stub.refunds() == []
    assert (await provider.refund(refund)).reference is not None
    assert len(stub.refunds()) == 1


async def test_an_error_page_that_is_not_stripes_json_is_worth_a_retry(
    provider: StripePaymentProvider, stub: StripeStub
) -> None:
    # A proxy in front of the API answering 400 with a body that is not a Stripe error.
    stub.script.append(StubReply(400, {"detail": "bad gateway config"}))
    with pytest.raises(ProviderUnavailable):
        await provider.capture(charge())


async def test_a_closed_port_is_worth_a_retry() -> None:
    nobody = StripePaymentProvider(KEY, api_base=f"http://127.0.0.1:{free_port()}", timeout=5)
    try:
        with pytest.raises(ProviderUnavailable):
            await nobody.capture(charge())
        with pytest.raises(ProviderUnavailable):
            await nobody.refund(
                RefundOrder(idempotency_key=refund_key(new_id()), charge_reference="pi_1", amount=1, currency="EUR")
            )
    finally:
        await nobody.aclose()


async def test_a_stub_that_stopped_answering_is_worth_a_retry(
    provider: StripePaymentProvider, stub: StripeStub
) -> None:
    assert (await provider.capture(charge())).reference is not None
    stub.close()
    with pytest.raises(ProviderUnavailable):
        await provider.capture(charge())


async def test_a_payment_still_processing_is_asked_for_again_under_the_same_key(
    provider: StripePaymentProvider, stub: StripeStub
) -> None:
    stub.processing.add("pm_card_slowBank")
    order = charge("pm_card_slowBank")
    with pytest.raises(ProviderUnavailable):
        await provider.capture(order)
    [intent] = stub.intents()
    assert intent["status"] == "processing"
    assert len(stub.calls("GET", f"/v1/payment_intents/{intent['id']}")) == 1  # asked for the current state
    stub.settle(intent["id"])
    # The replayed create answers "processing" again (its first answer); the adapter reads the current state.
    result = await provider.capture(order)
    assert result.reference == intent["id"]
    assert len(stub.intent_creates()) == 2
    assert len(stub.charges()) == 1


async def test_a_card_that_needs_authentication_fails_definitively(
    provider: StripePaymentProvider, stub: StripeStub
) -> None:
    result = await provider.capture(charge("pm_card_authenticationRequired"))
    assert result.failure is not None
    assert result.failure.reason is FailureReason.AUTHENTICATION_REQUIRED
    assert stub.charges() == []


# -- the secret key stays secret --------------------------------------------------------------------


@pytest.fixture
def stripe_debug_logs() -> Iterator[None]:
    """The SDK's own logger at DEBUG (it logs requests and response bodies there), routed like any stdlib log."""
    sdk = logging.getLogger("stripe")
    level = sdk.level
    sdk.setLevel(logging.DEBUG)
    yield
    sdk.setLevel(level)


async def test_the_secret_key_never_reaches_the_logs(
    stub: StripeStub, json_logs: list[dict[str, Any]], stripe_debug_logs: None
) -> None:
    secret = "sk_test_secret123NeverLogMe"
    wrong = "sk_test_wrong456NeverLogMe"
    stub.accepted_keys = {secret}
    good = StripePaymentProvider(secret, api_base=stub.url)
    bad = StripePaymentProvider(wrong, api_base=stub.url)
    try:
        captured = await good.capture(charge())
        assert captured.reference is not None
        declined = await good.capture(charge("pm_card_chargeDeclined"))
        assert declined.failure is not None
        stub.fail_next(500)
        with pytest.raises(ProviderUnavailable) as outage:
            await good.capture(charge())
        with pytest.raises(ProviderUnavailable) as refused:
            await bad.capture(charge())
    finally:
        await good.aclose()
        await bad.aclose()
    assert any(line["logger"].startswith("stripe") for line in json_logs), "the SDK's logs were captured"
    text = "\n".join(str(line) for line in json_logs)
    assert "Invalid API Key" in text  # the refusal was logged ...
    assert secret not in text  # ... and neither key was
    assert wrong not in text
    for exc in (outage.value, refused.value):
        assert secret not in str(exc)
        assert wrong not in str(exc)
        assert secret not in repr(exc)


def stripe_env(api_base: str, **env: str) -> dict[str, str]:
    return {
        "KEEL_DATABASE_URL": "sqlite+aiosqlite:///unused.db",
        "KEEL_PAYMENTS_PROVIDER": "stripe",
        "KEEL_STRIPE_SECRET_KEY": "sk_test_secret123",
        "KEEL_STRIPE_API_BASE": api_base,
        **env,
    }


def test_settings_keep_the_key_out_of_their_repr(stub: StripeStub) -> None:
    settings = load_settings(stripe_env(stub.url + "/"))
    assert settings.payments_provider == "stripe"
    assert settings.stripe_secret_key == "sk_test_secret123"
    assert settings.stripe_api_base == stub.url
    assert "sk_test_secret123" not in repr(settings)
    assert "sk_test_secret123" not in str(settings)
    assert "secret123" not in repr(settings.stripe_secret_key)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"KEEL_STRIPE_SECRET_KEY": ""}, "KEEL_STRIPE_SECRET_KEY"),
        ({"KEEL_STRIPE_SECRET_KEY": "pk_live_publishableOops"}, "KEEL_STRIPE_SECRET_KEY"),
        ({"KEEL_STRIPE_SECRET_KEY": "whsec_notAnApiKeyOops"}, "KEEL_STRIPE_SECRET_KEY"),
        ({"KEEL_STRIPE_API_BASE": "127.0.0.1:12111"}, "KEEL_STRIPE_API_BASE"),
        ({"KEEL_STRIPE_API_BASE": "ftp://127.0.0.1/"}, "KEEL_STRIPE_API_BASE"),
    ],
)
def test_bad_stripe_settings_are_refused_without_echoing_keys(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(stripe_env("http://127.0.0.1:12111", **env))
    assert variable in str(refused.value)
    assert "Oops" not in str(refused.value)


def test_a_stripe_key_without_the_stripe_provider_leaves_the_sandbox_in_charge() -> None:
    settings = load_settings({"KEEL_DATABASE_URL": "sqlite+aiosqlite:///unused.db", "KEEL_STRIPE_SECRET_KEY": KEY})
    assert settings.payments_provider == "sandbox"


async def test_the_container_wires_stripe_and_closes_it(stub: StripeStub, sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(
        sqlite_url,
        tmp_path,
        KEEL_PAYMENTS_PROVIDER="stripe",
        KEEL_STRIPE_SECRET_KEY=KEY,
        KEEL_STRIPE_API_BASE=stub.url,
    )
    container = build_container(settings)
    try:
        provider = container.payment_provider
        assert isinstance(provider, StripePaymentProvider)
        assert provider.name == "stripe"
        assert (await provider.capture(charge())).reference is not None
        [sent] = stub.intent_creates()
        assert sent.headers["authorization"] == f"Bearer {KEY}"
    finally:
        await container.aclose()
    # Closed with the container: nothing more reaches Stripe through it.
    with pytest.raises(ProviderUnavailable):
        await provider.capture(charge())
    assert len(stub.intent_creates()) == 1


# -- through the whole app --------------------------------------------------------------------------


async def test_payments_through_the_app_are_settled_by_stripe(
    stub: StripeStub, sqlite_url: str, tmp_path: Path
) -> None:
    settings = make_settings(
        sqlite_url,
        tmp_path,
        KEEL_PAYMENTS_PROVIDER="stripe",
        KEEL_STRIPE_SECRET_KEY=KEY,
        KEEL_STRIPE_API_BASE=stub.url,
    )
    async with client_for(settings) as client:
        tenant = await signup(client)
        headers = tenant["headers"]

        async def pay(token: str) -> dict[str, Any]:
            r = await client.post(
                "/v1/payments",
                json={
                    "amount": 2500,
                    "currency": "eur",
                    "payment_method": token,
                    "description": "Order #1042",
                    "metadata": {"order_id": "1042"},
                },
                headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
            )
            assert r.status_code == 202, r.text
            body: dict[str, Any] = r.json()
            assert body["payment"]["status"] == "pending"
            assert body["payment"]["provider"] == "stripe"
            return body

        async def settled(path: str) -> dict[str, Any]:
            """The resource at ``path`` once it is final; empty (not yet) before."""
            r = await client.get(path, headers=headers)
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            return body if body["status"] not in ("pending", "queued", "scheduled", "running") else {}

        accepted = await pay("pm_card_visa")
        payment_id = accepted["payment"]["id"]
        paid = await eventually(lambda: settled(f"/v1/payments/{payment_id}"))
        assert paid["status"] == "succeeded"
        assert paid["provider_reference"].startswith("pi_")
        assert paid["failure_reason"] is None
        job = await eventually(lambda: settled(accepted["status_url"]))
        assert job["status"] == "succeeded"
        [create] = stub.intent_creates()
        assert create.idempotency_key == f"keel-capture-{payment_id}"
        assert create.form["amount"] == "2500"
        assert create.form["currency"] == "eur"
        assert create.form["metadata[order_id]"] == "1042"
        [booked] = stub.charges()
        assert booked["id"] == paid["provider_reference"]

        r = await client.post(
            f"/v1/payments/{payment_id}/refunds",
            json={"amount": 1000, "reason": "requested_by_customer"},
            headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert r.status_code == 202, r.text
        refund_id = r.json()["refund"]["id"]
        refunded = await eventually(lambda: settled(f"/v1/payments/{payment_id}/refunds/{refund_id}"))
        assert refunded["status"] == "succeeded"
        assert refunded["provider_reference"].startswith("re_")
        [sent] = stub.calls("POST", "/v1/refunds")
        assert sent.idempotency_key == f"keel-refund-{refund_id}"
        assert sent.form["payment_intent"] == paid["provider_reference"]
        assert [x["amount"] for x in stub.refunds()] == [1000]

        declined = await pay("pm_card_chargeDeclined")
        failed = await eventually(lambda: settled(f"/v1/payments/{declined['payment']['id']}"))
        assert failed["status"] == "failed"
        assert failed["failure_reason"] == "card_declined"
        assert failed["failure_message"] == "Your card was declined."
        assert failed["provider_reference"] is None
        assert len(stub.charges()) == 1
