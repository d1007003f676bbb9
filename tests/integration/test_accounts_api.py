"""The accounts API end to end: real app, real Postgres, real HTTP semantics."""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

Client = AsyncTestClient[Litestar]


async def test_signup_create_user_read_user(client: Client, pg_url: str) -> None:
    r = await client.post(
        "/v1/signup",
        json={
            "organization": "Acme",
            "owner_email": "Owner@Acme.TEST",
            "owner_name": "Olive",
            "timezone": "Europe/Paris",
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    token = body["api_key"]["token"]
    assert token.startswith("keel_")
    assert body["user"]["email"] == "owner@acme.test"
    assert body["user"]["role"] == "owner"
    assert body["tenant"]["config"]["timezone"] == "Europe/Paris"
    auth = {"Authorization": f"Bearer {token}"}

    r = await client.post("/v1/users", json={"email": "ada@acme.test", "name": "Ada"}, headers=auth)
    assert r.status_code == 201, r.text
    created = r.json()
    assert r.headers["location"] == f"/v1/users/{created['id']}"

    assert created == {
        "id": created["id"],
        "email": "ada@acme.test",
        "name": "Ada",
        "role": "member",
        "avatar_url": None,  # until an uploaded avatar has been processed
        "created_at": created["created_at"],
        "updated_at": created["created_at"],
    }
    assert body["user"] == {
        "id": body["user"]["id"],
        "email": "owner@acme.test",
        "name": "Olive",
        "role": "owner",
        "avatar_url": None,
        "created_at": body["user"]["created_at"],
        "updated_at": body["user"]["created_at"],
    }

    r = await client.get(f"/v1/users/{created['id']}", headers=auth)
    assert r.status_code == 200
    assert r.json() == created
    r = await client.get("/v1/users", headers=auth)
    assert r.json()["items"] == [body["user"], created]

    # The database holds only the key's SHA-256, never the token.
    engine = create_async_engine(pg_url)
    async with engine.connect() as conn:
        dump = str((await conn.execute(text("SELECT * FROM api_keys"))).all())
    await engine.dispose()
    assert token not in dump
    import hashlib

    assert hashlib.sha256(token.encode()).hexdigest() in dump


async def test_user_lifecycle(client: Client, tenant: dict[str, Any]) -> None:
    h = tenant["headers"]
    r = await client.post("/v1/users", json={"email": "bob@acme.test", "name": "Bob"}, headers=h)
    user = r.json()
    r = await client.patch(f"/v1/users/{user['id']}", json={"name": "Robert"}, headers=h)
    assert r.status_code == 200
    assert r.json()["name"] == "Robert"
    assert r.json()["email"] == "bob@acme.test"
    assert r.json()["updated_at"] >= user["updated_at"]

    r = await client.post("/v1/users", json={"email": "BOB@acme.test", "name": "Other Bob"}, headers=h)
    assert r.status_code == 409
    assert r.json()["type"] == "/problems/email-taken"

    owner_id = tenant["user"]["id"]
    r = await client.delete(f"/v1/users/{owner_id}", headers=h)
    assert r.status_code == 409

    r = await client.delete(f"/v1/users/{user['id']}", headers=h)
    assert r.status_code == 204
    assert (await client.get(f"/v1/users/{user['id']}", headers=h)).status_code == 404
    assert (await client.delete(f"/v1/users/{user['id']}", headers=h)).status_code == 404


async def test_user_list_pages_with_cursor(client: Client, tenant: dict[str, Any]) -> None:
    h = tenant["headers"]
    ids = [tenant["user"]["id"]]
    for i in range(6):
        r = await client.post("/v1/users", json={"email": f"u{i}@acme.test", "name": f"U {i}"}, headers=h)
        ids.append(r.json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        r = await client.get("/v1/users", params=params, headers=h)
        assert r.status_code == 200
        page = r.json()
        seen += [u["id"] for u in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids


async def test_tenant_config(client: Client, tenant: dict[str, Any]) -> None:
    h = tenant["headers"]
    r = await client.get("/v1/tenant", headers=h)
    assert r.status_code == 200
    assert r.json()["id"] == tenant["tenant"]["id"]
    r = await client.patch(
        "/v1/tenant/config",
        json={"display_name": "Acme EU", "locale": "fr-FR", "rate_limit_per_minute": 600},
        headers=h,
    )
    assert r.status_code == 200
    config = r.json()["config"]
    assert config == {"display_name": "Acme EU", "timezone": "UTC", "locale": "fr-FR", "rate_limit_per_minute": 600}
    r = await client.patch("/v1/tenant/config", json={"rate_limit_per_minute": None}, headers=h)
    assert r.json()["config"]["rate_limit_per_minute"] is None
    assert r.json()["config"]["display_name"] == "Acme EU"
    r = await client.patch("/v1/tenant/config", json={"timezone": "Mars/Olympus"}, headers=h)
    assert r.status_code == 422
    assert r.json()["errors"] == [{"detail": "Unknown IANA timezone 'Mars/Olympus'.", "pointer": "#/timezone"}]


async def test_api_keys_issue_list_revoke(client: Client, tenant: dict[str, Any]) -> None:
    h = tenant["headers"]
    r = await client.post("/v1/api-keys", json={"name": "ci"}, headers=h)
    assert r.status_code == 201
    issued = r.json()
    new_auth = {"Authorization": f"Bearer {issued['token']}"}
    assert (await client.get("/v1/tenant", headers=new_auth)).status_code == 200

    r = await client.get("/v1/api-keys", headers=h)
    listed = r.json()["items"]
    assert [k["id"] for k in listed] == [tenant["api_key"]["id"], issued["id"]]
    assert all("token" not in k for k in listed)
    assert listed[1]["prefix"] == issued["token"][:12]

    r = await client.delete(f"/v1/api-keys/{issued['id']}", headers=h)
    assert r.status_code == 204
    # Revocation is effective for the very next request.
    r = await client.get("/v1/tenant", headers=new_auth)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["type"] == "/problems/unauthorized"
    r = await client.get("/v1/api-keys", headers=h)
    assert r.json()["items"][1]["revoked_at"] is not None


async def test_authentication_is_required(client: Client, tenant: dict[str, Any]) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer keel_not-a-real-key"},
        {"Authorization": "Bearer " + "x" * 5000},
    ):
        r = await client.get("/v1/users", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["content-type"] == "application/problem+json"


async def test_clients_cannot_set_avatar_url_themselves(client: Client, tenant: dict[str, Any]) -> None:
    """Only the media context sets a profile's avatar_url (once it has made the image): a client naming one
    in a body is refused, and nothing changes."""
    h = tenant["headers"]
    r = await client.post(
        "/v1/users", json={"email": "eve@acme.test", "name": "Eve", "avatar_url": "https://evil.test/x.png"}, headers=h
    )
    assert r.status_code == 422, r.text
    r = await client.post("/v1/users", json={"email": "eve@acme.test", "name": "Eve"}, headers=h)
    assert r.status_code == 201, r.text
    eve = r.json()
    for body in ({"avatar_url": "https://evil.test/x.png"}, {"name": "Eve", "avatar_url": None}):
        r = await client.patch(f"/v1/users/{eve['id']}", json=body, headers=h)
        assert r.status_code == 422, r.text
        assert any(e.get("pointer") == "#/avatar_url" or "avatar_url" in e["detail"] for e in r.json()["errors"])
    r = await client.get(f"/v1/users/{eve['id']}", headers=h)
    assert r.json() == eve
