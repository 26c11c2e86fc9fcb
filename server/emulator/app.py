"""The tenant's HTTP face: discovery, JWKS, `/oauth/token`, `/oauth/device/code` and `/bc-authorize`,
Auth0-shaped.

Bodies may be `application/x-www-form-urlencoded` or JSON (Auth0's SDKs send both). Every
request to the POST endpoints is recorded in `state.requests`, failed ones included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from server.emulator.authorize import authorize_routes
from server.emulator.bodies import read_fields
from server.emulator.ciba import start_backchannel_authorization
from server.emulator.client_auth import AuthenticatedClient, authenticate_client
from server.emulator.device import start_device_authorization
from server.emulator.errors import NO_STORE, OAuthError, error_response
from server.emulator.faults import Fault
from server.emulator.grants import GRANTS, revoke_refresh_token
from server.emulator.keys import ASSERTION_ALGORITHMS
from server.emulator.my_account import my_account_routes
from server.emulator.provider import provider_routes
from server.emulator.state import EmulatorState, RecordedRequest
from server.emulator.tokens import required


def create_app(state: EmulatorState, *, admin: bool = True) -> Starlette:
    """A Starlette app serving `state` at its issuer's root.

    With `admin`, the test API under `/emulator/` is served too (see the package docstring).
    """
    endpoints = _Endpoints(state)
    routes = [
        Route("/.well-known/openid-configuration", endpoints.discovery, methods=["GET"]),
        Route("/.well-known/jwks.json", endpoints.jwks, methods=["GET"]),
        Route("/oauth/token", endpoints.token, methods=["POST"]),
        Route("/oauth/device/code", endpoints.device_code, methods=["POST"]),
        Route("/oauth/revoke", endpoints.revoke, methods=["POST"]),
        Route("/bc-authorize", endpoints.bc_authorize, methods=["POST"]),
    ]
    routes += authorize_routes(state)
    routes += my_account_routes(state)
    routes += provider_routes(state)
    if admin:
        from server.emulator.admin import admin_routes  # the test API; the in-process demo tenant has none

        routes += admin_routes(state)
    return Starlette(routes=routes)


class _Endpoints:
    def __init__(self, state: EmulatorState) -> None:
        self.state = state

    async def discovery(self, request: Request) -> Response:
        issuer = self.state.issuer
        return JSONResponse(
            {
                "issuer": issuer,
                "authorization_endpoint": issuer + "authorize",
                "token_endpoint": issuer + "oauth/token",
                "device_authorization_endpoint": issuer + "oauth/device/code",
                "backchannel_authentication_endpoint": issuer + "bc-authorize",
                "backchannel_token_delivery_modes_supported": ["poll"],
                "jwks_uri": issuer + ".well-known/jwks.json",
                "grant_types_supported": list(GRANTS),
                "response_types_supported": ["code"],
                "response_modes_supported": ["query"],
                "code_challenge_methods_supported": ["S256"],
                "subject_types_supported": ["public"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "client_secret_basic",
                    "private_key_jwt",
                ],
                "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
                "id_token_signing_alg_values_supported": ["RS256"],
            }
        )

    async def jwks(self, request: Request) -> Response:
        return JSONResponse(self.state.public_jwks())

    async def token(self, request: Request) -> Response:
        def answer(fields: dict[str, str], recorded: _Recorder) -> dict[str, Any]:
            grant_type = required(fields, "grant_type")
            recorded.grant_type = grant_type
            grant = GRANTS.get(grant_type)
            if grant is None:
                raise OAuthError(400, "unsupported_grant_type", f"Unsupported grant type: {grant_type}")
            recorded.client = authenticate_client(self.state, fields, request.headers)
            return grant(self.state, fields, recorded.client.client)

        return await self._serve(request, answer)

    async def device_code(self, request: Request) -> Response:
        def answer(fields: dict[str, str], recorded: _Recorder) -> dict[str, Any]:
            body = start_device_authorization(self.state, fields)
            # Native clients identify themselves by client_id alone; record who asked.
            recorded.client = AuthenticatedClient(self.state.clients[fields["client_id"]], "none")
            return body

        return await self._serve(request, answer)

    async def revoke(self, request: Request) -> Response:
        def answer(fields: dict[str, str], recorded: _Recorder) -> dict[str, Any]:
            recorded.client = authenticate_client(self.state, fields, request.headers)
            revoke_refresh_token(self.state, fields, recorded.client.client)
            return {}

        return await self._serve(request, answer)

    async def bc_authorize(self, request: Request) -> Response:
        def answer(fields: dict[str, str], recorded: _Recorder) -> dict[str, Any]:
            recorded.client = authenticate_client(self.state, fields, request.headers)
            return start_backchannel_authorization(self.state, fields, recorded.client.client)

        return await self._serve(request, answer)

    async def _serve(
        self,
        request: Request,
        answer: Callable[[dict[str, str], _Recorder], dict[str, Any]],
    ) -> Response:
        """Delay, record, inject faults, and turn OAuthError into Auth0-shaped answers."""
        faults = self.state.faults
        recorded = _Recorder()
        try:
            recorded.fields = await read_fields(request)
            recorded.grant_type = recorded.fields.get("grant_type")
            if faults.latency > 0:  # inside the try: a request its client gave up on is recorded too
                await asyncio.sleep(faults.latency)
            fault = faults.take()
            if fault is not None:
                return _fault_response(fault, now=self.state.clock(), request=request)
            return JSONResponse(answer(recorded.fields, recorded), headers=NO_STORE)
        except OAuthError as error:
            return error_response(error)
        finally:
            self.state.requests.append(recorded.freeze(request))


class _Recorder:
    """What is known of a request so far; frozen into a RecordedRequest however it ends."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.grant_type: str | None = None
        self.client: AuthenticatedClient | None = None

    def freeze(self, request: Request) -> RecordedRequest:
        return RecordedRequest(
            path=request.url.path,
            grant_type=self.grant_type,
            fields=dict(self.fields),
            client_id=self.client.client.client_id if self.client else None,
            headers=dict(request.headers),
            auth_method=self.client.method if self.client else None,
        )


def _fault_response(fault: Fault, *, now: float, request: Request) -> Response:
    if fault.kind == "reset":
        return _ResetConnection()
    if fault.kind == "hang":
        return _Hang(request)
    if fault.kind == "malformed":
        # Cut off mid-object, as a proxy or a crashed worker might leave it.
        return Response(b'{"access_token": "ey', status_code=200, media_type="application/json")
    headers = dict(NO_STORE)
    if fault.reset_in is not None:
        headers.update(
            {
                "x-ratelimit-limit": "30",
                "x-ratelimit-remaining": "0",
                "x-ratelimit-reset": str(int(now) + fault.reset_in),
            }
        )
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
    return error_response(OAuthError(fault.status, fault.error, fault.description, headers=headers))


class ConnectionReset(ConnectionResetError):
    """Raised by the emulator to drop a connection mid-answer.

    Under uvicorn the server closes the socket after a started response, so the client sees
    the peer hang up; in process (`httpx.ASGITransport`) the error itself reaches the client.
    """


class _ResetConnection(Response):
    """Start a response promising a body, then drop the connection."""

    def __init__(self) -> None:
        super().__init__(status_code=200, media_type="application/json", headers={"content-length": "512"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b'{"access_', "more_body": True})
        raise ConnectionReset("connection reset by the emulator (injected fault)")


class _Hang(Response):
    """Never answer; end only when the client gives up (so a served emulator can still shut down)."""

    def __init__(self, request: Request) -> None:
        super().__init__()
        self._receive = request.receive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            continue
