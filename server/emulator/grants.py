"""The grants `/oauth/token` serves, by `grant_type`, and the two simple ones: client credentials
and refresh token. The device-code, CIBA and Token Vault grants live in `device.py`, `ciba.py`
and `vault.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from server.emulator.ciba import CIBA_GRANT, poll_ciba_grant
from server.emulator.code_grant import AUTHORIZATION_CODE_GRANT, redeem_code
from server.emulator.device import DEVICE_CODE_GRANT, poll_device_grant
from server.emulator.errors import OAuthError, unauthorized_client
from server.emulator.state import Client, EmulatorState
from server.emulator.tokens import audience_of, join_scope, required, split_scope, user_token_response
from server.emulator.vault import TOKEN_VAULT_GRANT, exchange

Grant = Callable[[EmulatorState, Mapping[str, str], Client], dict[str, Any]]


def client_credentials(state: EmulatorState, fields: Mapping[str, str], client: Client) -> dict[str, Any]:
    """A machine-to-machine token with every scope of the API: Auth0 ignores a narrower `scope`.

    Raises OAuthError: 403 `unauthorized_client` (native client), 403 `access_denied` (audience).
    """
    if client.native:
        raise unauthorized_client("client_credentials")
    audience = audience_of(state, fields)
    scopes = list(state.apis[audience].scopes)
    token = state.mint_access_token(
        f"{client.client_id}@clients",
        audience=audience,
        scopes=scopes,
        azp=client.client_id,
        expires_in=state.access_token_expires_in,
        permissions=scopes,
        extra_claims={"gty": "client-credentials"},
    )
    return {
        "access_token": token,
        "expires_in": state.access_token_expires_in,
        "token_type": "Bearer",
        "scope": join_scope(scopes),
    }


def refresh_token(state: EmulatorState, fields: Mapping[str, str], client: Client) -> dict[str, Any]:
    """A new access token from a refresh token issued to this very client (no rotation).

    An optional `scope` narrows the token to a subset of the refresh token's scopes.
    Raises OAuthError: 403 `invalid_grant` (unknown or foreign token), 403 `invalid_scope`.
    """
    grant = state.refresh_tokens.get(required(fields, "refresh_token"))
    if grant is None or grant.client_id != client.client_id:
        raise OAuthError(403, "invalid_grant", "Unknown or invalid refresh token.")
    scopes = list(grant.scopes)
    if fields.get("scope"):
        requested = split_scope(fields["scope"])
        beyond = [scope for scope in requested if scope not in grant.scopes]
        if beyond:
            raise OAuthError(
                403, "invalid_scope", f"Scopes not granted to the refresh token: {join_scope(beyond)}"
            )
        scopes = requested
    return user_token_response(
        state, sub=grant.sub, client_id=client.client_id, scopes=scopes, audience=grant.audience
    )


def revoke_refresh_token(state: EmulatorState, fields: Mapping[str, str], client: Client) -> None:
    """`POST /oauth/revoke`: forget a refresh token issued to this client.

    Like Auth0 (and RFC 7009), an unknown token is not an error. Raises OAuthError 400
    `invalid_request` without a token, 403 `invalid_grant` for another client's token.
    """
    grant = state.refresh_tokens.get(required(fields, "token"))
    if grant is None:
        return
    if grant.client_id != client.client_id:
        raise OAuthError(403, "invalid_grant", "The refresh token was issued to another client.")
    del state.refresh_tokens[grant.token]


GRANTS: dict[str, Grant] = {
    AUTHORIZATION_CODE_GRANT: redeem_code,
    "client_credentials": client_credentials,
    "refresh_token": refresh_token,
    DEVICE_CODE_GRANT: poll_device_grant,
    CIBA_GRANT: poll_ciba_grant,
    TOKEN_VAULT_GRANT: exchange,
}
