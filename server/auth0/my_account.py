"""Auth0's My Account API, Connected Accounts (SPEC §10): start a connection, then complete it.

Both calls go through the one Auth0 client (server/auth0/client.py: retries, deadlines, the transport the
tests swap for the emulator) with the user's own access token for `https://{domain}/me/`. Written here
rather than taken from auth0-server-python (see the README: its MyAccountClient opens its own HTTP client
per call, so it would bypass that seam and its deadlines, and it assumes https on the tenant's domain).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from server.auth0.client import Auth0Client, Auth0Error

CONNECT_PATH = "/me/v1/connected-accounts/connect"
COMPLETE_PATH = "/me/v1/connected-accounts/complete"
CONNECT_SCOPE = "openid create:me:connected_accounts"


def my_account_audience(auth0: Auth0Client) -> str:
    """The My Account API's audience: the tenant's base URL + `/me/` (with the trailing slash)."""
    return auth0.base_url + "/me/"


@dataclass(frozen=True)
class ConnectStarted:
    """Auth0's answer to `connect`: where the browser goes next, and the session `complete` needs."""

    auth_session: str = field(repr=False)
    connect_uri: str
    ticket: str = field(repr=False)
    expires_in: int

    @property
    def browser_url(self) -> str:
        """`connect_uri?ticket=…`: the provider's consent, by way of Auth0."""
        joiner = "&" if "?" in self.connect_uri else "?"
        return f"{self.connect_uri}{joiner}{urlencode({'ticket': self.ticket})}"


@dataclass(frozen=True)
class ConnectedAccount:
    """Auth0's answer to `complete`: the connected account (`cac_…`)."""

    id: str
    connection: str
    scopes: tuple[str, ...]


async def start_connect(
    auth0: Auth0Client, access_token: str, *, connection: str, redirect_uri: str, state: str, scopes: list[str],
    code_challenge: str,
) -> ConnectStarted:
    """`POST /me/v1/connected-accounts/connect`. Raises Auth0Error (also for an answer without its fields)."""
    body: dict[str, Any] = {
        "connection": connection, "redirect_uri": redirect_uri, "state": state, "scopes": scopes,
        "code_challenge": code_challenge, "code_challenge_method": "S256",
    }
    data = await auth0.call_api("POST", CONNECT_PATH, body, access_token)
    try:
        params = data["connect_params"]
        return ConnectStarted(
            auth_session=str(data["auth_session"]), connect_uri=str(data["connect_uri"]),
            ticket=str(params["ticket"]), expires_in=int(data.get("expires_in", 300)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Auth0Error("Auth0 sent a connect answer without the expected fields", status=201) from exc


async def complete_connect(
    auth0: Auth0Client, access_token: str, *, auth_session: str, connect_code: str, redirect_uri: str,
    code_verifier: str,
) -> ConnectedAccount:
    """`POST /me/v1/connected-accounts/complete`. Raises Auth0Error."""
    body = {
        "auth_session": auth_session, "connect_code": connect_code, "redirect_uri": redirect_uri,
        "code_verifier": code_verifier,
    }
    data = await auth0.call_api("POST", COMPLETE_PATH, body, access_token)
    try:
        scopes = data.get("scopes") or []
        return ConnectedAccount(
            id=str(data["id"]), connection=str(data["connection"]), scopes=tuple(str(s) for s in scopes)
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Auth0Error("Auth0 sent a complete answer without the expected fields", status=201) from exc
