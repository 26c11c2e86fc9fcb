"""Verification of Auth0 access tokens (SPEC §3): RS256 only, JWKS cached, exact issuer.

Used for the stdio identity and, wrapped as the SDK's `TokenVerifier`, for remote mode.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from server.auth0.client import Auth0Client, Auth0Error

log = logging.getLogger(__name__)

LEEWAY = 60
JWKS_REFRESH_INTERVAL = 30.0  # an unknown kid refetches the JWKS at most this often
# A token whose signature verified is remembered this long (by its SHA-256, never the token itself), so
# an agent's every request does not pay the RSA check again; its claims are still checked every time.
VERIFIED_FOR = 300.0
VERIFIED_MAX = 4096


class InvalidToken(Exception):
    """The token was refused; the message says why (never the token itself).

    `claims` is set when the signature verified but a claim did not (e.g. expired), so the
    refusal can still name the account and agent in the audit log.
    """

    def __init__(self, message: str, claims: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.claims = claims


class JwtVerifier:
    """Checks signature, issuer, audience and times of an Auth0 access token."""

    def __init__(
        self, auth0: Auth0Client, audience: str, clock: Callable[[], float] = time.time, leeway: int = LEEWAY
    ) -> None:
        self._auth0 = auth0
        self.issuer = auth0.issuer
        self.audience = audience
        self._clock = clock
        self._leeway = leeway
        self._keys: KeySet | None = None
        self._last_refresh = float("-inf")  # the last refetch an unknown kid caused
        self._verified: dict[bytes, tuple[float, dict[str, Any]]] = {}  # sha256(token) → (verified at, claims)

    async def verify(self, token: str) -> dict[str, Any]:
        """Return the verified claims. Raises InvalidToken."""
        digest = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(digest)
        if known is not None and self._clock() - known[0] < VERIFIED_FOR:
            claims = known[1]
            try:
                self._check_claims(claims)  # expiry moves on; the signature does not
            except InvalidToken as exc:
                raise InvalidToken(str(exc), claims) from None
            return dict(claims)
        claims = await self._verify_signed(token)
        if len(self._verified) >= VERIFIED_MAX:
            self._verified.clear()
        self._verified[digest] = (self._clock(), claims)
        return dict(claims)

    async def _verify_signed(self, token: str) -> dict[str, Any]:
        header = _header(token)
        if header.get("alg") != "RS256":
            raise InvalidToken(f"signing algorithm {header.get('alg')!r} is not accepted (RS256 only)")
        kid = header.get("kid")
        keys = await self._keyset()
        if not _has_kid(keys, kid):
            keys = await self._keyset(refresh=True)
            if not _has_kid(keys, kid):
                raise InvalidToken("the token was signed with a key the tenant does not publish")
        try:
            decoded = jwt.decode(token, keys, algorithms=["RS256"])
        except (JoseError, ValueError, TypeError) as exc:
            raise InvalidToken("the token's signature does not verify") from exc
        claims = decoded.claims
        try:
            self._check_claims(claims)
        except InvalidToken as exc:
            raise InvalidToken(str(exc), claims) from None
        return claims

    def _check_claims(self, claims: dict[str, Any]) -> None:
        if claims.get("iss") != self.issuer:
            raise InvalidToken("the token was issued by another tenant (iss)")
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if self.audience not in audiences:
            raise InvalidToken("the token is not meant for this server (aud)")
        now = self._clock()
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise InvalidToken("the token has no expiry (exp)")
        if now > exp + self._leeway:
            raise InvalidToken("the token has expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not isinstance(nbf, int | float) or now + self._leeway < nbf):
            raise InvalidToken("the token is not valid yet (nbf)")
        iat = claims.get("iat")
        if iat is not None and (not isinstance(iat, int | float) or now + self._leeway < iat):
            raise InvalidToken("the token claims to be issued in the future (iat)")

    async def _keyset(self, refresh: bool = False) -> KeySet:
        if self._keys is not None and not refresh:
            return self._keys
        if refresh and self._keys is not None:
            if self._clock() - self._last_refresh < JWKS_REFRESH_INTERVAL:
                return self._keys  # do not let unknown kids hammer the tenant
            self._last_refresh = self._clock()
        try:
            data = await self._auth0.jwks(refresh=self._keys is not None)
        except Auth0Error as exc:
            if self._keys is not None:
                return self._keys
            raise InvalidToken("the tenant's signing keys could not be fetched") from exc
        try:
            rsa_keys = [k for k in data.get("keys", []) if isinstance(k, dict) and k.get("kty") == "RSA"]
            self._keys = KeySet.import_key_set({"keys": rsa_keys})
        except (JoseError, ValueError, TypeError) as exc:
            log.warning("the tenant's JWKS could not be read: %s", type(exc).__name__)
            raise InvalidToken("the tenant's signing keys could not be read") from exc
        return self._keys


def _header(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise InvalidToken("the token is not a signed JWT")
    try:
        raw = base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4))
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidToken("the token's header cannot be read") from exc
    if not isinstance(header, dict):
        raise InvalidToken("the token's header cannot be read")
    return header


def _has_kid(keys: KeySet, kid: object) -> bool:
    if not isinstance(kid, str):
        return len(keys.keys) == 1
    return any(k.kid == kid for k in keys.keys)
