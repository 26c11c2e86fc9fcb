"""The demo tenant: one API, one confidential client allowed Token Vault, one native login client,
and a demo user with connected GitHub, Stripe and Google accounts and a refresh token.

For Connected Accounts (SPEC §10): both clients may sign users in at `/authorize` with loopback
redirects (`http://127.0.0.1:<any port>/…`) and hold the My Account API scopes, and the demo user
starts with no Slack account (`DEMO_CONNECT_CONNECTION`): Token Vault answers 401 for it until the
user connects it through the My Account API. The demo user (the operator too) has every
permission of the API, `manage:broker` included.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from urllib.parse import urlsplit

from joserfc.jwk import RSAKey

from server.emulator.state import MY_ACCOUNT_SCOPES, OFFLINE_ACCESS, EmulatorState

DEMO_AUDIENCE = "https://token-vault-mcp/api"
DEMO_SCOPES = ["read:market", "read:balance", "buy:quota", "request:token", "call:api"]
DEMO_ACCOUNT = "auth0|demo-user"
DEMO_ACCOUNT_NAME = "Demo User"
MANAGE_BROKER = "manage:broker"  # the operator console's permission (SPEC §11)
DEMO_CLIENT_ID = "token-vault-mcp-demo"
DEMO_LOGIN_CLIENT_ID = "token-vault-mcp-login"
DEMO_CONNECTIONS: dict[str, list[str]] = {
    "github": ["repo:read", "repo:write", "read:user"],
    "stripe": ["read_only", "read_write"],
    "google-oauth2": [
        "https://www.googleapis.com/auth/calendar.readonly",
        "https://www.googleapis.com/auth/gmail.readonly",
    ],
}
# A connection the demo user has not connected yet: the whole connect flow can be tried on it.
DEMO_CONNECT_CONNECTION = "slack"
DEMO_CONNECT_SCOPES = ["channels:read", "chat:write"]


@dataclass(frozen=True)
class DemoTenant:
    """A ready tenant and the settings a broker needs to use it."""

    state: EmulatorState
    domain: str  # an AUTH0_DOMAIN value: the host for https, the full URL for loopback http
    issuer: str  # the base URL with a trailing slash
    audience: str
    client_id: str
    client_secret: str
    refresh_token: str  # the demo user's, issued to `client_id`
    account: str  # the demo user's sub
    login_client_id: str  # a native client for the device flow (`login`)


def demo_tenant(
    issuer: str,
    *,
    clock: Callable[[], float] = time.time,
    signing_key: RSAKey | Future[RSAKey] | None = None,
    auto_login: str | None = None,
) -> DemoTenant:
    """A fresh demo tenant at `issuer` (a new signing key, unless given, and client secret each call).

    `auto_login` (a user's sub, e.g. DEMO_ACCOUNT) signs that user in at `/authorize` at once, with no
    sign-in page. Raises ValueError for an unknown user.
    """
    state = EmulatorState(issuer, clock=clock, signing_key=signing_key)
    state.add_api(DEMO_AUDIENCE, [*DEMO_SCOPES, MANAGE_BROKER])
    client_secret = secrets.token_urlsafe(32)
    state.add_client(DEMO_CLIENT_ID, client_secret, loopback_callbacks=True, my_account_scopes=MY_ACCOUNT_SCOPES)
    state.add_client(DEMO_LOGIN_CLIENT_ID, native=True, loopback_callbacks=True, my_account_scopes=MY_ACCOUNT_SCOPES)
    state.add_user(DEMO_ACCOUNT, name=DEMO_ACCOUNT_NAME)
    state.set_permissions(DEMO_ACCOUNT, DEMO_AUDIENCE, [*DEMO_SCOPES, MANAGE_BROKER])
    for connection, scopes in DEMO_CONNECTIONS.items():
        state.connect_account(DEMO_ACCOUNT, connection, scopes)
    state.add_connection(DEMO_CONNECT_CONNECTION, DEMO_CONNECT_SCOPES)
    if auto_login is not None:
        if auto_login not in state.users:
            raise ValueError(f"--auto-login: unknown user {auto_login!r} (the demo user is {DEMO_ACCOUNT})")
        state.auto_login_sub = auto_login
    refresh_token = state.issue_refresh_token(
        DEMO_ACCOUNT, DEMO_CLIENT_ID, [*DEMO_SCOPES, OFFLINE_ACCESS], DEMO_AUDIENCE
    )
    return DemoTenant(
        state=state,
        domain=auth0_domain(state.issuer),
        issuer=state.issuer,
        audience=DEMO_AUDIENCE,
        client_id=DEMO_CLIENT_ID,
        client_secret=client_secret,
        refresh_token=refresh_token,
        account=DEMO_ACCOUNT,
        login_client_id=DEMO_LOGIN_CLIENT_ID,
    )


def auth0_domain(issuer: str) -> str:
    """The AUTH0_DOMAIN value naming `issuer`: `tenant.example` for https, the URL without the
    trailing slash otherwise (plain http is only for a loopback emulator).
    """
    parts = urlsplit(issuer)
    if parts.scheme == "https":
        return parts.netloc + parts.path.rstrip("/")
    return issuer.rstrip("/")
