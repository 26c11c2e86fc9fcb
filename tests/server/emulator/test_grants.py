"""The client-credentials and refresh-token grants."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from server.emulator import EmulatorState
from tests.server.emulator.helpers import (
    API,
    API_SCOPES,
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    NATIVE_ID,
    OTHER_CLIENT_ID,
    OTHER_SECRET,
    USER,
    error_of,
)

USER_SCOPES = ["read:market", "request:token", "offline_access"]


def claims_of(state: EmulatorState, token: str) -> dict[str, Any]:
    return state.verify_access_token(token)


@pytest.fixture
def refresh_token(state: EmulatorState) -> str:
    return state.issue_refresh_token(USER, CLIENT_ID, USER_SCOPES, API)


async def test_client_credentials_gives_every_api_scope_even_when_fewer_are_asked(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    response = await http.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "audience": API, "scope": "read:market"},
        auth=(CLIENT_ID, CLIENT_SECRET),
    )

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == state.access_token_expires_in
    assert body["scope"].split() == API_SCOPES
    claims = claims_of(state, body["access_token"])
    assert claims["sub"] == f"{CLIENT_ID}@clients"
    assert claims["azp"] == CLIENT_ID
    assert claims["aud"] == API
    assert claims["scope"].split() == API_SCOPES
    assert response.headers["cache-control"] == "no-store"


async def test_client_credentials_needs_a_known_audience(http: httpx.AsyncClient) -> None:
    missing = await http.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=(CLIENT_ID, CLIENT_SECRET)
    )
    unknown = await http.post(
        "/oauth/token",
        data={"grant_type": "client_credentials", "audience": "https://nope/"},
        auth=(CLIENT_ID, CLIENT_SECRET),
    )

    assert error_of(missing) == (403, "access_denied")
    assert error_of(unknown) == (403, "access_denied")
    assert "Service not found" in unknown.json()["error_description"]


async def test_refresh_grant_with_form_body_gives_a_user_token_without_offline_access(
    http: httpx.AsyncClient, state: EmulatorState, refresh_token: str
) -> None:
    response = await http.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )

    assert response.status_code == 200
    body = response.json()
    assert body["scope"] == "read:market request:token"
    assert body["token_type"] == "Bearer"
    assert "refresh_token" not in body  # no rotation
    claims = claims_of(state, body["access_token"])
    assert claims["iss"] == ISSUER
    assert claims["sub"] == USER
    assert claims["aud"] == [API, ISSUER + "userinfo"]
    assert claims["azp"] == CLIENT_ID
    assert claims["scope"] == "read:market request:token"
    assert claims["permissions"] == ["read:market", "request:token"]
    assert claims["exp"] - claims["iat"] == body["expires_in"]


async def test_refresh_grant_with_json_body_and_secret_in_body(
    http: httpx.AsyncClient, state: EmulatorState, refresh_token: str
) -> None:
    response = await http.post(
        "/oauth/token",
        json={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )

    assert response.status_code == 200
    assert state.requests[-1].fields["refresh_token"] == refresh_token
    assert state.requests[-1].auth_method == "client_secret_post"


async def test_refresh_grant_with_json_body_and_basic_auth(
    http: httpx.AsyncClient, state: EmulatorState, refresh_token: str
) -> None:
    response = await http.post(
        "/oauth/token",
        json={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=(CLIENT_ID, CLIENT_SECRET),
    )

    assert response.status_code == 200
    assert claims_of(state, response.json()["access_token"])["sub"] == USER


async def test_refresh_grant_with_wrong_secret_is_401(http: httpx.AsyncClient, refresh_token: str) -> None:
    response = await http.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=(CLIENT_ID, "wrong"),
    )

    assert error_of(response) == (401, "access_denied")


async def test_refresh_token_of_another_client_or_unknown_is_403_invalid_grant(
    http: httpx.AsyncClient, refresh_token: str
) -> None:
    foreign = await http.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=(OTHER_CLIENT_ID, OTHER_SECRET),
    )
    unknown = await http.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": "v1.made-up"},
        auth=(CLIENT_ID, CLIENT_SECRET),
    )

    assert error_of(foreign) == (403, "invalid_grant")
    assert foreign.json()["error_description"] == "Unknown or invalid refresh token."
    assert error_of(unknown) == (403, "invalid_grant")


async def test_native_client_refreshes_with_client_id_only(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    token = state.issue_refresh_token(USER, NATIVE_ID, USER_SCOPES, API)

    response = await http.post(
        "/oauth/token", data={"grant_type": "refresh_token", "refresh_token": token, "client_id": NATIVE_ID}
    )

    assert response.status_code == 200
    assert claims_of(state, response.json()["access_token"])["azp"] == NATIVE_ID


async def test_refresh_grant_scope_narrows_but_cannot_widen(
    http: httpx.AsyncClient, state: EmulatorState, refresh_token: str
) -> None:
    async def refresh(scope: str) -> httpx.Response:
        return await http.post(
            "/oauth/token",
            data={"grant_type": "refresh_token", "refresh_token": refresh_token, "scope": scope},
            auth=(CLIENT_ID, CLIENT_SECRET),
        )

    narrowed = await refresh("read:market")
    widened = await refresh("read:market buy:quota")

    assert narrowed.json()["scope"] == "read:market"
    assert error_of(widened) == (403, "invalid_scope")


async def test_refresh_grant_without_refresh_token_is_invalid_request(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/oauth/token", data={"grant_type": "refresh_token"}, auth=(CLIENT_ID, CLIENT_SECRET)
    )

    assert error_of(response) == (400, "invalid_request")


def test_refresh_tokens_are_only_issued_for_known_parties(state: EmulatorState) -> None:
    with pytest.raises(ValueError, match="user"):
        state.issue_refresh_token("auth0|nobody", CLIENT_ID, [], API)
    with pytest.raises(ValueError, match="client"):
        state.issue_refresh_token(USER, "ghost", [], API)
    with pytest.raises(ValueError, match="audience"):
        state.issue_refresh_token(USER, CLIENT_ID, [], "https://nope/")
