"""Token Vault: federated-connection token exchange with refresh- and access-token subjects."""

from __future__ import annotations

import httpx
import pytest

from server.emulator import EmulatorState
from server.emulator.vault import (
    ACCESS_TOKEN_TYPE,
    FEDERATED_TOKEN_TYPE,
    REFRESH_TOKEN_TYPE,
    TOKEN_VAULT_GRANT,
)
from tests.server.emulator.helpers import (
    API,
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    NATIVE_ID,
    OTHER_CLIENT_ID,
    OTHER_SECRET,
    USER,
    error_of,
)

GITHUB_SCOPES = "repo:read repo:write read:user"


@pytest.fixture
def refresh_token(state: EmulatorState) -> str:
    return state.issue_refresh_token(USER, CLIENT_ID, ["request:token", "offline_access"], API)


def exchange_fields(subject: str, subject_type: str = REFRESH_TOKEN_TYPE, **extra: str) -> dict[str, str]:
    return {
        "grant_type": TOKEN_VAULT_GRANT,
        "subject_token": subject,
        "subject_token_type": subject_type,
        "requested_token_type": FEDERATED_TOKEN_TYPE,
        "connection": "github",
        **extra,
    }


async def exchange(
    http: httpx.AsyncClient, fields: dict[str, str], auth: tuple[str, str] = (CLIENT_ID, CLIENT_SECRET)
) -> httpx.Response:
    return await http.post("/oauth/token", data=fields, auth=auth)


async def test_refresh_token_subject_gives_a_provider_token_with_the_requested_scope(
    http: httpx.AsyncClient, state: EmulatorState, refresh_token: str
) -> None:
    response = await exchange(http, exchange_fields(refresh_token, scope="repo:read", login_hint="alice"))

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"access_token", "expires_in", "scope", "issued_token_type", "token_type"}
    assert body["access_token"].startswith("gho_")
    assert body["expires_in"] == 3600
    assert body["scope"] == "repo:read"
    assert body["issued_token_type"] == FEDERATED_TOKEN_TYPE
    assert body["token_type"] == "Bearer"
    issued = state.vault_issues[-1]
    assert (issued.access_token, issued.sub, issued.connection, issued.scopes) == (
        body["access_token"],
        USER,
        "github",
        ("repo:read",),
    )
    assert state.requests[-1].fields["login_hint"] == "alice"


