"""The device authorization flow: code issuance, polling answers, approval and denial."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from server.emulator import EmulatorState
from server.emulator.device import DEVICE_CODE_GRANT
from tests.server.emulator.helpers import API, CLIENT_ID, ISSUER, NATIVE_ID, USER, FakeClock, error_of

SCOPE = "openid offline_access read:market read:balance buy:quota request:token"


async def start(http: httpx.AsyncClient, **overrides: str) -> dict[str, Any]:
    fields = {"client_id": NATIVE_ID, "scope": SCOPE, "audience": API, **overrides}
    response = await http.post("/oauth/device/code", data=fields)
    assert response.status_code == 200, response.text
    return response.json()


async def poll(http: httpx.AsyncClient, device_code: str, client_id: str = NATIVE_ID) -> httpx.Response:
    return await http.post(
        "/oauth/token",
        data={"grant_type": DEVICE_CODE_GRANT, "device_code": device_code, "client_id": client_id},
    )


async def test_device_code_answer_has_the_rfc_8628_fields(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    state.device_interval = 5

    body = await start(http)

    assert re.fullmatch(r"[A-Z]{4}-[A-Z]{4}", body["user_code"])
    assert body["device_code"]
    assert body["verification_uri"] == ISSUER + "activate"
    assert body["verification_uri_complete"] == f"{ISSUER}activate?user_code={body['user_code']}"
    assert body["expires_in"] == 900
    assert body["interval"] == 5
    assert state.pending_user_codes() == [body["user_code"]]
    assert state.requests[-1].path == "/oauth/device/code"
    assert state.requests[-1].grant_type is None
    assert state.requests[-1].client_id == NATIVE_ID


async def test_confidential_or_unknown_clients_get_no_device_code(http: httpx.AsyncClient) -> None:
    confidential = await http.post("/oauth/device/code", data={"client_id": CLIENT_ID, "audience": API})
    unknown = await http.post("/oauth/device/code", data={"client_id": "ghost", "audience": API})

    assert error_of(confidential) == (403, "unauthorized_client")
    assert error_of(unknown) == (401, "access_denied")


async def test_polling_before_approval_is_authorization_pending(http: httpx.AsyncClient) -> None:
    body = await start(http)

    assert error_of(await poll(http, body["device_code"])) == (403, "authorization_pending")


async def test_polling_faster_than_the_interval_is_slow_down(
    http: httpx.AsyncClient, state: EmulatorState, clock: FakeClock
) -> None:
    state.device_interval = 5
    body = await start(http)

    too_early = await poll(http, body["device_code"])
    clock.advance(5)
    on_time = await poll(http, body["device_code"])
    clock.advance(1)
    too_soon_again = await poll(http, body["device_code"])

    assert error_of(too_early) == (429, "slow_down")
    assert error_of(on_time) == (403, "authorization_pending")
    assert error_of(too_soon_again) == (429, "slow_down")


async def test_approved_device_code_gives_access_and_refresh_tokens_once(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    body = await start(http)
    state.approve_device(body["user_code"], USER)

    response = await poll(http, body["device_code"])
    again = await poll(http, body["device_code"])

    assert response.status_code == 200
    tokens = response.json()
    claims = state.verify_access_token(tokens["access_token"])
    assert claims["sub"] == USER
    assert claims["azp"] == NATIVE_ID
    assert claims["scope"] == "openid read:market read:balance buy:quota request:token"
    assert claims["permissions"] == ["read:market", "read:balance", "buy:quota", "request:token"]
    grant = state.refresh_tokens[tokens["refresh_token"]]
    assert (grant.sub, grant.client_id, grant.audience) == (USER, NATIVE_ID, API)
    assert "offline_access" in grant.scopes
    assert error_of(again) == (403, "invalid_grant")
    assert state.pending_user_codes() == []


async def test_refresh_token_from_device_flow_works_for_the_native_client(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    body = await start(http)
    state.approve_device(body["user_code"], USER)
    refresh_token = (await poll(http, body["device_code"])).json()["refresh_token"]

    response = await http.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": NATIVE_ID},
    )

    assert response.status_code == 200


async def test_without_offline_access_no_refresh_token_and_unknown_scopes_dropped(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    body = await start(http, scope="read:market delete:everything")
    state.approve_device(body["user_code"], USER)

    tokens = (await poll(http, body["device_code"])).json()

    assert "refresh_token" not in tokens
    assert tokens["scope"] == "read:market"


async def test_denied_device_code_is_access_denied(http: httpx.AsyncClient, state: EmulatorState) -> None:
    body = await start(http)
    state.deny_device(body["user_code"])

    assert error_of(await poll(http, body["device_code"])) == (403, "access_denied")


async def test_device_code_expires(http: httpx.AsyncClient, state: EmulatorState, clock: FakeClock) -> None:
    body = await start(http)
    clock.advance(body["expires_in"])

    assert error_of(await poll(http, body["device_code"])) == (403, "expired_token")
    with pytest.raises(ValueError):
        state.approve_device(body["user_code"], USER)


async def test_device_code_of_another_client_or_unknown_is_invalid_grant(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    state.add_client("other-cli", native=True)
    body = await start(http)

    assert error_of(await poll(http, body["device_code"], client_id="other-cli")) == (403, "invalid_grant")
    assert error_of(await poll(http, "made-up")) == (403, "invalid_grant")


def test_approving_needs_a_known_user_and_a_pending_code(state: EmulatorState) -> None:
    with pytest.raises(ValueError, match="user code"):
        state.approve_device("BCDF-GHJK", USER)
    with pytest.raises(ValueError, match="user"):
        state.approve_device("BCDF-GHJK", "auth0|nobody")
