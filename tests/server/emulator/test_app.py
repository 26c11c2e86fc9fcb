"""The HTTP layer: body parsing, request recording, grant dispatch and injected faults."""

from __future__ import annotations

import httpx

from server.emulator import EmulatorState, create_app
from tests.server.emulator.helpers import API, CLIENT_ID, CLIENT_SECRET, ISSUER, FakeClock, error_of

CC = {"grant_type": "client_credentials", "audience": API}


async def test_every_token_request_is_recorded_with_fields_client_and_headers(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    await http.post(
        "/oauth/token",
        data={**CC, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        headers={"User-Agent": "broker-test"},
    )
    await http.post("/oauth/token", data={**CC, "client_id": CLIENT_ID, "client_secret": "wrong"})

    ok, failed = state.requests
    assert ok.path == "/oauth/token"
    assert ok.grant_type == "client_credentials"
    assert ok.fields == {**CC, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
    assert ok.client_id == CLIENT_ID
    assert ok.headers["user-agent"] == "broker-test"
    assert ok.headers["content-type"] == "application/x-www-form-urlencoded"
    assert failed.client_id is None
    assert failed.grant_type == "client_credentials"


async def test_missing_grant_type_is_invalid_request_and_unknown_is_unsupported(
    http: httpx.AsyncClient,
) -> None:
    missing = await http.post("/oauth/token", data={"audience": API}, auth=(CLIENT_ID, CLIENT_SECRET))
    unknown = await http.post(
        "/oauth/token", data={"grant_type": "password"}, auth=(CLIENT_ID, CLIENT_SECRET)
    )

    assert error_of(missing) == (400, "invalid_request")
    assert error_of(unknown) == (400, "unsupported_grant_type")


async def test_malformed_bodies_are_invalid_request(http: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    not_json = await http.post("/oauth/token", content=b"{", headers=headers)
    not_object = await http.post("/oauth/token", content=b"[1]", headers=headers)
    nested = await http.post("/oauth/token", json={"grant_type": {"x": 1}})
    repeated = await http.post(
        "/oauth/token",
        content=b"grant_type=a&grant_type=b",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    xml = await http.post("/oauth/token", content=b"<x/>", headers={"content-type": "text/xml"})

    for response in (not_json, not_object, nested, repeated, xml):
        assert error_of(response) == (400, "invalid_request"), response.request.content


async def test_json_numbers_are_taken_as_strings(http: httpx.AsyncClient, state: EmulatorState) -> None:
    await http.post(
        "/oauth/token", json={**CC, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "n": 5}
    )

    assert state.requests[-1].fields["n"] == "5"


async def test_queued_server_errors_answer_and_are_recorded_then_service_resumes(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    state.faults.fail_next(503, count=2)

    answers = [await http.post("/oauth/token", data=CC, auth=(CLIENT_ID, CLIENT_SECRET)) for _ in range(3)]

    assert [a.status_code for a in answers] == [503, 503, 200]
    assert error_of(answers[0]) == (503, "server_error")
    assert len(state.requests) == 3


async def test_rate_limit_fault_carries_auth0_rate_limit_headers(
    http: httpx.AsyncClient, state: EmulatorState, clock: FakeClock
) -> None:
    state.faults.rate_limit_next(reset_in=7)
    state.faults.rate_limit_next(reset_in=2, retry_after=3)

    first = await http.post("/oauth/token", data=CC, auth=(CLIENT_ID, CLIENT_SECRET))
    second = await http.post("/oauth/token", data=CC, auth=(CLIENT_ID, CLIENT_SECRET))

    assert error_of(first) == (429, "too_many_requests")
    assert first.headers["x-ratelimit-reset"] == str(int(clock()) + 7)
    assert first.headers["x-ratelimit-remaining"] == "0"
    assert "retry-after" not in first.headers
    assert second.headers["retry-after"] == "3"


async def test_faults_apply_to_the_device_endpoint_and_clear_forgets_them(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    state.faults.fail_next(500, count=2)
    faulted = await http.post("/oauth/device/code", data={"client_id": "cli", "audience": API})
    state.faults.clear()

    resumed = await http.post("/oauth/device/code", data={"client_id": "cli", "audience": API})

    assert faulted.status_code == 500
    assert resumed.status_code == 200


async def test_admin_routes_are_absent_when_admin_is_off(state: EmulatorState) -> None:
    transport = httpx.ASGITransport(app=create_app(state, admin=False))
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as http:
        response = await http.post("/emulator/tokens", json={"sub": "x", "scopes": []})
        discovery = await http.get("/.well-known/openid-configuration")

    assert response.status_code == 404
    assert discovery.status_code == 200


async def test_get_on_the_token_endpoint_is_not_allowed(http: httpx.AsyncClient) -> None:
    assert (await http.get("/oauth/token")).status_code == 405
