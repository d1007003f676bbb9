"""Thin controllers: parse, call the accounts service, map the result."""

from __future__ import annotations

import uuid

from litestar import Controller, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from keel.contexts.accounts.adapters.http.schemas import (
    ApiKeyIn,
    ApiKeyList,
    ApiKeyOut,
    IssuedApiKeyOut,
    SignupIn,
    SignupOut,
    TenantConfigPatch,
    TenantOut,
    UserIn,
    UserList,
    UserOut,
    UserPatch,
)
from keel.contexts.accounts.domain.commands import ChangeTenantConfig, ChangeUser, CreateUser, Signup
from keel.contexts.accounts.domain.model import IssuedApiKey
from keel.contexts.accounts.domain.services import AccountsService
from keel.platform.adapters.http.auth import BEARER_AUTH, Authenticated
from keel.platform.adapters.http.paging import CursorParam, LimitParam, encode_cursor, page_request
from keel.platform.adapters.http.problems import problem_responses
from keel.platform.adapters.http.schemas import to_command

Accounts = NamedDependency[AccountsService]

_AUTH = (400, 401, 415, 422, 429)


def _issued(i: IssuedApiKey) -> IssuedApiKeyOut:
    k = i.key
    return IssuedApiKeyOut(
        id=k.id, name=k.name, prefix=k.display_prefix, created_at=k.created_at, revoked_at=k.revoked_at, token=i.token
    )


class SignupController(Controller):
    path = "/v1/signup"
    tags = ["accounts"]

    @post(
        "/",
        status_code=HTTP_201_CREATED,
        exclude_from_auth=True,
        rate_limit="signup",
        summary="Create a tenant, its owner and its first API key",
        description="The API key's `token` is shown in this response only; Keel stores its SHA-256.",
        responses=problem_responses(400, 409, 413, 415, 422, 429),
    )
    async def signup(self, data: JSONBody[SignupIn], accounts: Accounts) -> SignupOut:
        result = await accounts.signup(to_command(data, Signup))
        return SignupOut(
            tenant=TenantOut.of(result.tenant), user=UserOut.of(result.owner), api_key=_issued(result.api_key)
        )


class TenantController(Controller):
    path = "/v1/tenant"
    tags = ["accounts"]
    security = BEARER_AUTH

    @get("/", summary="The calling tenant", responses=problem_responses(401, 429))
    async def get_tenant(self, accounts: Accounts, request: Authenticated) -> TenantOut:
        return TenantOut.of(await accounts.get_tenant(request.user))

    @patch("/config", summary="Change tenant configuration", responses=problem_responses(*_AUTH, 413))
    async def patch_config(
        self, data: JSONBody[TenantConfigPatch], accounts: Accounts, request: Authenticated
    ) -> TenantOut:
        return TenantOut.of(await accounts.change_tenant_config(request.user, to_command(data, ChangeTenantConfig)))


class ApiKeyController(Controller):
    path = "/v1/api-keys"
    tags = ["accounts"]
    security = BEARER_AUTH

    @get("/", summary="List API keys", responses=problem_responses(*_AUTH))
    async def list_keys(
        self, accounts: Accounts, request: Authenticated, limit: LimitParam = 50, cursor: CursorParam = None
    ) -> ApiKeyList:
        page = await accounts.list_api_keys(request.user, page_request(limit, cursor))
        return ApiKeyList(items=[ApiKeyOut.of(k) for k in page.items], next_cursor=encode_cursor(page.next_after))

    @post(
        "/",
        status_code=HTTP_201_CREATED,
        summary="Create an API key",
        description="The `token` is shown in this response only.",
        responses=problem_responses(*_AUTH, 413),
    )
    async def create_key(self, data: JSONBody[ApiKeyIn], accounts: Accounts, request: Authenticated) -> IssuedApiKeyOut:
        return _issued(await accounts.create_api_key(request.user, data.name))

    @delete(
        "/{key_id:uuid}",
        status_code=HTTP_204_NO_CONTENT,
        summary="Revoke an API key (effective immediately)",
        responses=problem_responses(*_AUTH, 404),
    )
    async def revoke_key(self, key_id: FromPath[uuid.UUID], accounts: Accounts, request: Authenticated) -> None:
        await accounts.revoke_api_key(request.user, key_id)


class UserController(Controller):
    path = "/v1/users"
    tags = ["accounts"]
    security = BEARER_AUTH

    @get("/", summary="List users", responses=problem_responses(*_AUTH))
    async def list_users(
        self, accounts: Accounts, request: Authenticated, limit: LimitParam = 50, cursor: CursorParam = None
    ) -> UserList:
        page = await accounts.list_users(request.user, page_request(limit, cursor))
        return UserList(items=[UserOut.of(u) for u in page.items], next_cursor=encode_cursor(page.next_after))

    @post("/", status_code=HTTP_201_CREATED, summary="Create a user", responses=problem_responses(*_AUTH, 409, 413))
    async def create_user(
        self, data: JSONBody[UserIn], accounts: Accounts, request: Authenticated
    ) -> Response[UserOut]:
        user = await accounts.create_user(request.user, to_command(data, CreateUser))
        return Response(UserOut.of(user), status_code=HTTP_201_CREATED, headers={"Location": f"/v1/users/{user.id}"})

    @get("/{user_id:uuid}", summary="Read a user profile", responses=problem_responses(*_AUTH, 404))
    async def get_user(self, user_id: FromPath[uuid.UUID], accounts: Accounts, request: Authenticated) -> UserOut:
        return UserOut.of(await accounts.get_user(request.user, user_id))

    @patch("/{user_id:uuid}", summary="Change a user profile", responses=problem_responses(*_AUTH, 404, 409, 413))
    async def patch_user(
        self, user_id: FromPath[uuid.UUID], data: JSONBody[UserPatch], accounts: Accounts, request: Authenticated
    ) -> UserOut:
        return UserOut.of(await accounts.change_user(request.user, user_id, to_command(data, ChangeUser)))

    @delete(
        "/{user_id:uuid}",
        status_code=HTTP_204_NO_CONTENT,
        summary="Delete a user",
        responses=problem_responses(*_AUTH, 404, 409),
    )
    async def delete_user(self, user_id: FromPath[uuid.UUID], accounts: Accounts, request: Authenticated) -> None:
        await accounts.delete_user(request.user, user_id)


ROUTES = [SignupController, TenantController, ApiKeyController, UserController]
