"""The demo tenant: one API, one confidential client allowed Token Vault, one native login client,
and a demo user with connected GitHub, Stripe and Google accounts and a refresh token.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from urllib.parse import urlsplit

from joserfc.jwk import RSAKey

from server.emulator.state import OFFLINE_ACCESS, EmulatorState

DEMO_AUDIENCE = "https://token-vault-mcp/api"
DEMO_SCOPES = ["read:market", "read:balance", "buy:quota", "request:token", "call:api"]
DEMO_ACCOUNT = "auth0|demo-user"
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
    issuer: str, *, clock: Callable[[], float] = time.time, signing_key: RSAKey | Future[RSAKey] | None = None
) -> DemoTenant:
    """A fresh demo tenant at `issuer` (a new signing key, unless given, and client secret each call)."""
    state = EmulatorState(issuer, clock=clock, signing_key=signing_key)
    state.add_api(DEMO_AUDIENCE, DEMO_SCOPES)
    client_secret = secrets.token_urlsafe(32)
    state.add_client(DEMO_CLIENT_ID, client_secret)
    state.add_client(DEMO_LOGIN_CLIENT_ID, native=True)
    state.add_user(DEMO_ACCOUNT)
    for connection, scopes in DEMO_CONNECTIONS.items():
        state.connect_account(DEMO_ACCOUNT, connection, scopes)
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
