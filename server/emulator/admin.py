"""The emulator's test API (not Auth0's), for driving a running emulator from outside:
mint access tokens for any account, create users with names and permissions, choose who
`/authorize` signs in, register callback URLs, connect, disconnect, expire and revoke accounts,
play the user in the device flow and in CIBA approvals, and inject faults. JSON in, JSON out;
errors are Auth0-shaped `invalid_request`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.emulator.errors import OAuthError, error_response, invalid_request
from server.emulator.faults import FaultKind, FaultSettings
from server.emulator.state import EmulatorState

M = TypeVar("M", bound=BaseModel)


class MintRequest(BaseModel):
    """`POST /emulator/tokens`."""

    sub: str = Field(min_length=1)
    scopes: list[str]
    azp: str | None = None
    audience: str | list[str] | None = None  # default: the tenant's first API
    expires_in: int = Field(default=3600, gt=0)


class ConnectRequest(BaseModel):
    """`POST /emulator/accounts`."""

    sub: str = Field(min_length=1)
    connection: str = Field(min_length=1)
    scopes: list[str]


class ApproveRequest(BaseModel):
    """`POST /emulator/device/approve`."""

    user_code: str = Field(min_length=1)
    sub: str = Field(min_length=1)


class DenyRequest(BaseModel):
    """`POST /emulator/device/deny`."""

    user_code: str = Field(min_length=1)


class DecisionRequest(BaseModel):
    """`POST /emulator/approvals/{auth_req_id}`: the user's answer to a pending CIBA request."""

    decision: Literal["approve", "deny"]


class RevokeRequest(BaseModel):
    """`POST /emulator/accounts/revoke`."""

    sub: str = Field(min_length=1)
    connection: str = Field(min_length=1)


class UserRequest(BaseModel):
    """`POST /emulator/users`: create or update a user; `permissions` by API audience replace the old ones."""

    sub: str = Field(min_length=1, max_length=256)
    name: str | None = Field(default=None, max_length=256)
    permissions: dict[str, list[str]] = Field(default_factory=dict)


class LoginRequest(BaseModel):
    """`POST /emulator/login`: who `/authorize` signs in at once (None: show the sign-in page)."""

    sub: str | None = None


class CallbacksRequest(BaseModel):
    """`POST /emulator/clients/{client_id}/callbacks`: more Allowed Callback URLs."""

    urls: list[str] = Field(min_length=1)


class NextFault(BaseModel):
    """One-shot faults for the next requests (see `faults.py` for the kinds)."""

    kind: FaultKind
    count: int = Field(default=1, ge=1, le=10_000)
    status: int = Field(default=503, ge=400, le=599, description="kind status only")
    error: str = Field(default="server_error", min_length=1, description="kind status only")
    retry_after: int | None = Field(default=None, ge=0, le=3600, description="kind rate_limit only")
    reset_in: int | None = Field(default=1, ge=0, le=3600, description="kind rate_limit only")


class FaultsRequest(FaultSettings):
    """`POST /emulator/faults`: clear first (if asked), then apply the rates, then queue `next`."""

    clear: bool = False
    next: list[NextFault] = Field(default_factory=list)


