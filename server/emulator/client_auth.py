"""Client authentication at the token endpoint: secret in the body (client_secret_post), HTTP Basic
(client_secret_basic), a signed assertion (private_key_jwt), or client_id alone for native clients.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

from server.emulator.errors import OAuthError, invalid_request, unauthorized
from server.emulator.keys import InvalidJWT, unverified_claims, verify_client_assertion
from server.emulator.state import AuthMethod, Client, EmulatorState

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True)
class AuthenticatedClient:
    """The client a request proved to be, and how."""

    client: Client
    method: AuthMethod


def authenticate_client(
    state: EmulatorState, fields: Mapping[str, str], headers: Mapping[str, str]
) -> AuthenticatedClient:
    """The client behind a token-endpoint request.

    Raises OAuthError: 400 when several methods are mixed, 401 `access_denied` when the
    client is unknown or its proof is wrong or missing.
    """
    basic = _basic_credentials(headers.get("authorization", ""))
    assertion = fields.get("client_assertion")
    used = [basic is not None, "client_secret" in fields, assertion is not None]
    if sum(used) > 1:
        raise invalid_request("Use only one client authentication method.")

    if assertion is not None:
        return _authenticate_assertion(state, fields, assertion)
    if basic is not None:
        client_id, secret = basic
        if fields.get("client_id", client_id) != client_id:
            raise unauthorized()
        return _authenticate_secret(state, client_id, secret, "client_secret_basic")
    body_client_id = fields.get("client_id")
    if not body_client_id:
        raise unauthorized()
    if "client_secret" in fields:
        return _authenticate_secret(state, body_client_id, fields["client_secret"], "client_secret_post")
    client = _known_client(state, body_client_id)
    if not client.native:
        raise unauthorized()
    return AuthenticatedClient(client, "none")


def _known_client(state: EmulatorState, client_id: str) -> Client:
    client = state.clients.get(client_id)
    if client is None:
        raise unauthorized()
    return client


def _authenticate_secret(
    state: EmulatorState, client_id: str, secret: str, method: AuthMethod
) -> AuthenticatedClient:
    client = _known_client(state, client_id)
    if client.native:
        # Public clients have no secret to present; Auth0 lets them through on client_id alone.
        return AuthenticatedClient(client, "none")
    if client.secret is None or not hmac.compare_digest(client.secret.encode(), secret.encode()):
        raise unauthorized()
    return AuthenticatedClient(client, method)


def _authenticate_assertion(
    state: EmulatorState, fields: Mapping[str, str], assertion: str
) -> AuthenticatedClient:
    if fields.get("client_assertion_type") != JWT_BEARER:
        raise invalid_request(f"client_assertion_type must be {JWT_BEARER}")
    try:
        claimed = unverified_claims(assertion).get("iss")
    except InvalidJWT as exc:
        raise unauthorized() from exc
    if not isinstance(claimed, str) or fields.get("client_id", claimed) != claimed:
        raise unauthorized()
    client = _known_client(state, claimed)
    if client.public_key_pem is None:
        raise unauthorized()
    try:
        claims = verify_client_assertion(
            assertion,
            client.public_key_pem,
            client_id=client.client_id,
            # Auth0 documents the tenant base URL; the token endpoint is also accepted by RFC 7523.
            audiences=[state.issuer, state.issuer + "oauth/token"],
            now=int(state.clock()),
        )
    except InvalidJWT as exc:
        raise unauthorized() from exc
    replay_key = (client.client_id, str(claims["jti"]))
    if replay_key in state.used_assertions:
        raise OAuthError(401, "access_denied", "The client assertion was already used (jti).")
    state.used_assertions.add(replay_key)
    return AuthenticatedClient(client, "private_key_jwt")


def _basic_credentials(authorization: str) -> tuple[str, str] | None:
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise invalid_request("Malformed Basic authorization header.") from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise invalid_request("Malformed Basic authorization header.")
    # RFC 6749 §2.3.1: both parts are form-encoded before base64.
    return unquote_plus(client_id), unquote_plus(secret)
