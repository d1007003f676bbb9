"""The OpenAPI document is generated from the same types that validate requests."""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient

Client = AsyncTestClient[Litestar]
PUBLIC = {("post", "/v1/signup"), ("get", "/healthz"), ("get", "/livez")}
# Actions on a resource that take no body.
BODILESS = {
    ("post", "/v1/webhook-endpoints/{endpoint_id}/rotate-secret"),
    ("post", "/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}/retry"),
}
# Operations whose body may be left out (a refund without one refunds everything left).
OPTIONAL_BODY = {("post", "/v1/payments/{payment_id}/refunds")}
# Operations that require an Idempotency-Key header.
IDEMPOTENT = {("post", "/v1/payments"), ("post", "/v1/payments/{payment_id}/refunds")}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
# Operations whose body is raw bytes the handler reads itself (an image upload), not JSON: the media types
# they take. The schema of each is a binary string.
RAW_BODY = {("put", "/v1/users/{user_id}/avatar"): IMAGE_TYPES}
# Operations whose success answers bytes of a media type rather than JSON.
BINARY_RESPONSE = {("get", "/v1/users/{user_id}/avatar"): ("200", "image/webp")}
BINARY = {"type": "string", "format": "binary"}


def body_ref(schema: dict[str, Any], optional: bool) -> str | None:
    """The component a request body schema names: ``{$ref}``, or for an optional body
    ``{oneOf: [{$ref}, {type: null}]}``; None for anything untyped."""
    if "$ref" in schema:
        return str(schema["$ref"])
    if not optional or set(schema) != {"oneOf"}:
        return None
    refs = [s["$ref"] for s in schema["oneOf"] if "$ref" in s]
    rest = [s for s in schema["oneOf"] if "$ref" not in s]
    return str(refs[0]) if len(refs) == 1 and rest == [{"type": "null"}] else None


