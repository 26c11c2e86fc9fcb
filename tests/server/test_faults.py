"""request_token through the SDK client while the tenant misbehaves: each fault gets its documented
answer, the books are exactly as before (the unit refunded with the failure's event), and a hanging
Auth0 never holds a tool call past the deadline."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from server import audit
from server.app import Runtime
from server.auth0.client import TOKEN_VAULT_GRANT
from server.clock import ManualClock
from server.emulator import EmulatorState, FaultSettings
from server.invariants import check_invariants
from server.store import AuditFilter
from server.vault import TokenVault
from tests.conftest import demo_client, demo_runtime, ok, refused
from tests.server.tenant import Sleeps, auth0_client

DEADLINE = 0.6
ASK = {"connection": "github", "scopes": ["repo:read"], "purpose": "fault drill"}


@pytest.fixture
async def rt(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Runtime]:
    async with demo_runtime(tmp_path / "v.db", clock, TVM_AUTH0_TIMEOUT=str(DEADLINE)) as runtime:
        yield runtime


@pytest.fixture
async def client(rt: Runtime) -> AsyncIterator[Client]:
    async with demo_client(rt) as c:
        yield c


def tenant_state(rt: Runtime) -> EmulatorState:
    assert rt.tenant is not None
    return rt.tenant.state


async def books(rt: Runtime) -> tuple[Any, ...]:
    """The wallet and every unit count of the demo account."""
    account = rt.tenant.account if rt.tenant else ""

    def read(tx: Any) -> tuple[Any, ...]:
        holdings = [(h.listing_id, h.units_bought, h.units_held, h.units_reserved, h.units_consumed)
                    for h in tx.holdings_of(account)]
        return tx.balance(account), tuple(holdings)

    return await rt.db.read(read)


def exchanges(rt: Runtime) -> int:
    return len([r for r in tenant_state(rt).requests if r.grant_type == TOKEN_VAULT_GRANT])


@dataclass(frozen=True)
class Drill:
    inject: Callable[[EmulatorState], None]
    code: str
    attempts: int  # exchange requests the broker made
    words: str = ""


def _latency(state: EmulatorState) -> None:
    state.faults.latency = 30


def _revoke(state: EmulatorState) -> None:
    state.revoke_connection("auth0|demo-user", "github")


DRILLS = {
    "latency": Drill(_latency, "vault_unavailable", 2, "try again"),
    "fraction-of-5xx": Drill(lambda s: s.faults.configure(FaultSettings(fail_rate=1.0)), "vault_unavailable", 3),
    "429-retry-after": Drill(lambda s: s.faults.rate_limit_next(count=9, retry_after=30, reset_in=None),
                             "rate_limited", 1, "retry in 30 seconds"),
    "429-ratelimit-reset": Drill(lambda s: s.faults.rate_limit_next(count=9, retry_after=None, reset_in=45),
                                 "rate_limited", 1, "seconds"),
    "connection-reset": Drill(lambda s: s.faults.reset_next(9), "vault_unavailable", 3),
    "hang": Drill(lambda s: s.faults.hang_next(9), "vault_unavailable", 2),
    "malformed-json": Drill(lambda s: s.faults.malformed_next(9), "vault_unavailable", 1),
    "revoked-connection": Drill(_revoke, "account_not_connected", 1, "reconnect github"),
}


@pytest.mark.parametrize("name", list(DRILLS))
async def test_each_fault_gets_its_answer_and_the_unit_is_refunded_with_its_event(
    name: str, rt: Runtime, client: Client
) -> None:
    drill = DRILLS[name]
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 2, "max_unit_price": 100})
    before = await books(rt)
    drill.inject(tenant_state(rt))
    started = time.monotonic()
    text = await refused(client, "request_token", ASK)
    elapsed = time.monotonic() - started

    assert text.startswith(f"[{drill.code}] "), text
    assert drill.words in text and "refunded" in text
    assert exchanges(rt) == drill.attempts
    assert elapsed < DEADLINE + 0.5  # never past the deadline, whatever the tenant does
    assert await books(rt) == before
    records = await rt.db.read(lambda tx: tx.find_audit(AuditFilter(tool="request_token")))
    [event] = [audit.export_line(r) for r in records]
    assert (event["code"], event["token_id"]) == (drill.code, None)
    assert event["outcome"] == ("denied" if drill.code == "account_not_connected" else "error")
    with sqlite3.connect(rt.config.database) as side:
        [(status,)] = side.execute("SELECT status FROM reservations WHERE id = ?", (event["args"]["reservation_id"],))
    assert status == "refunded"
    assert await rt.db.read(check_invariants) == []

    tenant_state(rt).faults.clear()
    tenant_state(rt).connect_account("auth0|demo-user", "github", ["repo:read"])
    assert (await ok(client, "request_token", ASK))["units_remaining"] == 1  # the refunded unit spends again


async def test_rate_limited_answer_carries_the_wait_in_seconds_for_either_header(rt: Runtime, client: Client) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
    tenant_state(rt).faults.rate_limit_next(count=3, retry_after=None, reset_in=45)
    text = await refused(client, "request_token", ASK)
    seconds = int(text.split("retry in ")[1].split()[0])
    assert 44 <= seconds <= 46


async def test_many_failures_in_a_row_conserve_every_unit(rt: Runtime, client: Client) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 3, "max_unit_price": 100})
    before = await books(rt)
    state = tenant_state(rt)
    for inject in (lambda: state.faults.fail_next(500, count=3), lambda: state.faults.malformed_next(),
                   lambda: state.faults.rate_limit_next(retry_after=60, reset_in=None),
                   lambda: state.faults.reset_next(3), lambda: _revoke(state)):
        inject()
        await refused(client, "request_token", {**ASK, "purpose": f"try {time.monotonic()}"})
        state.faults.clear()
    assert await books(rt) == before
    events = await rt.db.read(lambda tx: tx.find_audit(AuditFilter(tool="request_token")))
    assert [e.code for e in events] == ["vault_unavailable", "vault_unavailable", "rate_limited",
                                        "vault_unavailable", "account_not_connected"]
    assert await rt.db.read(check_invariants) == []


async def test_a_wrong_client_secret_is_vault_denied_after_exactly_one_request(rt: Runtime, client: Client) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})  # identity ok
    state = tenant_state(rt)
    before, requests_before = await books(rt), len(state.requests)
    sleeps = Sleeps()
    assert rt.tenant is not None
    bad = auth0_client(state, client_id=rt.tenant.client_id, secret="not-the-secret", sleep=sleeps, deadline=5)
    rt.broker.vault = TokenVault(bad)  # the vault's client is wrong; the identity's is right
    try:
        text = await refused(client, "request_token", ASK)
    finally:
        await bad.aclose()
    assert text.startswith("[vault_denied] ") and "client authentication" in text
    [sent] = state.requests[requests_before:]
    assert sent.grant_type == TOKEN_VAULT_GRANT and sent.client_id is None  # refused, and never retried
    assert sleeps.calls == []
    assert await books(rt) == before
    for secret in ("not-the-secret", rt.tenant.client_secret, rt.tenant.refresh_token):
        assert secret not in text
