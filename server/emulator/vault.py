"""Token Vault: exchange a user's refresh or access token for a provider access token of one of
the user's connected accounts (Auth0's federated-connection token exchange).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from server.emulator.errors import OAuthError, invalid_request, unauthorized_client
from server.emulator.keys import InvalidJWT
from server.emulator.state import Client, EmulatorState, VaultIssue
from server.emulator.tokens import join_scope, required, split_scope

TOKEN_VAULT_GRANT = "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token"
FEDERATED_TOKEN_TYPE = "http://auth0.com/oauth/token-type/federated-connection-access-token"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
NOT_CONNECTED = "federated_connection_refresh_token_not_found"

# Provider-looking prefixes make tokens recognisable in test failures (and by secret scanners).
_TOKEN_PREFIXES = {"github": "gho_", "google-oauth2": "ya29.", "stripe": "rk_test_"}


def exchange(state: EmulatorState, fields: Mapping[str, str], client: Client) -> dict[str, Any]:
    """The 200 body of a Token Vault exchange.

    Raises OAuthError: 400 `invalid_request` (missing or wrong parameter), 403
    `unauthorized_client` (a native client), 401 `invalid_grant` (bad subject token), 401
    `federated_connection_refresh_token_not_found` (no live connected account), 403
    `access_denied` (scopes beyond what the account granted).
    """
    requested_type = required(fields, "requested_token_type")
    if requested_type != FEDERATED_TOKEN_TYPE:
        raise invalid_request(f"requested_token_type must be {FEDERATED_TOKEN_TYPE}")
    subject_token = required(fields, "subject_token")
    subject_type = required(fields, "subject_token_type")
    connection = required(fields, "connection")
    if client.native:
        raise unauthorized_client(TOKEN_VAULT_GRANT)
    sub = _subject(state, subject_token, subject_type, client)

    account = state.connected_account(sub, connection)
    if account is None:
        raise OAuthError(401, NOT_CONNECTED, "Federated connection Refresh Token not found.")
    requested = split_scope(fields.get("scope"))
    missing = [scope for scope in requested if scope not in account.scopes]
    if missing:
        message = f"The connected account at {connection} did not grant the scopes: {join_scope(missing)}"
        raise OAuthError(403, "access_denied", message)
    granted = account.scopes if state.overgrant or not requested else tuple(requested)

    access_token = _TOKEN_PREFIXES.get(connection, "tv_") + secrets.token_urlsafe(30)
    expires_at = state.clock() + state.vault_token_expires_in
    state.record_vault_issue(VaultIssue(access_token, sub, connection, granted, client.client_id, expires_at))
    body: dict[str, Any] = {
        "access_token": access_token,
        "expires_in": state.vault_token_expires_in,
        "issued_token_type": FEDERATED_TOKEN_TYPE,
        "token_type": "Bearer",
    }
    if not state.omit_scope_in_exchange:
        body["scope"] = join_scope(granted)
    return body


def _subject(state: EmulatorState, token: str, token_type: str, client: Client) -> str:
    """The user a subject token stands for. Raises OAuthError 400 or 401 `invalid_grant`."""
    if token_type == REFRESH_TOKEN_TYPE:
        grant = state.refresh_tokens.get(token)
        # A refresh token only works for the client it was issued to.
        if grant is None or grant.client_id != client.client_id:
            raise OAuthError(401, "invalid_grant", "Invalid refresh token.")
        return grant.sub
    if token_type == ACCESS_TOKEN_TYPE:
        try:
            claims = state.verify_access_token(token)
        except InvalidJWT as exc:
            raise OAuthError(401, "invalid_grant", "Invalid access token.") from exc
        audiences = claims.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences or []
        # The subject token must have been issued for one of this tenant's APIs.
        if not any(audience in state.apis for audience in audiences):
            raise OAuthError(401, "invalid_grant", "The access token is not for an API of this tenant.")
        return str(claims["sub"])
    raise invalid_request(f"Unsupported subject_token_type: {token_type}")