async def test_every_operation_is_typed_and_documents_its_errors(client: Client) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    spec: dict[str, Any] = r.json()
    assert spec["openapi"].startswith("3.1")
    assert spec["components"]["securitySchemes"]["BearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "API key",
    }
    operations = [(m, p, op) for p, item in spec["paths"].items() for m, op in item.items()]
    assert {(m, p) for m, p, _ in operations} >= {
        ("post", "/v1/signup"),
        ("get", "/v1/tenant"),
        ("patch", "/v1/tenant/config"),
        ("get", "/v1/api-keys"),
        ("post", "/v1/api-keys"),
        ("delete", "/v1/api-keys/{key_id}"),
        ("get", "/v1/users"),
        ("post", "/v1/users"),
        ("get", "/v1/users/{user_id}"),
        ("patch", "/v1/users/{user_id}"),
        ("delete", "/v1/users/{user_id}"),
        ("get", "/healthz"),
        ("get", "/livez"),
        ("get", "/v1/jobs/{job_id}"),
        ("post", "/v1/webhook-endpoints"),
        ("get", "/v1/webhook-endpoints"),
        ("get", "/v1/webhook-endpoints/{endpoint_id}"),
        ("patch", "/v1/webhook-endpoints/{endpoint_id}"),
        ("delete", "/v1/webhook-endpoints/{endpoint_id}"),
        ("post", "/v1/webhook-endpoints/{endpoint_id}/rotate-secret"),
        ("get", "/v1/webhook-endpoints/{endpoint_id}/deliveries"),
        ("get", "/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}"),
        ("post", "/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}/retry"),
        ("get", "/v1/webhook-event-types"),
        ("post", "/v1/payments"),
        ("get", "/v1/payments"),
        ("get", "/v1/payments/{payment_id}"),
        ("post", "/v1/payments/{payment_id}/refunds"),
        ("get", "/v1/payments/{payment_id}/refunds"),
        ("get", "/v1/payments/{payment_id}/refunds/{refund_id}"),
        ("put", "/v1/users/{user_id}/avatar"),
        ("get", "/v1/users/{user_id}/avatar"),
        ("get", "/v1/analytics/summary"),
        ("post", "/v1/analytics/rollups"),
    }
    assert set(RAW_BODY) | set(BINARY_RESPONSE) <= {(m, p) for m, p, _ in operations}
    schemas = spec["components"]["schemas"]
    for method, path, op in operations:
        where = f"{method.upper()} {path}"
        assert op.get("summary"), where
        responses = op["responses"]
        success = [c for c in responses if c.startswith("2")]
        assert success, where
        if (method, path) in RAW_BODY:
            # Exactly the accepted types, each a binary string, and the body is required.
            assert op["requestBody"] == {
                "content": {t: {"schema": BINARY} for t in RAW_BODY[(method, path)]},
                "required": True,
            }, where
            assert {"413", "415", "422"} <= set(responses), where
        elif method in ("post", "patch", "put") and (method, path) not in BODILESS:
            assert set(op["requestBody"]["content"]) == {"application/json"}, where
            body = op["requestBody"]["content"]["application/json"]["schema"]
            ref = body_ref(body, optional=(method, path) in OPTIONAL_BODY)
            assert ref is not None, f"{where}: untyped request body {body}"
            assert ref.removeprefix("#/components/schemas/") in schemas, where
            assert {"413", "415", "422"} <= set(responses), where
        if (method, path) in BINARY_RESPONSE:
            code, media_type = BINARY_RESPONSE[(method, path)]
            assert set(responses[code]["content"]) == {media_type}, where
            assert responses[code]["content"][media_type]["schema"]["type"] == "string", where
        else:
            for code in success:
                content = responses[code].get("content", {})
                assert set(content) <= {"application/json", "application/health+json"}, f"{where} {code}: {content}"
        headers = {p["name"].lower(): p for p in op.get("parameters", []) if p["in"] == "header"}
        if (method, path) in IDEMPOTENT:
            key = headers.get("idempotency-key")
            assert key is not None, f"{where}: Idempotency-Key not documented"
            assert key["required"] is True, where
            assert key["schema"]["type"] == "string", where
            assert "retries" in key["description"], where
            assert "400" in responses, where
        else:
            assert "idempotency-key" not in headers or not headers["idempotency-key"]["required"], where
        if (method, path) in PUBLIC:
            assert not op.get("security"), where
        else:
            assert op["security"] == [{"BearerAuth": []}], where
            assert "401" in responses, where
            problem = responses["401"]["content"]["application/problem+json"]["schema"]
            assert problem["$ref"].endswith("/Problem"), where
        if "{" in path:
            assert "404" in responses, where
        if (method, path) in BODILESS:
            assert "requestBody" not in op, where
    # Validation constraints are published, not just enforced.
    user_in = spec["components"]["schemas"]["UserIn"]
    assert user_in["additionalProperties"] is False
    assert user_in["properties"]["email"]["maxLength"] == 320
    payment_in = schemas["PaymentIn"]
    assert payment_in["additionalProperties"] is False
    assert set(payment_in["required"]) == {"amount", "currency", "payment_method"}
    assert (payment_in["properties"]["amount"]["minimum"], payment_in["properties"]["amount"]["maximum"]) == (
        1,
        99_999_999,
    )
    # Anchored so that a trailing newline cannot pass (see keel.platform.adapters.http.schemas.whole).
    assert payment_in["properties"]["currency"]["pattern"] == r"^(?:[A-Za-z]{3})$(?!\n)"
    refund_in = schemas["RefundIn"]
    assert set(refund_in["properties"]) == {"amount", "reason"}
    assert not refund_in.get("required")
    # The avatar upload answers the job that makes its variants; the download takes the size it serves.
    upload = spec["paths"]["/v1/users/{user_id}/avatar"]["put"]
    assert upload["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobAccepted")
    assert set(upload["responses"]) == {"202", "400", "401", "404", "413", "415", "422", "429", "503"}
    download = spec["paths"]["/v1/users/{user_id}/avatar"]["get"]
    (size,) = [p for p in download["parameters"] if p["in"] == "query"]
    assert size["name"] == "size"
    assert size["required"] is False
    assert (size["schema"]["type"], size["schema"]["enum"], size["schema"]["default"]) == ("integer", [64, 256], 256)
    assert {"200", "401", "404"} <= set(download["responses"])
    assert "requestBody" not in download


def ref_name(schema: dict[str, Any]) -> str:
    return str(schema["$ref"]).removeprefix("#/components/schemas/")


