"""`GET /authorize` and its sign-in page: Auth0's authorization endpoint with Universal Login, for the
authorization code flow with PKCE (OAuth 2.1: `S256` only).

As Auth0 does, an unknown `client_id` or a `redirect_uri` that is not one of the client's Allowed
Callback URLs gets an error page (the redirect cannot be trusted); every other problem goes back to
`redirect_uri?error=…&error_description=…&state=…`. A loopback client (`Client.loopback_callbacks`)
may use `http://127.0.0.1|localhost|[::1]` with any port. The person signs in by picking or typing a
user of the tenant (POST `/authorize/login`); `state.auto_login_sub` signs that user in at once (302
without a page), as a tenant with a live session would. Scopes Auth0 would not grant are dropped:
for an API, those beyond the user's permissions; for the My Account API (`https://{domain}/me/`),
those beyond the client's grant.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from server.emulator.bodies import read_fields
from server.emulator.errors import OAuthError
from server.emulator.pages import error_page, page
from server.emulator.state import AuthorizationCode, Client, EmulatorState, PendingLogin
from server.emulator.tokens import OIDC_SCOPES, split_scope

LOGIN_PATH = "/authorize/login"
LOGIN_EXPIRES_IN = 600  # seconds a sign-in page stays usable
MAX_PARAM = 2048
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class _Untrusted(Exception):
    """The redirect cannot be trusted: answer with an error page."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def authorize_routes(state: EmulatorState) -> list[Route]:
    """`GET /authorize` and `POST /authorize/login`, bound to `state`."""

    async def authorize(request: Request) -> Response:
        params = request.query_params
        if any(len(value) > MAX_PARAM for value in params.values()):
            return error_page(state.issuer, "invalid_request", "A parameter is too long.")
        try:
            client, redirect_uri = _trusted_redirect(state, params.get("client_id", ""), params.get("redirect_uri", ""))
        except _Untrusted as exc:
            return error_page(state.issuer, exc.error, exc.description)
        given_state = params.get("state")
        try:
            login = _pending_login(state, client, redirect_uri, dict(params))
        except OAuthError as error:
            return error_redirect(redirect_uri, error.error, error.description, given_state)
        if state.auto_login_sub is not None:
            return _signed_in(state, login, state.auto_login_sub)
        if params.get("prompt") == "none":
            return error_redirect(redirect_uri, "login_required", "Login required", given_state)
        state.pending_logins[login.txn] = login
        return _sign_in_page(state, login)

    async def sign_in(request: Request) -> Response:
        try:
            fields = await read_fields(request)
        except OAuthError as error:
            return error_page(state.issuer, error.error, error.description)
        login = state.pending_logins.get(fields.get("txn", ""))
        if login is None or state.clock() >= login.expires_at:
            return error_page(state.issuer, "invalid_request", "This sign-in page has expired; start again.")
        sub = fields.get("sub", "").strip()
        if sub not in state.users:
            return _sign_in_page(state, login, error="Wrong user id.", status=400)
        del state.pending_logins[login.txn]
        return _signed_in(state, login, sub)

    return [
        Route("/authorize", authorize, methods=["GET"]),
        Route(LOGIN_PATH, sign_in, methods=["POST"]),
    ]


def error_redirect(redirect_uri: str, error: str, description: str, state: str | None) -> Response:
    """302 to a trusted `redirect_uri` with an OAuth error (and the client's `state`, echoed)."""
    values = {"error": error, "error_description": description}
    if state is not None:
        values["state"] = state
    return redirect_with(redirect_uri, values)


