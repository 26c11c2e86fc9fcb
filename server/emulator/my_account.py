"""Auth0's My Account API, Connected Accounts part (`/me/v1/connected-accounts/…`), and the provider
consent screen its `connect_uri` leads to.

- `POST …/connect` (scope `create:me:connected_accounts`): JSON `connection`, `redirect_uri`
  (one of the calling client's callbacks), `state`, `scopes[]`, `code_challenge`,
  `code_challenge_method` (`S256`), `authorization_params`; unknown fields are rejected →
  201 `{auth_session, connect_uri, connect_params: {ticket}, expires_in}`.
- `GET {connect_uri}?ticket=…` shows the provider's consent (Allow / Deny, POST); Allow → 302
  `redirect_uri?connect_code=…&state=…`, Deny → `redirect_uri?error=access_denied&error_description=…&state=…`.
- `POST …/complete` (same scope, same user): JSON `auth_session`, `connect_code`, `redirect_uri`,
  `code_verifier` (checked against the connect's challenge) → 201 `{id, connection, access_type,
  scopes, created_at, expires_at?}`; a second `complete` is 409. From then on Token Vault exchanges
  for that connection succeed with the scopes granted.
- `GET …/accounts?connection=&from=&take=` (`read:me:connected_accounts`) → `{accounts, next?}`;
  `DELETE …/accounts/{id}` (`delete:me:connected_accounts`) → 204, after which Token Vault answers
  401 again.

The bearer token must be an access token of this tenant for `https://{domain}/me/` (else 401) with
the endpoint's scope (else 403). Errors are `{type, status, title, detail, validation_errors?}` with
`content-type: application/json`, as Auth0's SDKs parse them.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.emulator.authorize import error_redirect, redirect_with, trusted_callback
from server.emulator.bodies import form_fields
from server.emulator.code_grant import pkce_matches
from server.emulator.errors import OAuthError
from server.emulator.keys import InvalidJWT
from server.emulator.pages import error_page, page
from server.emulator.state import ConnectedAccount, ConnectSession, EmulatorState

PREFIX = "/me/v1/connected-accounts"
CONSENT_PATH = "/connect"
DEFAULT_TAKE = 20
MAX_TAKE = 100
M = TypeVar("M", bound=BaseModel)
_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 409: "Conflict"}


class MyAccountError(Exception):
    """An error the My Account API answers with (RFC 7807-like, Auth0's shape)."""

    def __init__(self, status: int, detail: str, validation_errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.validation_errors = validation_errors

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {
            "type": f"https://auth0.com/api-errors/A0E-{self.status}-0001",
            "status": self.status,
            "title": _TITLES.get(self.status, "Error"),
            "detail": self.detail,
        }
        if self.validation_errors is not None:
            body["validation_errors"] = self.validation_errors
        return JSONResponse(body, status_code=self.status, headers={"Cache-Control": "no-store"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConnectBody(_Strict):
    connection: str = Field(min_length=1, max_length=128)
    redirect_uri: str = Field(min_length=1, max_length=2048)
    state: str | None = Field(default=None, max_length=2048)
    scopes: list[str] | None = Field(default=None, max_length=100)
    code_challenge: str | None = Field(default=None, min_length=43, max_length=128)
    code_challenge_method: Literal["S256"] | None = None
    authorization_params: dict[str, Any] | None = None


class CompleteBody(_Strict):
    auth_session: str = Field(min_length=1, max_length=64)
    connect_code: str = Field(min_length=1, max_length=46)
    redirect_uri: str = Field(min_length=1, max_length=2048)
    code_verifier: str | None = Field(default=None, min_length=43, max_length=128)


def my_account_routes(state: EmulatorState) -> list[Route]:
    """The Connected Accounts endpoints and the consent screen, bound to `state`."""

    async def connect(request: Request) -> Response:
        try:
            claims = _caller(state, request, "create:me:connected_accounts")
            body = _body(ConnectBody, await request.body())
            client = state.clients.get(str(claims.get("azp", "")))
            if client is None or not trusted_callback(client, body.redirect_uri):
                raise MyAccountError(400, "redirect_uri is not an allowed callback URL of the application")
            offered = state.connections.get(body.connection)
            if offered is None:
                raise MyAccountError(400, f"Connection {body.connection} is not enabled for Connected Accounts")
            unknown = [scope for scope in body.scopes or [] if scope not in offered]
            if unknown:
                errors = [{"detail": f"unknown scope {scope}", "field": "scopes"} for scope in unknown]
                raise MyAccountError(400, "Invalid request payload input", errors)
            if body.code_challenge_method is not None and body.code_challenge is None:
                raise MyAccountError(400, "code_challenge_method requires code_challenge")
        except MyAccountError as error:
            return error.response()
        session = ConnectSession(
            auth_session=secrets.token_urlsafe(32),
            ticket=secrets.token_urlsafe(32),
            sub=str(claims["sub"]),
            client_id=client.client_id,
            connection=body.connection,
            redirect_uri=body.redirect_uri,
            state=body.state,
            scopes=tuple(body.scopes) if body.scopes else offered,
            code_challenge=body.code_challenge,
            expires_at=state.clock() + state.connect_expires_in,
        )
        state.connect_sessions[session.auth_session] = session
        answer = {
            "auth_session": session.auth_session,
            "connect_uri": state.issuer.rstrip("/") + CONSENT_PATH,
            "connect_params": {"ticket": session.ticket},
            "expires_in": state.connect_expires_in,
        }
        return JSONResponse(answer, status_code=201, headers={"Cache-Control": "no-store"})

    async def complete(request: Request) -> Response:
        try:
            claims = _caller(state, request, "create:me:connected_accounts")
            body = _body(CompleteBody, await request.body())
            session = state.connect_sessions.get(body.auth_session)
            if session is None or session.sub != claims["sub"]:
                raise MyAccountError(404, "The connect session was not found")
            if session.status == "completed":
                raise MyAccountError(409, "The connect session was already completed")
            _check_completion(state, session, body)
        except MyAccountError as error:
            return error.response()
        expires_at = None
        if state.connected_account_lifetime is not None:
            expires_at = state.clock() + state.connected_account_lifetime
        account = state.connect_account(session.sub, session.connection, list(session.scopes), expires_at=expires_at)
        session.status = "completed"
        return JSONResponse(_account_json(account), status_code=201, headers={"Cache-Control": "no-store"})

    async def accounts(request: Request) -> Response:
        try:
            claims = _caller(state, request, "read:me:connected_accounts")
            connection = request.query_params.get("connection")
            start = _int_param(request.query_params.get("from"), "from", 0, 0, 1_000_000)
            take = _int_param(request.query_params.get("take"), "take", DEFAULT_TAKE, 1, MAX_TAKE)
        except MyAccountError as error:
            return error.response()
        mine = [
            account
            for account in state.accounts.get(str(claims["sub"]), {}).values()
            if connection is None or account.connection == connection
        ]
        page_of = mine[start : start + take]
        body: dict[str, Any] = {"accounts": [_account_json(account) for account in page_of]}
        if start + take < len(mine):
            body["next"] = str(start + take)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def delete(request: Request) -> Response:
        try:
            claims = _caller(state, request, "delete:me:connected_accounts")
            if not state.delete_connected_account(str(claims["sub"]), request.path_params["account_id"]):
                raise MyAccountError(404, "The connected account was not found")
        except MyAccountError as error:
            return error.response()
        return Response(status_code=204)

    async def consent(request: Request) -> Response:
        session = _pending_ticket(state, request.query_params.get("ticket", ""))
        if session is None:
            return error_page(state.issuer, "invalid_request", "This connect link is invalid or has expired.")
        return page(
            "consent.html",
            form_target=session.redirect_uri,
            title=f"Connect {session.connection}",
            tenant=state.issuer,
            user=state.user_names.get(session.sub, session.sub),
            connection=session.connection,
            scopes=list(session.scopes),
            ticket=session.ticket,
            action=CONSENT_PATH,
        )

    async def decide(request: Request) -> Response:
        try:
            fields = form_fields(await request.body())
        except OAuthError as error:
            return error_page(state.issuer, error.error, error.description)
        session = _pending_ticket(state, fields.get("ticket", ""))
        if session is None:
            return error_page(state.issuer, "invalid_request", "This connect link is invalid or has expired.")
        if fields.get("decision") != "approve":
            session.status = "denied"
            return error_redirect(session.redirect_uri, "access_denied", "The user denied access", session.state)
        session.status = "approved"
        session.connect_code = secrets.token_urlsafe(24)
        values = {"connect_code": session.connect_code}
        if session.state is not None:
            values["state"] = session.state
        return redirect_with(session.redirect_uri, values)

    return [
        Route(PREFIX + "/connect", connect, methods=["POST"]),
        Route(PREFIX + "/complete", complete, methods=["POST"]),
        Route(PREFIX + "/accounts", accounts, methods=["GET"]),
        Route(PREFIX + "/accounts/{account_id}", delete, methods=["DELETE"]),
        Route(CONSENT_PATH, consent, methods=["GET"]),
        Route(CONSENT_PATH, decide, methods=["POST"]),
    ]


def _caller(state: EmulatorState, request: Request, scope: str) -> dict[str, Any]:
    """The claims of the request's bearer token. Raises MyAccountError 401 (no valid token for the
    My Account API) or 403 (without `scope`)."""
    kind, _, token = request.headers.get("authorization", "").partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise MyAccountError(401, "Missing or invalid token.")
    try:
        claims = state.verify_access_token(token.strip())
    except InvalidJWT as exc:
        raise MyAccountError(401, "Invalid Token") from exc
    audiences = claims.get("aud")
    audiences = [audiences] if isinstance(audiences, str) else audiences or []
    if state.my_account_audience not in audiences:
        raise MyAccountError(401, "Invalid Token")
    if scope not in str(claims.get("scope", "")).split():
        raise MyAccountError(403, f"Insufficient scope; expected any of: {scope}.")
    return claims


def _body(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        errors = [
            {"detail": error["msg"], "field": ".".join(map(str, error["loc"])) or "body"} for error in exc.errors()
        ]
        raise MyAccountError(400, "Invalid request payload input", errors) from exc


def _check_completion(state: EmulatorState, session: ConnectSession, body: CompleteBody) -> None:
    if state.clock() >= session.expires_at:
        raise MyAccountError(400, "The connect session has expired")
    if session.status != "approved" or session.connect_code is None:
        raise MyAccountError(400, "The connect session was not authorized by the user")
    if not secrets.compare_digest(body.connect_code, session.connect_code):
        raise MyAccountError(400, "Invalid connect_code")
    if body.redirect_uri != session.redirect_uri:
        raise MyAccountError(400, "redirect_uri does not match the connect request")
    if session.code_challenge is not None and (
        body.code_verifier is None or not pkce_matches(body.code_verifier, session.code_challenge)
    ):
        raise MyAccountError(400, "Failed to verify code verifier")


def _pending_ticket(state: EmulatorState, ticket: str) -> ConnectSession | None:
    now = state.clock()
    for session in state.connect_sessions.values():
        if session.ticket == ticket and session.status == "pending" and now < session.expires_at:
            return session
    return None


def _int_param(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise MyAccountError(400, f"{name} must be an integer from {low} to {high}")
    return int(value)


def _account_json(account: ConnectedAccount) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": account.id,
        "connection": account.connection,
        "access_type": "offline",
        "scopes": list(account.scopes),
        "created_at": _iso(account.created_at),
    }
    if account.expires_at is not None:
        body["expires_at"] = _iso(account.expires_at)
    return body


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
