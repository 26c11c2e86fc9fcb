"""The tenant's RS256 signing keys, the JWTs they sign, and client assertions (private_key_jwt)."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
from collections.abc import Collection
from concurrent.futures import Future
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey
from joserfc.jwt import JWTClaimsRegistry

ALGORITHM = "RS256"
# Auth0 accepts these for private_key_jwt client assertions.
ASSERTION_ALGORITHMS = ("RS256", "RS384", "PS256")


class InvalidJWT(ValueError):
    """A JWT that is malformed, badly signed, expired or carries the wrong claims."""


def generate_signing_key(kid: str | None = None) -> RSAKey:
    """A fresh RSA-2048 key with `kid`, `use=sig` and `alg=RS256` set."""
    parameters: dict[str, Any] = {"kid": kid or secrets.token_urlsafe(16), "use": "sig", "alg": ALGORITHM}
    return RSAKey.generate_key(2048, parameters=parameters, private=True)  # type: ignore[arg-type]


def signing_key_in_background() -> Future[RSAKey]:
    """A signing key being generated on another thread (RSA key generation releases the GIL).

    The demo tenant starts with one, so the ~0.1 s of key generation overlaps the server's start-up
    instead of adding to it; the key is awaited when first used.
    """
    future: Future[RSAKey] = Future()

    def make() -> None:
        try:
            future.set_result(generate_signing_key())
        except BaseException as exc:  # pragma: no cover - surfaced when the key is first used
            future.set_exception(exc)

    # not a daemon: a start that fails at once (a bad TVM_MARKET_FILE) would otherwise exit while this
    # thread is inside the native key generation, and the process aborts (exit 134) instead of exiting 2
    threading.Thread(target=make, name="signing-key", daemon=False).start()
    return future


class SigningKeys:
    """The tenant's keys: the newest signs, all are published (Auth0 keeps old keys in its JWKS)."""

    def __init__(self, first: RSAKey | Future[RSAKey] | None = None) -> None:
        self._first: Future[RSAKey] | None = None
        self._later: list[RSAKey] = []
        if isinstance(first, Future):
            self._first = first
        else:
            self._later.append(first or generate_signing_key())

    @property
    def _keys(self) -> list[RSAKey]:
        if self._first is not None:  # the first key, generated in the background, is needed now
            self._later.insert(0, self._first.result())
            self._first = None
        return self._later

    @property
    def current_kid(self) -> str:
        """The `kid` of the key that signs new tokens."""
        return str(self._keys[-1].kid)

    def rotate(self, key: RSAKey | None = None) -> str:
        """Make a new key (or `key`) the signing key, keep the old ones published; return the new kid."""
        self._keys.append(key or generate_signing_key())  # (resolves a pending first key before)
        return self.current_kid

    def sign(self, claims: dict[str, Any], *, kid: str | None = None) -> str:
        """An RS256 JWT over `claims`; `kid` overrides the header (to test unknown-kid handling)."""
        header = {"alg": ALGORITHM, "typ": "JWT", "kid": kid or self.current_kid}
        return jwt.encode(header, claims, self._keys[-1], algorithms=[ALGORITHM])

    def public_jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The JWKS document: public parts only."""
        return {"keys": [dict(key.as_dict(private=False)) for key in self._keys]}

    def verify(self, token: str, registry: JWTClaimsRegistry) -> dict[str, Any]:
        """The claims of a JWT signed by one of these keys, validated by `registry`.

        Raises InvalidJWT.
        """
        key_set = KeySet.import_key_set(self.public_jwks())  # type: ignore[arg-type]
        return _decode(token, key_set, (ALGORITHM,), registry)


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, unchecked: only to find out who claims to have signed it.

    Raises InvalidJWT.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidJWT("not a compact JWS")
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise InvalidJWT("undecodable payload") from exc
    if not isinstance(payload, dict):
        raise InvalidJWT("payload is not an object")
    return payload


def verify_client_assertion(
    assertion: str,
    public_key_pem: str,
    *,
    client_id: str,
    audiences: Collection[str],
    now: int,
    leeway: int = 30,
) -> dict[str, Any]:
    """The claims of a private_key_jwt assertion: `iss`=`sub`=client_id, `aud` one of `audiences`,
    unexpired `exp`, a `jti`.

    Raises InvalidJWT.
    """
    try:
        key = RSAKey.import_key(public_key_pem)
    except (JoseError, ValueError) as exc:
        raise InvalidJWT("the registered public key is unusable") from exc
    registry = JWTClaimsRegistry(
        now=now,
        leeway=leeway,
        iss={"essential": True, "value": client_id},
        sub={"essential": True, "value": client_id},
        aud={"essential": True, "values": list(audiences)},
        exp={"essential": True},
        jti={"essential": True},
    )
    return _decode(assertion, key, ASSERTION_ALGORITHMS, registry)


def _decode(
    token: str,
    key: RSAKey | KeySet,
    algorithms: Collection[str],
    registry: JWTClaimsRegistry,
) -> dict[str, Any]:
    try:
        decoded = jwt.decode(token, key, algorithms=list(algorithms))
        registry.validate(decoded.claims)
    except (JoseError, ValueError) as exc:
        raise InvalidJWT(str(exc)) from exc
    return dict(decoded.claims)
