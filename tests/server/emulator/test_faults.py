"""Fault injection: queued and rate-drawn faults, their answers on the wire, the test API and the CLI flags."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from server.auth0.client import Auth0Client, Auth0Error, RetryPolicy
from server.emulator import EmulatorState, Faults, FaultSettings, demo_tenant
from server.emulator.app import ConnectionReset
from server.emulator.serve import configure, describe
from tests.server.emulator.helpers import API, CLIENT_ID, CLIENT_SECRET, NATIVE_ID, USER, error_of
from tests.server.emulator_process import emulator_process

CC = {"grant_type": "client_credentials", "audience": API}


async def token(http: httpx.AsyncClient) -> httpx.Response:
    return await http.post("/oauth/token", data=CC, auth=(CLIENT_ID, CLIENT_SECRET))


def test_rates_are_drawn_per_request_and_repeatable_with_a_seed() -> None:
    def run() -> list[str | None]:
        faults = Faults()
        faults.configure(FaultSettings(fail_rate=0.3, hang_rate=0.2, seed=7))
        return [f.kind if f else None for f in (faults.take() for _ in range(400))]

    first = run()
    assert first == run()
    assert 80 <= first.count("status") <= 160 and 50 <= first.count("hang") <= 110
    assert first.count(None) + first.count("status") + first.count("hang") == 400


def test_queued_faults_come_first_and_configure_keeps_what_it_is_not_given() -> None:
    faults = Faults()
    faults.configure(FaultSettings(fail_rate=1.0, fail_status=502, latency=0.5))
    faults.malformed_next()
    assert faults.take().kind == "malformed"  # type: ignore[union-attr]
    faults.configure(FaultSettings(latency=0.1))
    drawn = faults.take()
    assert drawn is not None and drawn.status == 502 and faults.latency == 0.1
    with pytest.raises(ValueError, match="more than 1"):
        faults.configure(FaultSettings(reset_rate=0.5))  # with fail_rate 1.0 already set
    faults.clear()
    assert faults.take() is None and faults.latency == 0


async def test_a_reset_drops_the_connection_in_process(http: httpx.AsyncClient, state: EmulatorState) -> None:
    state.faults.reset_next()
    with pytest.raises(ConnectionResetError):
        await token(http)
    assert isinstance(ConnectionReset(), OSError)
    assert (await token(http)).status_code == 200
    assert len(state.requests) == 2


async def test_a_hang_never_answers_until_the_client_gives_up(http: httpx.AsyncClient, state: EmulatorState) -> None:
    state.faults.hang_next()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(token(http), timeout=0.2)
    assert len(state.requests) == 1
    assert (await token(http)).status_code == 200


async def test_malformed_json_is_a_200_that_does_not_parse(http: httpx.AsyncClient, state: EmulatorState) -> None:
    state.faults.malformed_next()
    answer = await token(http)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    with pytest.raises(ValueError):
        answer.json()


async def test_the_test_api_injects_faults_and_revokes_accounts(http: httpx.AsyncClient, state: EmulatorState) -> None:
    answer = await http.post("/emulator/faults", json={
        "latency": 0, "fail_rate": 0.0,
        "next": [{"kind": "status", "status": 502}, {"kind": "rate_limit", "retry_after": 4, "reset_in": None},
                 {"kind": "malformed"}],
    })
    assert answer.status_code == 200 and answer.json()["pending"] == 3
    first, second, third = [await token(http) for _ in range(3)]
    assert error_of(first) == (502, "server_error")
    assert error_of(second) == (429, "too_many_requests") and second.headers["retry-after"] == "4"
    assert "x-ratelimit-reset" not in second.headers
    assert third.status_code == 200 and not third.text.endswith("}")

    assert (await http.post("/emulator/faults", json={"fail_rate": 0.7, "hang_rate": 0.7})).status_code == 400
    assert (await http.post("/emulator/faults", json={"fail_rate": 2})).status_code == 400
    assert (await http.post("/emulator/faults", json={"next": [{"kind": "explode"}]})).status_code == 400
    assert (await http.post("/emulator/faults", json={"fail_rate": 1.0})).json()["fail_rate"] == 1.0
    assert (await token(http)).status_code == 503
    cleared = await http.post("/emulator/faults", json={"clear": True})
    assert cleared.json()["fail_rate"] == 0 and (await token(http)).status_code == 200

    revoked = await http.post("/emulator/accounts/revoke", json={"sub": USER, "connection": "github"})
    assert revoked.status_code == 200 and state.connected_account(USER, "github") is None
    missing = await http.post("/emulator/accounts/revoke", json={"sub": USER, "connection": "stripe"})
    assert error_of(missing) == (404, "not_found")


async def test_revoke_endpoint_forgets_a_refresh_token_of_the_asking_client(
    http: httpx.AsyncClient, state: EmulatorState
) -> None:
    native = state.issue_refresh_token(USER, NATIVE_ID, ["offline_access"], API)
    broker = state.issue_refresh_token(USER, CLIENT_ID, ["offline_access"], API)
    foreign = await http.post("/oauth/revoke", data={"client_id": NATIVE_ID, "token": broker})
    unknown = await http.post("/oauth/revoke", data={"client_id": NATIVE_ID, "token": "nope"})
    own = await http.post("/oauth/revoke", data={"client_id": NATIVE_ID, "token": native})
    assert error_of(foreign) == (403, "invalid_grant")
    assert unknown.status_code == 200 and own.status_code == 200
    assert native not in state.refresh_tokens and broker in state.refresh_tokens
    refused = await http.post("/oauth/token", data={"grant_type": "refresh_token", "refresh_token": native,
                                                    "client_id": NATIVE_ID})
    assert error_of(refused) == (403, "invalid_grant")


async def test_auto_approve_signs_device_logins_in_at_once(http: httpx.AsyncClient, state: EmulatorState) -> None:
    state.auto_approve_sub = USER
    started = (await http.post("/oauth/device/code", data={"client_id": NATIVE_ID, "audience": API,
                                                           "scope": "openid offline_access"})).json()
    answer = await http.post("/oauth/token", data={"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                                                   "device_code": started["device_code"], "client_id": NATIVE_ID})
    assert answer.status_code == 200 and answer.json()["refresh_token"]


def test_serve_switches_apply_to_the_demo_tenant() -> None:
    demo = demo_tenant("http://127.0.0.1:9/")
    configure(demo, faults=FaultSettings(fail_rate=0.25, latency=0.1), revoke=["github"], auto_approve=True,
              device_interval=0)
    assert demo.state.faults.fail_rate == 0.25 and demo.state.faults.latency == 0.1
    assert demo.state.connected_account(demo.account, "github") is None
    assert demo.state.auto_approve_sub == demo.account and demo.state.device_interval == 0
    assert describe(demo) == "latency=0.1 fail_rate=0.25 fail_status=503 revoked=github"
    with pytest.raises(ValueError, match="no connected account"):
        configure(demo, revoke=["myspace"])


async def test_served_emulator_flags_and_faults_reach_a_real_client_over_loopback(tmp_path: Path) -> None:
    """A real socket: the reset is the peer hanging up mid-answer, the hang a read timeout."""
    async with emulator_process(tmp_path, "--reset-rate", "1", "--seed", "3") as emulator:
        assert "# injecting faults: reset_rate=1.0" in emulator.banner
        env = emulator.env
        auth0 = Auth0Client(env["AUTH0_DOMAIN"], env["AUTH0_CLIENT_ID"], env["AUTH0_CLIENT_SECRET"],
                            retry=RetryPolicy(deadline=2, max_attempts=2, backoff=0.01))
        try:
            with pytest.raises(Auth0Error) as reset:
                await auth0.refresh(env["TVM_REFRESH_TOKEN"])
            async with httpx.AsyncClient(base_url=env["AUTH0_DOMAIN"]) as admin:
                await admin.post("/emulator/faults", json={"clear": True, "next": [{"kind": "hang"}]})
            auth0.retry = RetryPolicy(deadline=0.6, max_attempts=2, backoff=0.01)
            refreshed = await auth0.refresh(env["TVM_REFRESH_TOKEN"])  # the first attempt hangs, the second answers
        finally:
            await auth0.aclose()
    assert reset.value.unreachable and "could not be reached" in str(reset.value)
    assert refreshed.access_token
