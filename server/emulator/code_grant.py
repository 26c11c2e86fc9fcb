"""`grant_type=authorization_code` at `/oauth/token`: Auth0's code exchange with PKCE.

A code is redeemed once, before it expires (`state.code_expires_in`), by the client it was issued
to, with the same `redirect_uri` and a `code_verifier` whose S256 hash is the `code_challenge`.
Client authentication is Auth0's: a public (native) client by `client_id` alone, a confidential one
with its secret or assertion. The answer: an access token for the requested audience (an API, with
the user's permissions; or the My Account API, `https://{domain}/me/`, with its `…:me:…` scopes;
or, with no audience, only for `/userinfo`), an `id_token` when `openid` was asked, and a refresh
token for `offline_access` at an API.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from server.emulator.errors import OAuthError
from server.emulator.state import OFFLINE_ACCESS, AuthorizationCode, Client, EmulatorState
from server.emulator.tokens import join_scope, required

AUTHORIZATION_CODE_GRANT = "authorization_code"


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of `verifier` (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii", errors="replace")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def pkce_matches(verifier: str, challenge: str) -> bool:
    """Whether `verifier` (43..128 characters) hashes to `challenge`."""
    return 43 <= len(verifier) <= 128 and hmac.compare_digest(s256(verifier), challenge)


def redeem_code(state: EmulatorState, fields: Mapping[str, str], client: Client) -> dict[str, Any]:
    """The 200 body of an authorization-code exchange.

    Raises OAuthError: 400 `invalid_request` (missing parameter), 403 `invalid_grant` (unknown,
    used, expired or another client's code, redirect_uri mismatch, PKCE failure). A failed attempt
    burns the code, as a code seen by an attacker must not stay usable.
    """
    presented = required(fields, "code")
    redirect_uri = required(fields, "redirect_uri")
    verifier = required(fields, "code_verifier")
    code = state.codes.pop(presented, None)
    if code is None or code.client_id != client.client_id or state.clock() >= code.expires_at:
        raise OAuthError(403, "invalid_grant", "Invalid authorization code")
    if redirect_uri != code.redirect_uri:
        raise OAuthError(403, "invalid_grant", "Unauthorized redirect_uri")
    if not pkce_matches(verifier, code.code_challenge):
        raise OAuthError(403, "invalid_grant", "Failed to verify code verifier")
    return _tokens(state, code)


def _tokens(state: EmulatorState, code: AuthorizationCode) -> dict[str, Any]:
    access_scopes = [scope for scope in code.scopes if scope != OFFLINE_ACCESS]
    userinfo = state.issuer + "userinfo"
    permissions: list[str] | None = None
    audience: str | list[str]
    if code.audience is None:
        audience = userinfo
    else:
        audience = [code.audience, userinfo] if "openid" in code.scopes else code.audience
        if code.audience in state.apis:
            permissions = list(state.user_permissions(code.sub, code.audience))
    token = state.mint_access_token(
        code.sub,
        audience=audience,
        scopes=access_scopes,
        azp=code.client_id,
        expires_in=state.access_token_expires_in,
        permissions=permissions,
    )
    body: dict[str, Any] = {
        "access_token": token,
        "expires_in": state.access_token_expires_in,
        "token_type": "Bearer",
        "scope": join_scope(access_scopes),
    }
    if "openid" in code.scopes:
        body["id_token"] = id_token(state, code)
    if OFFLINE_ACCESS in code.scopes and code.audience in state.apis:
        body["refresh_token"] = state.issue_refresh_token(
            code.sub, code.client_id, list(code.scopes), str(code.audience)
        )
    return body


def id_token(state: EmulatorState, code: AuthorizationCode) -> str:
    """An OIDC ID token for the code's user, for the client (`aud`), with the request's `nonce`."""
    now = int(state.clock())
    claims: dict[str, Any] = {
        "iss": state.issuer,
        "sub": code.sub,
        "aud": code.client_id,
        "iat": now,
        "exp": now + 36000,  # Auth0's default ID token lifetime (10 hours)
    }
    if code.nonce is not None:
        claims["nonce"] = code.nonce
    if code.sub in state.user_names:
        claims["name"] = state.user_names[code.sub]
    return state.keys.sign(claims)
