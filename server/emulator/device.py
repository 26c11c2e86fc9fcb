"""The device authorization flow (RFC 8628 as Auth0 runs it): native clients only.

The user's side (entering the code in a browser) is `EmulatorState.approve_device` /
`deny_device`, or the admin endpoints. A poll sooner than `interval` seconds after the
previous poll (or after the code was issued) gets `slow_down`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from server.emulator.errors import OAuthError, unauthorized, unauthorized_client
from server.emulator.state import OFFLINE_ACCESS, Client, DeviceGrant, EmulatorState
from server.emulator.tokens import OIDC_SCOPES, audience_of, split_scope, user_token_response

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Auth0's user codes avoid vowels (no accidental words) and look-alike digits.
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"


def start_device_authorization(state: EmulatorState, fields: Mapping[str, str]) -> dict[str, Any]:
    """The 200 body of `POST /oauth/device/code`.

    Raises OAuthError: 401 for an unknown client, 403 `unauthorized_client` for a
    confidential one, 403 `access_denied` for a missing or unknown audience.
    """
    client = state.clients.get(fields.get("client_id", ""))
    if client is None:
        raise unauthorized()
    if not client.native:
        raise unauthorized_client(DEVICE_CODE_GRANT)
    audience = audience_of(state, fields)
    # Auth0 drops scopes the API does not define rather than failing.
    allowed = OIDC_SCOPES | set(state.apis[audience].scopes)
    scopes = tuple(scope for scope in split_scope(fields.get("scope")) if scope in allowed)
    now = state.clock()
    grant = DeviceGrant(
        device_code=secrets.token_urlsafe(32),
        user_code=_new_user_code(state),
        client_id=client.client_id,
        scopes=scopes,
        audience=audience,
        expires_at=now + state.device_expires_in,
        interval=state.device_interval,
        last_poll=now,
    )
    state.devices[grant.device_code] = grant
    if state.auto_approve_sub is not None:
        state.approve_device(grant.user_code, state.auto_approve_sub)
    verification_uri = state.issuer + "activate"
    return {
        "device_code": grant.device_code,
        "user_code": grant.user_code,
        "verification_uri": verification_uri,
        "verification_uri_complete": f"{verification_uri}?user_code={grant.user_code}",
        "expires_in": state.device_expires_in,
        "interval": grant.interval,
    }


def poll_device_grant(state: EmulatorState, fields: Mapping[str, str], client: Client) -> dict[str, Any]:
    """The token answer to a device-code poll.

    Raises OAuthError: 403 `invalid_grant` (unknown, foreign or used code), 403
    `expired_token`, 403 `access_denied` (the user said no), 429 `slow_down`, 403
    `authorization_pending`.
    """
    if not client.native:
        raise unauthorized_client(DEVICE_CODE_GRANT)
    grant = state.devices.get(fields.get("device_code", ""))
    if grant is None or grant.client_id != client.client_id or grant.status == "consumed":
        raise OAuthError(403, "invalid_grant", "Invalid or expired device code.")
    now = state.clock()
    if now >= grant.expires_at:
        raise OAuthError(403, "expired_token", "The device code has expired.")
    if grant.status == "denied":
        raise OAuthError(403, "access_denied", "User cancelled the confirmation prompt or consent page.")
    if grant.status == "approved" and grant.sub is not None:
        grant.status = "consumed"
        return _approved_response(state, grant, grant.sub)
    too_fast = now - grant.last_poll < grant.interval
    grant.last_poll = now
    if too_fast:
        message = f"You are polling faster than the specified interval of {grant.interval} seconds."
        raise OAuthError(429, "slow_down", message)
    raise OAuthError(403, "authorization_pending", "User has yet to authorize device code.")


def _approved_response(state: EmulatorState, grant: DeviceGrant, sub: str) -> dict[str, Any]:
    body = user_token_response(
        state, sub=sub, client_id=grant.client_id, scopes=grant.scopes, audience=grant.audience
    )
    if OFFLINE_ACCESS in grant.scopes:
        scopes = list(grant.scopes)
        body["refresh_token"] = state.issue_refresh_token(sub, grant.client_id, scopes, grant.audience)
    return body


def _new_user_code(state: EmulatorState) -> str:
    taken = {grant.user_code for grant in state.devices.values()}
    while True:
        letters = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
        code = f"{letters[:4]}-{letters[4:]}"
        if code not in taken:
            return code
