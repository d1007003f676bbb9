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
    }
    for method, path, op in operations:
        where = f"{method.upper()} {path}"
        assert op.get("summary"), where
        responses = op["responses"]
        success = [c for c in responses if c.startswith("2")]
        assert success, where
        if method in ("post", "patch", "put") and (method, path) not in BODILESS:
            body = op["requestBody"]["content"]["application/json"]["schema"]
            assert "$ref" in body, where
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
