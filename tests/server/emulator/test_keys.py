"""Discovery, JWKS, and tokens that verify against the published keys."""

from __future__ import annotations

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, RSAKey
from joserfc.jwt import JWTClaimsRegistry

from server.emulator import EmulatorState
from tests.server.emulator.helpers import API, ISSUER, USER, FakeClock


async def _key_set(http: httpx.AsyncClient) -> KeySet:
    discovery = (await http.get("/.well-known/openid-configuration")).json()
    jwks = (await http.get(discovery["jwks_uri"])).json()
    return KeySet.import_key_set(jwks)


async def test_discovery_names_the_issuer_with_trailing_slash_and_the_endpoints(
    http: httpx.AsyncClient,
) -> None:
    response = await http.get("/.well-known/openid-configuration")

    assert response.status_code == 200
    doc = response.json()
    assert doc["issuer"] == ISSUER
    assert doc["jwks_uri"] == ISSUER + ".well-known/jwks.json"
    assert doc["token_endpoint"] == ISSUER + "oauth/token"
    assert doc["device_authorization_endpoint"] == ISSUER + "oauth/device/code"
    assert {
        "client_credentials",
        "refresh_token",
        "urn:ietf:params:oauth:grant-type:device_code",
        "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token",
    } <= set(doc["grant_types_supported"])
    assert set(doc["token_endpoint_auth_methods_supported"]) == {
        "client_secret_post",
        "client_secret_basic",
        "private_key_jwt",
    }
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]


async def test_jwks_publishes_only_public_rs256_signing_keys(http: httpx.AsyncClient) -> None:
    keys = (await http.get("/.well-known/jwks.json")).json()["keys"]

    assert len(keys) == 1
    assert keys[0]["kty"] == "RSA"
    assert keys[0]["use"] == "sig"
    assert keys[0]["alg"] == "RS256"
    assert keys[0]["kid"]
    assert keys[0]["n"] and keys[0]["e"] == "AQAB"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(keys[0])


async def test_minted_token_verifies_against_the_jwks_with_exact_issuer_and_audience(
    http: httpx.AsyncClient, state: EmulatorState, clock: FakeClock
) -> None:
    token = state.mint_access_token(
        USER, audience=API, scopes=["read:market"], azp="agent", permissions=["read:market"]
    )

    decoded = jwt.decode(token, await _key_set(http), algorithms=["RS256"])
    JWTClaimsRegistry(
        now=int(clock()),
        iss={"essential": True, "value": ISSUER},
        aud={"essential": True, "value": API},
        exp={"essential": True},
    ).validate(decoded.claims)
    assert decoded.header["alg"] == "RS256"
    assert decoded.header["kid"] == state.keys.current_kid
    assert decoded.claims["sub"] == USER
    assert decoded.claims["azp"] == "agent"
    assert decoded.claims["scope"] == "read:market"
    assert decoded.claims["permissions"] == ["read:market"]
    assert decoded.claims["exp"] - decoded.claims["iat"] == 3600


async def test_extra_claims_override_and_kid_override_reach_the_token(
    state: EmulatorState, signing_key: RSAKey
) -> None:
    token = state.mint_access_token(
        USER, audience=[API, "other"], scopes=[], kid="unknown-kid", extra_claims={"exp": 1, "org": "x"}
    )

    decoded = jwt.decode(token, signing_key, algorithms=["RS256"])
    assert decoded.header["kid"] == "unknown-kid"
    assert decoded.claims["exp"] == 1
    assert decoded.claims["org"] == "x"
    assert decoded.claims["aud"] == [API, "other"]
    assert "scope" not in decoded.claims
    assert "permissions" not in decoded.claims


async def test_rotated_key_signs_new_tokens_and_both_keys_stay_published(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    old_kid = state.keys.current_kid
    new_kid = state.rotate_signing_key()
    token = state.mint_access_token(USER, audience=API, scopes=["read:market"])

    key_set = await _key_set(http)
    assert {key.kid for key in key_set.keys} == {old_kid, new_kid}
    assert jwt.decode(token, key_set, algorithms=["RS256"]).header["kid"] == new_kid


async def test_token_from_another_tenant_does_not_verify(http: httpx.AsyncClient, clock: FakeClock) -> None:
    stranger = EmulatorState(ISSUER, clock=clock)  # same issuer, its own key
    token = stranger.mint_access_token(USER, audience=API, scopes=[], kid=None)
    key_set = await _key_set(http)

    with pytest.raises(JoseError):
        jwt.decode(token, key_set.keys[0], algorithms=["RS256"])


def test_issuer_gets_its_trailing_slash(clock: FakeClock, signing_key: RSAKey) -> None:
    assert EmulatorState("https://tenant.example", clock=clock, signing_key=signing_key).issuer == ISSUER


def test_a_key_made_in_the_background_signs_first_and_stays_published_after_rotation() -> None:
    from concurrent.futures import Future

    from server.emulator.keys import SigningKeys, generate_signing_key, signing_key_in_background

    pending = signing_key_in_background()
    keys = SigningKeys(pending)
    first_kid = keys.current_kid  # waits for the key
    assert first_kid == pending.result().kid
    second = keys.rotate()
    assert [k["kid"] for k in keys.public_jwks()["keys"]] == [first_kid, second]

    later: Future[RSAKey] = Future()
    rotated_first = SigningKeys(later)
    later.set_result(generate_signing_key("one"))
    rotated_first.rotate(generate_signing_key("two"))  # the pending key is put first, before the new one
    assert [k["kid"] for k in rotated_first.public_jwks()["keys"]] == ["one", "two"]
    assert rotated_first.current_kid == "two"
