"""CIBA: `/bc-authorize` validation and answer, the CIBA grant's polling answers, the user's switches
(mode, delayed approval, the test API), slow_down, single use and expiry on the tenant's clock."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.emulator import EmulatorState, demo_tenant
from server.emulator.ciba import CIBA_GRANT
from server.emulator.serve import configure
from tests.server.emulator.helpers import (
    API,
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    NATIVE_ID,
    OTHER_CLIENT_ID,
    OTHER_SECRET,
    USER,
    FakeClock,
    error_of,
)
from tests.server.emulator_process import emulator_process

DETAILS = [{"type": "token_vault_grant", "connection": "github", "scopes": ["repo:read"], "agent": "agent-x"}]


def hint(sub: str = USER, iss: str = ISSUER, fmt: str = "iss_sub") -> str:
    return json.dumps({"format": fmt, "iss": iss, "sub": sub})


def form(**overrides: str | None) -> dict[str, str]:
    fields: dict[str, str | None] = {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scope": "openid",
        "login_hint": hint(),
        "binding_message": "Approve agent-x: github",
        **overrides,
    }
    return {name: value for name, value in fields.items() if value is not None}


async def authorize(http: httpx.AsyncClient, **overrides: str | None) -> dict[str, Any]:
    response = await http.post("/bc-authorize", data=form(**overrides))
    assert response.status_code == 200, response.text
    return response.json()


async def poll(
    http: httpx.AsyncClient, auth_req_id: str, client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET
) -> httpx.Response:
    return await http.post(
        "/oauth/token",
        data={"grant_type": CIBA_GRANT, "auth_req_id": auth_req_id, "client_id": client_id, "client_secret": secret},
    )


@pytest.fixture
def manual(state: EmulatorState) -> EmulatorState:
    state.ciba_mode = "manual"
    return state


# ---- /bc-authorize ------------------------------------------------------------------------------

async def test_bc_authorize_answers_auth_req_id_expires_in_and_interval_and_is_recorded(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    body = await authorize(http, requested_expiry="120", authorization_details=json.dumps(DETAILS))

    assert set(body) == {"auth_req_id", "expires_in", "interval"}
    assert body["expires_in"] == 120 and body["interval"] == 5 and body["auth_req_id"]
    recorded = state.requests[-1]
    assert recorded.path == "/bc-authorize" and recorded.grant_type is None
    assert (recorded.client_id, recorded.auth_method) == (CLIENT_ID, "client_secret_post")
    assert recorded.fields["binding_message"] == "Approve agent-x: github"
    assert json.loads(recorded.fields["authorization_details"]) == DETAILS


async def test_defaults_are_300_seconds_and_the_interval_knob(http: httpx.AsyncClient, state: EmulatorState) -> None:
    state.ciba_interval = 2

    body = await authorize(http)

    assert (body["expires_in"], body["interval"]) == (300, 2)


async def test_bc_authorize_takes_basic_authentication_and_refuses_bad_or_public_clients(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    fields = form(client_id=None, client_secret=None)

    by_basic = await http.post("/bc-authorize", data=fields, headers={"Authorization": f"Basic {basic}"})
    wrong = await http.post("/bc-authorize", data=form(client_secret="wrong"))
    anonymous = await http.post("/bc-authorize", data=fields)
    native = await http.post("/bc-authorize", data=form(client_id=NATIVE_ID, client_secret=None))

    assert by_basic.status_code == 200 and state.requests[0].auth_method == "client_secret_basic"
    assert error_of(wrong) == (401, "access_denied")
    assert error_of(anonymous) == (401, "access_denied")
    assert error_of(native) == (403, "unauthorized_client")


@pytest.mark.parametrize(
    "overrides",
    [
        {"scope": "profile"},
        {"scope": None},
        {"login_hint": None},
        {"login_hint": "auth0|alice"},
        {"login_hint": hint(sub="auth0|nobody")},
        {"login_hint": hint(iss="https://other.example/")},
        {"login_hint": hint(fmt="email")},
        {"login_hint": json.dumps({"format": "iss_sub", "iss": ISSUER, "sub": 7})},
        {"binding_message": None},
        {"binding_message": ""},
        {"binding_message": "x" * 65},
        {"binding_message": "Approve agent/x: github"},
        {"binding_message": "Approve agënt: github"},
        {"binding_message": "line\nbreak"},
        {"requested_expiry": "0"},
        {"requested_expiry": "259201"},
        {"requested_expiry": "soon"},
        {"requested_expiry": "1.5"},
        {"authorization_details": "{}"},
        {"authorization_details": "not json"},
        {"authorization_details": json.dumps([{"connection": "github"}])},
        {"authorization_details": json.dumps(["token_vault_grant"])},
        {"authorization_details": json.dumps([{"type": "t"}] * 6)},
    ],
    ids=lambda o: next(f"{k}={v!s:.30}" for k, v in o.items()),
)
async def test_bc_authorize_refuses_malformed_requests_as_invalid_request(
    http: httpx.AsyncClient, state: EmulatorState, overrides: dict[str, str | None]
) -> None:
    response = await http.post("/bc-authorize", data=form(**overrides))

    assert error_of(response) == (400, "invalid_request")
    assert state.ciba_requests == {}
    assert state.requests[-1].path == "/bc-authorize"


async def test_the_longest_binding_message_and_its_whole_character_set_are_accepted(http: httpx.AsyncClient) -> None:
    allowed = "Aa0 +-_.,:#"
    await authorize(http, binding_message=(allowed * 6)[:64], requested_expiry="259200")


async def test_an_unknown_audience_is_refused(http: httpx.AsyncClient) -> None:
    response = await http.post("/bc-authorize", data=form(audience="https://nowhere.example/"))

    assert error_of(response) == (403, "access_denied")


# ---- the CIBA grant -----------------------------------------------------------------------------

async def test_approved_request_gives_tokens_for_the_user_with_details_echoed_once(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    body = await authorize(http, scope="openid read:market bogus", authorization_details=json.dumps(DETAILS))

    answer = await poll(http, body["auth_req_id"])
    again = await poll(http, body["auth_req_id"])

    assert answer.status_code == 200, answer.text
    tokens = answer.json()
    assert {"access_token", "id_token", "expires_in", "scope", "token_type", "authorization_details"} <= set(tokens)
    assert tokens["authorization_details"] == DETAILS and tokens["token_type"] == "Bearer"
    assert tokens["scope"] == "openid read:market"
    claims = state.verify_access_token(tokens["access_token"])
    assert claims["sub"] == USER and claims["azp"] == CLIENT_ID and API in claims["aud"]
    id_claims = state.verify_access_token(tokens["id_token"])
    assert id_claims["sub"] == USER and id_claims["aud"] == CLIENT_ID
    assert error_of(again) == (400, "invalid_grant")
    assert state.requests[-1].grant_type == CIBA_GRANT


async def test_the_access_token_is_for_the_requested_audience(http: httpx.AsyncClient, state: EmulatorState) -> None:
    state.add_api("https://second.example/", ["x:y"])
    body = await authorize(http, audience="https://second.example/", scope="openid x:y")

    tokens = (await poll(http, body["auth_req_id"])).json()

    assert "https://second.example/" in state.verify_access_token(tokens["access_token"])["aud"]
    assert "authorization_details" not in tokens


async def test_deny_mode_answers_access_denied(http: httpx.AsyncClient, state: EmulatorState) -> None:
    state.ciba_mode = "deny"
    body = await authorize(http)

    assert error_of(await poll(http, body["auth_req_id"])) == (400, "access_denied")
    assert state.pending_ciba() == []


async def test_manual_mode_is_pending_until_the_user_decides(
    http: httpx.AsyncClient, manual: EmulatorState, clock: FakeClock
) -> None:
    approved = await authorize(http)
    denied = await authorize(http)
    clock.advance(5)

    pending = await poll(http, approved["auth_req_id"])
    manual.approve_ciba(approved["auth_req_id"])
    manual.deny_ciba(denied["auth_req_id"])
    clock.advance(5)

    assert error_of(pending) == (400, "authorization_pending")
    assert (await poll(http, approved["auth_req_id"])).status_code == 200
    assert error_of(await poll(http, denied["auth_req_id"])) == (400, "access_denied")
    with pytest.raises(ValueError, match="no pending CIBA request"):
        manual.approve_ciba(approved["auth_req_id"])


async def test_approve_after_keeps_the_request_pending_that_long(
    http: httpx.AsyncClient, state: EmulatorState, clock: FakeClock
) -> None:
    state.ciba_approve_after = 12
    body = await authorize(http)

    clock.advance(6)
    early = await poll(http, body["auth_req_id"])
    clock.advance(6)
    on_time = await poll(http, body["auth_req_id"])

    assert error_of(early) == (400, "authorization_pending")
    assert on_time.status_code == 200


async def test_polling_sooner_than_the_interval_is_slow_down_and_grows_the_interval_by_five(
    http: httpx.AsyncClient, manual: EmulatorState, clock: FakeClock
) -> None:
    body = await authorize(http)

    too_soon = await poll(http, body["auth_req_id"])
    clock.advance(10)
    at_new_interval = await poll(http, body["auth_req_id"])
    clock.advance(9)
    soon_again = await poll(http, body["auth_req_id"])
    clock.advance(15)
    at_newer_interval = await poll(http, body["auth_req_id"])

    assert too_soon.status_code == 400
    assert too_soon.json()["error"] == "slow_down" and too_soon.json()["interval"] == 10
    assert "10 seconds" in too_soon.json()["error_description"]
    assert error_of(at_new_interval) == (400, "authorization_pending")
    assert (soon_again.status_code, soon_again.json()["error"], soon_again.json()["interval"]) == (400, "slow_down", 15)
    assert error_of(at_newer_interval) == (400, "authorization_pending")


async def test_an_expired_request_is_access_denied_even_if_approved_too_late(
    http: httpx.AsyncClient, manual: EmulatorState, clock: FakeClock
) -> None:
    body = await authorize(http, requested_expiry="30")
    clock.advance(30)

    assert manual.pending_ciba() == []
    with pytest.raises(ValueError):
        manual.approve_ciba(body["auth_req_id"])
    assert error_of(await poll(http, body["auth_req_id"])) == (400, "access_denied")


async def test_approval_scheduled_after_the_expiry_never_comes(
    http: httpx.AsyncClient, state: EmulatorState, clock: FakeClock
) -> None:
    state.ciba_approve_after = 60
    body = await authorize(http, requested_expiry="30")
    clock.advance(60)

    assert error_of(await poll(http, body["auth_req_id"])) == (400, "access_denied")


async def test_another_clients_or_an_unknown_auth_req_id_is_invalid_grant(http: httpx.AsyncClient) -> None:
    body = await authorize(http)

    foreign = await poll(http, body["auth_req_id"], client_id=OTHER_CLIENT_ID, secret=OTHER_SECRET)
    unknown = await poll(http, "made-up")
    missing = await http.post(
        "/oauth/token", data={"grant_type": CIBA_GRANT, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    )

    assert error_of(foreign) == (400, "invalid_grant")
    assert error_of(unknown) == (400, "invalid_grant")
    assert error_of(missing) == (400, "invalid_request")
    assert (await poll(http, body["auth_req_id"])).status_code == 200  # the owner's client still can


async def test_native_clients_cannot_poll_the_ciba_grant(http: httpx.AsyncClient) -> None:
    response = await http.post("/oauth/token", data={"grant_type": CIBA_GRANT, "auth_req_id": "x",
                                                     "client_id": NATIVE_ID})

    assert error_of(response) == (403, "unauthorized_client")


async def test_discovery_names_the_backchannel_endpoint_and_grant(http: httpx.AsyncClient) -> None:
    discovery = (await http.get("/.well-known/openid-configuration")).json()

    assert discovery["backchannel_authentication_endpoint"] == ISSUER + "bc-authorize"
    assert discovery["backchannel_token_delivery_modes_supported"] == ["poll"]
    assert CIBA_GRANT in discovery["grant_types_supported"]


# ---- the test API and the switches --------------------------------------------------------------

async def test_the_test_api_lists_pending_requests_and_decides_them(
    http: httpx.AsyncClient, manual: EmulatorState, clock: FakeClock
) -> None:
    first = await authorize(http, authorization_details=json.dumps(DETAILS))
    second = await authorize(http, binding_message="Approve other: stripe")

    listed = (await http.get("/emulator/approvals")).json()
    approve = await http.post(f"/emulator/approvals/{first['auth_req_id']}", json={"decision": "approve"})
    deny = await http.post(f"/emulator/approvals/{second['auth_req_id']}", json={"decision": "deny"})
    twice = await http.post(f"/emulator/approvals/{first['auth_req_id']}", json={"decision": "deny"})
    unknown = await http.post("/emulator/approvals/made-up", json={"decision": "approve"})
    bad = await http.post(f"/emulator/approvals/{first['auth_req_id']}", json={"decision": "maybe"})
    clock.advance(5)

    assert listed == {
        "approvals": [
            {"auth_req_id": first["auth_req_id"], "sub": USER, "binding_message": "Approve agent-x: github",
             "authorization_details": DETAILS},
            {"auth_req_id": second["auth_req_id"], "sub": USER, "binding_message": "Approve other: stripe",
             "authorization_details": None},
        ]
    }
    assert approve.json() == {"auth_req_id": first["auth_req_id"], "status": "approved"}
    assert deny.json() == {"auth_req_id": second["auth_req_id"], "status": "denied"}
    assert error_of(twice) == (404, "not_found")
    assert error_of(unknown) == (404, "not_found")
    assert error_of(bad) == (400, "invalid_request")
    assert (await http.get("/emulator/approvals")).json() == {"approvals": []}
    assert (await poll(http, first["auth_req_id"])).status_code == 200
    assert error_of(await poll(http, second["auth_req_id"])) == (400, "access_denied")


def test_the_serve_switch_sets_the_ciba_mode() -> None:
    demo = demo_tenant("http://127.0.0.1:9/")
    assert demo.state.ciba_mode == "approve"

    configure(demo, ciba="manual")

    assert demo.state.ciba_mode == "manual"
    with pytest.raises(ValueError, match="approve, deny or manual"):
        configure(demo, ciba="maybe")  # type: ignore[arg-type]


async def test_the_emulator_command_in_manual_mode_waits_for_the_test_api(tmp_path: Path) -> None:
    async with emulator_process(tmp_path, "--ciba", "manual") as emulator:
        env = emulator.env
        auth = (env["AUTH0_CLIENT_ID"], env["AUTH0_CLIENT_SECRET"])
        async with httpx.AsyncClient(base_url=env["AUTH0_DOMAIN"], timeout=5) as http:
            login_hint = json.dumps({"format": "iss_sub", "iss": env["AUTH0_DOMAIN"] + "/", "sub": "auth0|demo-user"})
            started = await http.post("/bc-authorize", auth=auth, data={
                "scope": "openid", "login_hint": login_hint, "binding_message": "Approve agent-x: github"})
            auth_req_id = started.json()["auth_req_id"]
            listed = (await http.get("/emulator/approvals")).json()["approvals"]
            decided = await http.post(f"/emulator/approvals/{auth_req_id}", json={"decision": "deny"})
    assert "# CIBA approval requests: manual" in emulator.banner
    assert [item["auth_req_id"] for item in listed] == [auth_req_id]
    assert decided.json()["status"] == "denied"