def trusted_callback(client: Client, redirect_uri: str) -> bool:
    """Whether `redirect_uri` is one of the client's Allowed Callback URLs (or, for a loopback client, any
    port on a loopback host over http)."""
    if redirect_uri in client.callbacks:
        return True
    if not client.loopback_callbacks:
        return False
    try:
        parts = urlsplit(redirect_uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    return (
        parts.scheme == "http"
        and parts.hostname in _LOOPBACK_HOSTS
        and "@" not in parts.netloc
        and not parts.fragment
    )


def _trusted_redirect(state: EmulatorState, client_id: str, redirect_uri: str) -> tuple[Client, str]:
    client = state.clients.get(client_id)
    if client is None:
        raise _Untrusted("invalid_request", f"Unknown client: {client_id}")
    if not redirect_uri:
        raise _Untrusted("invalid_request", "Missing required parameter: redirect_uri")
    if not trusted_callback(client, redirect_uri):
        raise _Untrusted(
            "invalid_request",
            f"Callback URL mismatch. {redirect_uri} is not in the list of allowed callback URLs of the application.",
        )
    return client, redirect_uri


def _pending_login(state: EmulatorState, client: Client, redirect_uri: str, params: dict[str, str]) -> PendingLogin:
    """The validated request. Raises OAuthError (sent back to the client)."""
    response_type = params.get("response_type", "")
    if response_type != "code":
        raise OAuthError(400, "unsupported_response_type", f"Unsupported response type: {response_type}")
    if params.get("response_mode", "query") != "query":
        raise OAuthError(400, "invalid_request", "Only response_mode=query is supported.")
    challenge = params.get("code_challenge", "")
    if not challenge:
        raise OAuthError(400, "invalid_request", "Missing required parameter: code_challenge")
    if params.get("code_challenge_method") != "S256":
        raise OAuthError(400, "invalid_request", "code_challenge_method must be S256")
    if not 43 <= len(challenge) <= 128:
        raise OAuthError(400, "invalid_request", "code_challenge must be 43 to 128 characters")
    audience = params.get("audience") or None
    if audience is not None and audience != state.my_account_audience and audience not in state.apis:
        raise OAuthError(403, "access_denied", f"Service not found: {audience}")
    if audience == state.my_account_audience and not client.my_account_scopes:
        raise OAuthError(
            403,
            "access_denied",
            f'Client "{client.client_id}" is not authorized to access "{audience}". '
            'You need to create a "client-grant" associated to this API.',
        )
    return PendingLogin(
        txn=secrets.token_urlsafe(24),
        client_id=client.client_id,
        redirect_uri=redirect_uri,
        scopes=tuple(split_scope(params.get("scope"))),
        audience=audience,
        state=params.get("state"),
        code_challenge=challenge,
        nonce=params.get("nonce"),
        expires_at=state.clock() + LOGIN_EXPIRES_IN,
    )


def _granted_scopes(state: EmulatorState, login: PendingLogin, sub: str) -> tuple[str, ...]:
    """What Auth0 grants of the requested scopes: OIDC ones, and those the user (API) or client (My Account)
    may have."""
    if login.audience == state.my_account_audience:
        allowed: tuple[str, ...] = state.clients[login.client_id].my_account_scopes
    elif login.audience is not None:
        allowed = state.user_permissions(sub, login.audience)
    else:
        allowed = ()
    return tuple(scope for scope in login.scopes if scope in OIDC_SCOPES or scope in allowed)


def _signed_in(state: EmulatorState, login: PendingLogin, sub: str) -> Response:
    code = AuthorizationCode(
        code=secrets.token_urlsafe(32),
        client_id=login.client_id,
        redirect_uri=login.redirect_uri,
        sub=sub,
        scopes=_granted_scopes(state, login, sub),
        audience=login.audience,
        code_challenge=login.code_challenge,
        expires_at=state.clock() + state.code_expires_in,
        nonce=login.nonce,
    )
    state.codes[code.code] = code
    values = {"code": code.code}
    if login.state is not None:
        values["state"] = login.state
    return redirect_with(login.redirect_uri, values)


def _sign_in_page(
    state: EmulatorState, login: PendingLogin, *, error: str | None = None, status: int = 200
) -> Response:
    users = [{"sub": sub, "name": state.user_names.get(sub, sub)} for sub in sorted(state.users)]
    return page(
        "sign_in.html",
        status=status,
        form_target=login.redirect_uri,
        title="Sign in",
        tenant=state.issuer,
        client_id=login.client_id,
        users=users,
        txn=login.txn,
        action=LOGIN_PATH,
        error=error,
    )


def redirect_with(uri: str, values: dict[str, str]) -> Response:
    """302 to `uri` with `values` added to its query."""
    separator = "&" if urlsplit(uri).query else "?"
    return RedirectResponse(uri + separator + urlencode(values), status_code=302, headers={"Cache-Control": "no-store"})