async def test_access_token_subject_works_like_the_refresh_token(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    subject = state.mint_access_token(
        USER, audience=[API, ISSUER + "userinfo"], scopes=["request:token"], azp="cli"
    )

    response = await exchange(http, exchange_fields(subject, ACCESS_TOKEN_TYPE, scope="repo:read read:user"))

    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "repo:read read:user"


async def test_without_scope_every_scope_of_the_account_comes_back(
    http: httpx.AsyncClient, refresh_token: str
) -> None:
    response = await exchange(http, exchange_fields(refresh_token))

    assert response.json()["scope"] == GITHUB_SCOPES


async def test_scope_beyond_the_connected_account_is_403_naming_the_scope(
    http: httpx.AsyncClient, refresh_token: str
) -> None:
    response = await exchange(http, exchange_fields(refresh_token, scope="repo:read admin:org"))

    assert error_of(response) == (403, "access_denied")
    assert "admin:org" in response.json()["error_description"]
    assert "repo:read" not in response.json()["error_description"].split(": ")[-1]


async def test_connection_the_user_never_connected_is_401_refresh_token_not_found(
    http: httpx.AsyncClient, refresh_token: str
) -> None:
    response = await exchange(http, exchange_fields(refresh_token, connection="stripe"))

    assert error_of(response) == (401, "federated_connection_refresh_token_not_found")
    assert response.json()["error_description"] == "Federated connection Refresh Token not found."


async def test_revoked_connection_is_401_refresh_token_not_found(
    http: httpx.AsyncClient, state: EmulatorState, refresh_token: str
) -> None:
    state.revoke_connection(USER, "github")

    response = await exchange(http, exchange_fields(refresh_token))

    assert error_of(response) == (401, "federated_connection_refresh_token_not_found")


async def test_missing_or_wrong_requested_token_type_is_invalid_request(
    http: httpx.AsyncClient, refresh_token: str
) -> None:
    missing = exchange_fields(refresh_token)
    del missing["requested_token_type"]
    wrong = exchange_fields(
        refresh_token, requested_token_type="urn:ietf:params:oauth:token-type:access_token"
    )

    assert error_of(await exchange(http, missing)) == (400, "invalid_request")
    assert error_of(await exchange(http, wrong)) == (400, "invalid_request")


@pytest.mark.parametrize("name", ["connection", "subject_token", "subject_token_type"])
async def test_missing_required_parameter_is_invalid_request(
    http: httpx.AsyncClient, refresh_token: str, name: str
) -> None:
    fields = exchange_fields(refresh_token)
    del fields[name]

    response = await exchange(http, fields)

    assert error_of(response) == (400, "invalid_request")
    assert name in response.json()["error_description"]


async def test_unsupported_subject_token_type_is_invalid_request(
    http: httpx.AsyncClient, refresh_token: str
) -> None:
    response = await exchange(
        http, exchange_fields(refresh_token, "urn:ietf:params:oauth:token-type:id_token")
    )

    assert error_of(response) == (400, "invalid_request")


async def test_refresh_token_of_another_client_is_401_invalid_grant(
    http: httpx.AsyncClient, refresh_token: str
) -> None:
    response = await exchange(http, exchange_fields(refresh_token), auth=(OTHER_CLIENT_ID, OTHER_SECRET))

    assert error_of(response) == (401, "invalid_grant")


async def test_bad_access_token_subjects_are_401_invalid_grant(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    expired = state.mint_access_token(USER, audience=API, scopes=[], expires_in=-10)
    foreign_audience = state.mint_access_token(USER, audience="https://elsewhere/", scopes=[])
    wrong_issuer = state.mint_access_token(
        USER, audience=API, scopes=[], extra_claims={"iss": "https://evil/"}
    )

    for subject in (expired, foreign_audience, wrong_issuer, "not-a-jwt"):
        response = await exchange(http, exchange_fields(subject, ACCESS_TOKEN_TYPE))
        assert error_of(response) == (401, "invalid_grant"), subject


async def test_native_clients_may_not_use_token_vault(http: httpx.AsyncClient, state: EmulatorState) -> None:
    token = state.issue_refresh_token(USER, NATIVE_ID, ["offline_access"], API)

    response = await http.post("/oauth/token", data={**exchange_fields(token), "client_id": NATIVE_ID})

    assert error_of(response) == (403, "unauthorized_client")


async def test_omit_scope_knob_answers_without_scope(
    http: httpx.AsyncClient, state: EmulatorState, refresh_token: str
) -> None:
    state.omit_scope_in_exchange = True

    body = (await exchange(http, exchange_fields(refresh_token, scope="repo:read"))).json()

    assert "scope" not in body
    assert body["access_token"]


async def test_overgrant_knob_answers_with_every_scope_of_the_account(
    http: httpx.AsyncClient, state: EmulatorState, refresh_token: str
) -> None:
    state.overgrant = True

    body = (await exchange(http, exchange_fields(refresh_token, scope="repo:read"))).json()

    assert body["scope"] == GITHUB_SCOPES


async def test_json_body_exchange_is_accepted(http: httpx.AsyncClient, refresh_token: str) -> None:
    response = await http.post(
        "/oauth/token",
        json={
            **exchange_fields(refresh_token, scope="repo:read"),
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    )

    assert response.status_code == 200


def test_revoking_an_unknown_connection_raises(state: EmulatorState) -> None:
    with pytest.raises(ValueError):
        state.revoke_connection(USER, "stripe")
    with pytest.raises(ValueError):
        state.connect_account("auth0|nobody", "github", [])
