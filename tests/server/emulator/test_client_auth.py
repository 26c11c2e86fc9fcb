"""Client authentication: secret in the body, HTTP Basic, private_key_jwt, native client_id alone."""

from __future__ import annotations

import uuid

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from server.emulator import EmulatorState
from server.emulator.client_auth import JWT_BEARER
from tests.server.emulator.helpers import (
    API,
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    NATIVE_ID,
    FakeClock,
    error_of,
)

JWT_CLIENT = "jwt-client"


@pytest.fixture(scope="module")
def client_key() -> RSAKey:
    return RSAKey.generate_key(2048, private=True)


@pytest.fixture
def jwt_state(state: EmulatorState, client_key: RSAKey) -> EmulatorState:
    state.add_client(JWT_CLIENT, public_key_pem=client_key.as_pem(private=False).decode())
    return state


def assertion(key: RSAKey, now: float, *, aud: str = ISSUER, jti: str | None = None, ttl: int = 60) -> str:
    claims = {
        "iss": JWT_CLIENT,
        "sub": JWT_CLIENT,
        "aud": aud,
        "iat": int(now),
        "exp": int(now) + ttl,
        "jti": jti or str(uuid.uuid4()),
    }
    return jwt.encode({"alg": "RS256"}, claims, key)


def cc(**fields: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "audience": API, **fields}


async def test_secret_in_form_body_authenticates(http: httpx.AsyncClient, state: EmulatorState) -> None:
    response = await http.post("/oauth/token", data=cc(client_id=CLIENT_ID, client_secret=CLIENT_SECRET))

    assert response.status_code == 200
    assert state.requests[-1].client_id == CLIENT_ID
    assert state.requests[-1].auth_method == "client_secret_post"


async def test_secret_in_basic_header_authenticates(http: httpx.AsyncClient, state: EmulatorState) -> None:
    response = await http.post("/oauth/token", data=cc(), auth=(CLIENT_ID, CLIENT_SECRET))

    assert response.status_code == 200
    assert state.requests[-1].auth_method == "client_secret_basic"


async def test_wrong_secret_is_401_access_denied(http: httpx.AsyncClient, state: EmulatorState) -> None:
    in_body = await http.post("/oauth/token", data=cc(client_id=CLIENT_ID, client_secret="nope"))
    in_basic = await http.post("/oauth/token", data=cc(), auth=(CLIENT_ID, "nope"))

    assert error_of(in_body) == (401, "access_denied")
    assert error_of(in_basic) == (401, "access_denied")
    assert state.requests[-1].client_id is None


async def test_unknown_client_and_missing_secret_are_401(http: httpx.AsyncClient) -> None:
    unknown = await http.post("/oauth/token", data=cc(client_id="ghost", client_secret="x"))
    no_secret = await http.post("/oauth/token", data=cc(client_id=CLIENT_ID))
    nobody = await http.post("/oauth/token", data=cc())

    assert error_of(unknown) == (401, "access_denied")
    assert error_of(no_secret) == (401, "access_denied")
    assert error_of(nobody) == (401, "access_denied")


async def test_basic_and_body_secret_together_are_rejected(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/oauth/token",
        data=cc(client_id=CLIENT_ID, client_secret=CLIENT_SECRET),
        auth=(CLIENT_ID, CLIENT_SECRET),
    )

    assert error_of(response) == (400, "invalid_request")


async def test_private_key_jwt_with_the_registered_key_authenticates(
    http: httpx.AsyncClient, jwt_state: EmulatorState, client_key: RSAKey, clock: FakeClock
) -> None:
    response = await http.post(
        "/oauth/token",
        data=cc(client_assertion=assertion(client_key, clock()), client_assertion_type=JWT_BEARER),
    )

    assert response.status_code == 200, response.text
    assert jwt_state.requests[-1].client_id == JWT_CLIENT
    assert jwt_state.requests[-1].auth_method == "private_key_jwt"


async def test_private_key_jwt_signed_with_another_key_is_401(
    http: httpx.AsyncClient, jwt_state: EmulatorState, clock: FakeClock
) -> None:
    wrong_key = RSAKey.generate_key(2048, private=True)

    response = await http.post(
        "/oauth/token",
        data=cc(client_assertion=assertion(wrong_key, clock()), client_assertion_type=JWT_BEARER),
    )

    assert error_of(response) == (401, "access_denied")


async def test_private_key_jwt_expired_wrong_audience_or_replayed_is_401(
    http: httpx.AsyncClient, jwt_state: EmulatorState, client_key: RSAKey, clock: FakeClock
) -> None:
    async def send(token: str) -> httpx.Response:
        return await http.post(
            "/oauth/token", data=cc(client_assertion=token, client_assertion_type=JWT_BEARER)
        )

    expired = assertion(client_key, clock() - 3600)
    wrong_aud = assertion(client_key, clock(), aud="https://elsewhere.example/")
    first = await send(assertion(client_key, clock(), jti="once"))
    replay = await send(assertion(client_key, clock(), jti="once"))

    assert error_of(await send(expired)) == (401, "access_denied")
    assert error_of(await send(wrong_aud)) == (401, "access_denied")
    assert first.status_code == 200
    assert error_of(replay) == (401, "access_denied")


async def test_private_key_jwt_needs_the_jwt_bearer_assertion_type(
    http: httpx.AsyncClient, jwt_state: EmulatorState, client_key: RSAKey, clock: FakeClock
) -> None:
    response = await http.post(
        "/oauth/token", data=cc(client_assertion=assertion(client_key, clock()), client_assertion_type="x")
    )

    assert error_of(response) == (400, "invalid_request")


async def test_secret_client_cannot_use_an_assertion(
    http: httpx.AsyncClient, state: EmulatorState, client_key: RSAKey, clock: FakeClock
) -> None:
    claims = {"iss": CLIENT_ID, "sub": CLIENT_ID, "aud": ISSUER, "exp": int(clock()) + 60, "jti": "j"}
    token = jwt.encode({"alg": "RS256"}, claims, client_key)

    response = await http.post(
        "/oauth/token", data=cc(client_assertion=token, client_assertion_type=JWT_BEARER)
    )

    assert error_of(response) == (401, "access_denied")


async def test_native_client_authenticates_by_client_id_alone_but_gets_no_client_credentials(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    response = await http.post("/oauth/token", data=cc(client_id=NATIVE_ID))

    assert error_of(response) == (403, "unauthorized_client")
    assert state.requests[-1].client_id == NATIVE_ID
    assert state.requests[-1].auth_method == "none"


def test_client_registration_rejects_impossible_clients(state: EmulatorState) -> None:
    with pytest.raises(ValueError, match="native"):
        state.add_client("x", "secret", native=True)
    with pytest.raises(ValueError, match="confidential"):
        state.add_client("y")