def admin_routes(state: EmulatorState) -> list[Route]:
    """The routes of the test API, bound to `state`."""

    async def mint(request: Request) -> Response:
        try:
            body = _parse(MintRequest, await request.body())
            audience = body.audience or state.default_audience
        except LookupError:
            return error_response(invalid_request("The tenant has no API; send an audience."))
        except OAuthError as error:
            return error_response(error)
        token = state.mint_access_token(
            body.sub, audience=audience, scopes=body.scopes, azp=body.azp, expires_in=body.expires_in
        )
        return JSONResponse({"access_token": token, "token_type": "Bearer", "expires_in": body.expires_in})

    async def connect(request: Request) -> Response:
        try:
            body = _parse(ConnectRequest, await request.body())
        except OAuthError as error:
            return error_response(error)
        state.add_user(body.sub)
        state.connect_account(body.sub, body.connection, body.scopes)
        return JSONResponse(body.model_dump())

    async def approve(request: Request) -> Response:
        try:
            body = _parse(ApproveRequest, await request.body())
            state.add_user(body.sub)
            _act(lambda: state.approve_device(body.user_code, body.sub))
        except OAuthError as error:
            return error_response(error)
        return JSONResponse({"user_code": body.user_code, "status": "approved"})

    async def deny(request: Request) -> Response:
        try:
            body = _parse(DenyRequest, await request.body())
            _act(lambda: state.deny_device(body.user_code))
        except OAuthError as error:
            return error_response(error)
        return JSONResponse({"user_code": body.user_code, "status": "denied"})

    async def approvals(request: Request) -> Response:
        pending = [
            {
                "auth_req_id": grant.auth_req_id,
                "sub": grant.sub,
                "binding_message": grant.binding_message,
                "authorization_details": grant.authorization_details,
            }
            for grant in state.pending_ciba()
        ]
        return JSONResponse({"approvals": pending})

    async def decide(request: Request) -> Response:
        auth_req_id = request.path_params["auth_req_id"]
        try:
            body = _parse(DecisionRequest, await request.body())
            decide = state.approve_ciba if body.decision == "approve" else state.deny_ciba
            _act(lambda: decide(auth_req_id))
        except OAuthError as error:
            return error_response(error)
        status = "approved" if body.decision == "approve" else "denied"
        return JSONResponse({"auth_req_id": auth_req_id, "status": status})

    async def revoke(request: Request) -> Response:
        try:
            body = _parse(RevokeRequest, await request.body())
            _act(lambda: state.revoke_connection(body.sub, body.connection))
        except OAuthError as error:
            return error_response(error)
        return JSONResponse({**body.model_dump(), "revoked": True})

    async def faults(request: Request) -> Response:
        try:
            body = _parse(FaultsRequest, await request.body())
        except OAuthError as error:
            return error_response(error)
        if body.clear:
            state.faults.clear()
        try:
            state.faults.configure(FaultSettings.model_validate(body.model_dump(exclude={"clear", "next"})))
        except ValueError as exc:
            return error_response(invalid_request(str(exc)))
        for item in body.next:
            if item.kind == "status":
                state.faults.fail_next(item.status, count=item.count, error=item.error)
            elif item.kind == "rate_limit":
                state.faults.rate_limit_next(count=item.count, reset_in=item.reset_in, retry_after=item.retry_after)
            elif item.kind == "reset":
                state.faults.reset_next(item.count)
            elif item.kind == "hang":
                state.faults.hang_next(item.count)
            else:
                state.faults.malformed_next(item.count)
        current = state.faults.settings().model_dump(exclude_none=True)
        return JSONResponse({**current, "pending": state.faults.pending})

    async def user(request: Request) -> Response:
        try:
            body = _parse(UserRequest, await request.body())
            state.add_user(body.sub, name=body.name)
            for audience, permissions in body.permissions.items():
                _act(lambda: state.set_permissions(body.sub, audience, permissions))  # noqa: B023 - called at once
        except OAuthError as error:
            return error_response(error)
        return JSONResponse(body.model_dump())

    async def login(request: Request) -> Response:
        try:
            body = _parse(LoginRequest, await request.body())
            if body.sub is not None and body.sub not in state.users:
                raise OAuthError(404, "not_found", f"unknown user {body.sub}")
        except OAuthError as error:
            return error_response(error)
        state.auto_login_sub = body.sub
        return JSONResponse({"sub": body.sub})

    async def callbacks(request: Request) -> Response:
        client_id = request.path_params["client_id"]
        try:
            body = _parse(CallbacksRequest, await request.body())
            for url in body.urls:
                _act(lambda: state.add_callback(client_id, url))  # noqa: B023 - called at once
        except OAuthError as error:
            return error_response(error)
        return JSONResponse({"client_id": client_id, "callbacks": list(state.clients[client_id].callbacks)})

    async def require_connect(request: Request) -> Response:
        try:
            body = _parse(RevokeRequest, await request.body())
            state.add_user(body.sub)
            state.require_connect(body.sub, body.connection)
        except OAuthError as error:
            return error_response(error)
        return JSONResponse({**body.model_dump(), "connected": False})

    async def expire(request: Request) -> Response:
        try:
            body = _parse(RevokeRequest, await request.body())
            _act(lambda: state.expire_connection(body.sub, body.connection))
        except OAuthError as error:
            return error_response(error)
        return JSONResponse({**body.model_dump(), "expired": True})

    return [
        Route("/emulator/users", user, methods=["POST"]),
        Route("/emulator/login", login, methods=["POST"]),
        Route("/emulator/clients/{client_id}/callbacks", callbacks, methods=["POST"]),
        Route("/emulator/accounts/require-connect", require_connect, methods=["POST"]),
        Route("/emulator/accounts/expire", expire, methods=["POST"]),
        Route("/emulator/tokens", mint, methods=["POST"]),
        Route("/emulator/accounts", connect, methods=["POST"]),
        Route("/emulator/accounts/revoke", revoke, methods=["POST"]),
        Route("/emulator/faults", faults, methods=["POST"]),
        Route("/emulator/device/approve", approve, methods=["POST"]),
        Route("/emulator/device/deny", deny, methods=["POST"]),
        Route("/emulator/approvals", approvals, methods=["GET"]),
        Route("/emulator/approvals/{auth_req_id}", decide, methods=["POST"]),
    ]


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise invalid_request(problems) from exc


def _act(action: Callable[[], None]) -> None:
    try:
        action()
    except ValueError as exc:
        raise OAuthError(404, "not_found", str(exc)) from exc
