"""The emulator's own test API under /emulator/."""

from __future__ import annotations

import httpx

from server.emulator import EmulatorState
from server.emulator.device import DEVICE_CODE_GRANT
from tests.server.emulator.helpers import API, NATIVE_ID, USER, error_of


async def test_tokens_endpoint_mints_for_any_account_agent_and_scopes(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    response = await http.post(
        "/emulator/tokens",
        json={"sub": "auth0|bob", "scopes": ["read:market"], "azp": "agent-7", "expires_in": 60},
    )

    assert response.status_code == 200
    body = response.json()
    claims = state.verify_access_token(body["access_token"])
    assert (claims["sub"], claims["azp"], claims["scope"], claims["aud"]) == (
        "auth0|bob",
        "agent-7",
        "read:market",
        API,
    )
    assert claims["exp"] - claims["iat"] == 60
    assert body["expires_in"] == 60


async def test_tokens_endpoint_takes_an_explicit_audience(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    response = await http.post("/emulator/tokens", json={"sub": USER, "scopes": [], "audience": ["a", "b"]})

    assert state.verify_access_token(response.json()["access_token"])["aud"] == ["a", "b"]


async def test_tokens_endpoint_rejects_bad_bodies(http: httpx.AsyncClient) -> None:
    missing_sub = await http.post("/emulator/tokens", json={"scopes": []})
    bad_scopes = await http.post("/emulator/tokens", json={"sub": "x", "scopes": "read:market"})
    not_json = await http.post("/emulator/tokens", content=b"nope")

    for response in (missing_sub, bad_scopes, not_json):
        assert error_of(response) == (400, "invalid_request")
    assert "sub" in missing_sub.json()["error_description"]


async def test_accounts_endpoint_connects_an_account_for_a_new_user(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    response = await http.post(
        "/emulator/accounts", json={"sub": "auth0|bob", "connection": "stripe", "scopes": ["read_only"]}
    )

    assert response.status_code == 200
    account = state.connected_account("auth0|bob", "stripe")
    assert account is not None and account.scopes == ("read_only",)


async def test_device_endpoints_approve_and_deny(http: httpx.AsyncClient) -> None:
    async def start() -> dict[str, str]:
        return (await http.post("/oauth/device/code", data={"client_id": NATIVE_ID, "audience": API})).json()

    approved, denied = await start(), await start()
    approve = await http.post(
        "/emulator/device/approve", json={"user_code": approved["user_code"], "sub": USER}
    )
    deny = await http.post("/emulator/device/deny", json={"user_code": denied["user_code"]})
    unknown = await http.post("/emulator/device/deny", json={"user_code": "ZZZZ-ZZZZ"})

    async def poll(code: str) -> httpx.Response:
        fields = {"grant_type": DEVICE_CODE_GRANT, "device_code": code, "client_id": NATIVE_ID}
        return await http.post("/oauth/token", data=fields)

    assert approve.status_code == deny.status_code == 200
    assert error_of(unknown) == (404, "not_found")
    assert (await poll(approved["device_code"])).status_code == 200
    assert error_of(await poll(denied["device_code"])) == (403, "access_denied")