async def test_the_analytics_operations_publish_their_parameters_bodies_and_answers(client: Client) -> None:
    spec: dict[str, Any] = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]

    get = spec["paths"]["/v1/analytics/summary"]["get"]
    assert "requestBody" not in get
    params = {p["name"]: p for p in get["parameters"] if p["in"] == "query"}
    assert set(params) == {"from", "to", "currency"}  # as clients send them, not the handler's argument names
    for name in ("from", "to"):
        assert params[name]["required"] is False, name
        assert {"type": "string", "format": "date"} in params[name]["schema"]["oneOf"], name
    assert params["currency"]["required"] is False
    assert params["currency"]["schema"]["pattern"] == r"^(?:[A-Za-z]{3})$(?!\n)"
    assert {"200", "401", "422"} <= set(get["responses"])
    for code in ("401", "422"):
        assert set(get["responses"][code]["content"]) == {"application/problem+json"}, code
    out = schemas[ref_name(get["responses"]["200"]["content"]["application/json"]["schema"])]
    assert set(out["required"]) == {"from", "to", "currency", "totals", "days", "generated_at"}
    assert (out["properties"]["from"]["format"], out["properties"]["to"]["format"]) == ("date", "date")
    day = schemas[ref_name(out["properties"]["days"]["items"])]
    assert set(day["required"]) == {"date", "rolled_up", "payments", "refunds", "new_users", "api_requests"}
    assert day["properties"]["rolled_up"]["type"] == "boolean"
    totals = schemas[ref_name(out["properties"]["totals"])]
    assert set(totals["required"]) == {"payments", "refunds", "new_users", "api_requests"}
    figure = schemas[ref_name(totals["properties"]["payments"]["items"])]
    assert set(figure["required"]) == {"currency", "status", "count", "amount", "amount_display"}
    assert figure["properties"]["amount"]["type"] == "integer"

    post = spec["paths"]["/v1/analytics/rollups"]["post"]
    assert set(post["responses"]) >= {"202", "400", "401", "413", "415", "422"}
    assert "200" not in post["responses"]
    rollup_in = schemas[ref_name(post["requestBody"]["content"]["application/json"]["schema"])]
    assert rollup_in["additionalProperties"] is False
    assert set(rollup_in["required"]) == set(rollup_in["properties"]) == {"from", "to"}
    assert {p["format"] for p in rollup_in["properties"].values()} == {"date"}
    accepted = schemas[ref_name(post["responses"]["202"]["content"]["application/json"]["schema"])]
    assert set(accepted["required"]) == {"job_id", "status_url", "from", "to"}
    # What the operations document, they answer.
    tenant = (
        await client.post("/v1/signup", json={"organization": "A", "owner_email": "o@a.test", "owner_name": "O"})
    ).json()
    headers = {"Authorization": f"Bearer {tenant['api_key']['token']}"}
    r = await client.get("/v1/analytics/summary", params={"currency": "XXX"}, headers=headers)
    assert (r.status_code, r.headers["content-type"]) == (422, "application/problem+json")
    r = await client.post("/v1/analytics/rollups", json={"from": "2020-01-01", "to": "2020-01-02"}, headers=headers)
    assert r.status_code == 202, r.text
    assert set(r.json()) == set(accepted["properties"])


async def request_bodies(client: Client) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    """The component schemas, and each operation's requestBody."""
    spec: dict[str, Any] = (await client.get("/openapi.json")).json()
    bodies = {
        (m, p): op["requestBody"] for p, item in spec["paths"].items() for m, op in item.items() if "requestBody" in op
    }
    return spec["components"]["schemas"], bodies


async def test_every_request_body_publishes_that_it_rejects_unknown_fields(client: Client) -> None:
    schemas, bodies = await request_bodies(client)
    assert bodies
    assert set(RAW_BODY) <= set(bodies)
    for (method, path), body in bodies.items():
        if (method, path) in RAW_BODY:
            continue  # bytes, not an object: nothing to close (its schema is checked above)
        ref = body_ref(body["content"]["application/json"]["schema"], optional=(method, path) in OPTIONAL_BODY)
        assert ref is not None, f"{method.upper()} {path}"
        name = ref.removeprefix("#/components/schemas/")
        assert schemas[name].get("additionalProperties") is False, f"{method.upper()} {path}: {name} is not closed"


async def test_an_optional_request_body_is_documented_as_optional(client: Client) -> None:
    _, bodies = await request_bodies(client)
    for key in OPTIONAL_BODY:
        assert bodies[key].get("required", False) is False, key
    for key, body in bodies.items():
        if key not in OPTIONAL_BODY:
            assert body["required"] is True, key


async def test_the_avatar_download_documents_the_errors_it_answers(client: Client) -> None:
    spec: dict[str, Any] = (await client.get("/openapi.json")).json()
    download = spec["paths"]["/v1/users/{user_id}/avatar"]["get"]
    errors = {code: r for code, r in download["responses"].items() if code.startswith("4")}
    assert "422" in errors, sorted(errors)
    for code, response in errors.items():
        assert set(response.get("content", {})) == {"application/problem+json"}, code
    # What it answers for a size it does not make:
    tenant = (
        await client.post("/v1/signup", json={"organization": "A", "owner_email": "o@a.test", "owner_name": "O"})
    ).json()
    r = await client.get(
        f"/v1/users/{tenant['user']['id']}/avatar?size=100",
        headers={"Authorization": f"Bearer {tenant['api_key']['token']}"},
    )
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"


async def test_docs_ui_and_problem_type_pages(client: Client) -> None:
    r = await client.get("/docs")
    assert r.status_code == 200
    assert "text/html" in r.headers["content-type"]
    r = await client.get("/problems/validation-error")
    assert r.status_code == 200
    assert r.json()["status"] == 422
    r = await client.get("/problems/nope")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
