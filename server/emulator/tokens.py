"""Pieces shared by the grants: required parameters, scope strings, and the user token answer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from server.emulator.errors import OAuthError, invalid_request
from server.emulator.state import OFFLINE_ACCESS, EmulatorState

# Scopes Auth0 grants on top of an API's own (OIDC and refresh tokens).
OIDC_SCOPES = frozenset({"openid", "profile", "email", OFFLINE_ACCESS})


def required(fields: Mapping[str, str], name: str) -> str:
    """The non-empty parameter `name`. Raises OAuthError 400 `invalid_request`."""
    value = fields.get(name, "")
    if not value:
        raise invalid_request(f"Missing required parameter: {name}")
    return value


def split_scope(value: str | None) -> list[str]:
    """A space-separated scope string as a list, order kept, duplicates dropped."""
    return list(dict.fromkeys((value or "").split()))


def join_scope(scopes: Iterable[str]) -> str:
    """A scope list as Auth0 writes it: space separated."""
    return " ".join(scopes)


def audience_of(state: EmulatorState, fields: Mapping[str, str]) -> str:
    """The registered API named by `audience`.

    Raises OAuthError 403 `access_denied`: missing (the emulated tenant has no default
    audience, as a fresh Auth0 tenant) or unknown.
    """
    audience = fields.get("audience", "")
    if not audience:
        raise OAuthError(
            403,
            "access_denied",
            "No audience parameter was provided, and no default audience has been configured",
        )
    if audience not in state.apis:
        raise OAuthError(403, "access_denied", f"Service not found: {audience}")
    return audience


def user_token_response(
    state: EmulatorState, *, sub: str, client_id: str, scopes: Iterable[str], audience: str
) -> dict[str, Any]:
    """The 200 body of a user grant (refresh token, device code): a JWT for `audience` whose
    `scope` is `scopes` minus offline_access and whose `permissions` are the API's scopes among them.
    """
    access_scopes = [scope for scope in scopes if scope != OFFLINE_ACCESS]
    api_scopes = state.apis[audience].scopes
    token = state.mint_access_token(
        sub,
        audience=[audience, state.issuer + "userinfo"],
        scopes=access_scopes,
        azp=client_id,
        expires_in=state.access_token_expires_in,
        permissions=[scope for scope in access_scopes if scope in api_scopes],
    )
    return {
        "access_token": token,
        "expires_in": state.access_token_expires_in,
        "token_type": "Bearer",
        "scope": join_scope(access_scopes),
    }
