"""Client-Initiated Backchannel Authentication (OpenID CIBA, poll mode) as Auth0 runs it.

`POST /bc-authorize` asks a user (named by an `iss_sub` login hint) to approve on their
device; the client then polls `/oauth/token` with the CIBA grant. The user's side is
`state.ciba_mode` (approve at once, or after `state.ciba_approve_after` seconds; deny at
once; or `manual`: pending until `state.approve_ciba` / `deny_ciba` or the test API).
Like Auth0, an expired request answers `access_denied` (not `expired_token`), and a poll
sooner than `interval` seconds after the previous one (or after the request) is
`slow_down`, which grows the interval by 5 seconds and sends the new one.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from typing import Any

from server.emulator.errors import OAuthError, invalid_request, unauthorized_client
from server.emulator.state import CibaGrant, Client, EmulatorState
from server.emulator.tokens import OIDC_SCOPES, audience_of, required, split_scope, user_token_response

CIBA_GRANT = "urn:openid:params:grant-type:ciba"
DEFAULT_EXPIRY = 300
MAX_EXPIRY = 259_200  # Auth0's limit (3 days; beyond 300 s it notifies by email)
MAX_DETAILS = 5
SLOW_DOWN_STEP = 5
_BINDING_MESSAGE = re.compile(r"[A-Za-z0-9 +\-_.,:#]{1,64}")


def start_backchannel_authorization(
    state: EmulatorState, fields: Mapping[str, str], client: Client
) -> dict[str, Any]:
    """The 200 body of `POST /bc-authorize` for an authenticated `client`.

    Raises OAuthError: 403 `unauthorized_client` (a native client), 400 `invalid_request`
    (scope without openid, a login hint not naming a known user of this tenant, a missing or
    malformed binding message, requested expiry or authorization details), 403
    `access_denied` (unknown audience).
    """
    if client.native:
        raise unauthorized_client(CIBA_GRANT)
    scopes = split_scope(required(fields, "scope"))
    if "openid" not in scopes:
        raise invalid_request("scope must include openid")
    sub = _login_hint_sub(state, required(fields, "login_hint"))
    message = fields.get("binding_message", "")
    if not _BINDING_MESSAGE.fullmatch(message):
        raise invalid_request(
            "binding_message is required: at most 64 characters of letters, digits, spaces and +-_.,:#"
        )
    expiry = _requested_expiry(fields.get("requested_expiry"))
    details = _authorization_details(fields.get("authorization_details"))
    audience = _audience(state, fields)
    allowed = OIDC_SCOPES | set(state.apis[audience].scopes)  # like Auth0, drop scopes the API lacks
    now = state.clock()
    grant = CibaGrant(
        auth_req_id=secrets.token_urlsafe(24),
        client_id=client.client_id,
        sub=sub,
        scopes=tuple(scope for scope in scopes if scope in allowed),
        audience=audience,
        binding_message=message,
        authorization_details=details,
        expires_at=now + expiry,
        interval=state.ciba_interval,
        last_poll=now,
    )
    if state.ciba_mode == "approve":
        grant.approve_at = now + (state.ciba_approve_after or 0)
        grant.settle(now)
    elif state.ciba_mode == "deny":
        grant.status = "denied"
    state.ciba_requests[grant.auth_req_id] = grant
    return {"auth_req_id": grant.auth_req_id, "expires_in": expiry, "interval": grant.interval}


def poll_ciba_grant(state: EmulatorState, fields: Mapping[str, str], client: Client) -> dict[str, Any]:
    """The token answer to a CIBA poll.

    Raises OAuthError (all 400 but the first): 403 `unauthorized_client` (native client),
    `invalid_grant` (unknown, foreign or already used auth_req_id), `access_denied` (denied
    or expired), `slow_down` (with the new `interval`), `authorization_pending`.
    """
    if client.native:
        raise unauthorized_client(CIBA_GRANT)
    grant = state.ciba_requests.get(required(fields, "auth_req_id"))
    if grant is None or grant.client_id != client.client_id or grant.status == "consumed":
        raise OAuthError(400, "invalid_grant", "Invalid or already used auth_req_id.")
    now = state.clock()
    grant.settle(now)
    if now >= grant.expires_at:
        raise OAuthError(400, "access_denied", "The authorization request has expired.")
    if grant.status == "denied":
        raise OAuthError(400, "access_denied", "The end-user denied the authorization request.")
    if grant.status == "approved":
        grant.status = "consumed"
        return _approved_response(state, grant, now)
    too_fast = now - grant.last_poll < grant.interval
    grant.last_poll = now
    if too_fast:
        grant.interval += SLOW_DOWN_STEP
        message = f"You are polling faster than allowed. Try again in {grant.interval} seconds."
        raise OAuthError(400, "slow_down", message, extra={"interval": grant.interval})
    raise OAuthError(400, "authorization_pending", "The end-user authorization is pending.")


def _approved_response(state: EmulatorState, grant: CibaGrant, now: float) -> dict[str, Any]:
    body = user_token_response(
        state, sub=grant.sub, client_id=grant.client_id, scopes=grant.scopes, audience=grant.audience
    )
    issued = int(now)
    body["id_token"] = state.keys.sign(
        {
            "iss": state.issuer,
            "sub": grant.sub,
            "aud": grant.client_id,
            "iat": issued,
            "exp": issued + 36000,
            "auth_time": issued,
        }
    )
    if grant.authorization_details is not None:
        body["authorization_details"] = grant.authorization_details
    return body


def _login_hint_sub(state: EmulatorState, hint: str) -> str:
    """The user an `iss_sub` login hint names. Raises OAuthError 400 `invalid_request`."""
    try:
        parsed = json.loads(hint)
    except ValueError:
        parsed = None
    if (
        not isinstance(parsed, dict)
        or parsed.get("format") != "iss_sub"
        or parsed.get("iss") != state.issuer
        or not isinstance(parsed.get("sub"), str)
    ):
        raise invalid_request(f'login_hint must be {{"format":"iss_sub","iss":"{state.issuer}","sub":"..."}}')
    if parsed["sub"] not in state.users:
        raise invalid_request("The login_hint does not name a user of this tenant.")
    return str(parsed["sub"])


def _requested_expiry(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_EXPIRY
    try:
        expiry = int(value)
    except ValueError:
        expiry = 0
    if not 1 <= expiry <= MAX_EXPIRY:
        raise invalid_request(f"requested_expiry must be a whole number of seconds from 1 to {MAX_EXPIRY}")
    return expiry


def _authorization_details(value: str | None) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    try:
        details = json.loads(value)
    except ValueError:
        details = None
    if (
        not isinstance(details, list)
        or len(details) > MAX_DETAILS
        or not all(isinstance(item, dict) and isinstance(item.get("type"), str) and item["type"] for item in details)
    ):
        raise invalid_request(
            f"authorization_details must be a JSON array of at most {MAX_DETAILS} objects, each with a type"
        )
    return details


def _audience(state: EmulatorState, fields: Mapping[str, str]) -> str:
    if fields.get("audience"):
        return audience_of(state, fields)
    try:
        return state.default_audience
    except LookupError:
        raise invalid_request("The tenant has no API; send an audience.") from None
