"""Reservation leases (SPEC §12): a reservation whose holder stopped renewing it is refunded by any process
sharing the database once its lease lapses, each with its own event; the late holder cannot commit it."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from mcp import Client

from server.app import Runtime
from server.broker import Broker
from server.clock import ManualClock
from server.invariants import check_invariants
from server.store import AuditFilter, open_database
from tests.conftest import DEMO_NOW, ok

pytestmark = pytest.mark.both_backends
ASK = {"connection": "github", "scopes": ["repo:read"], "purpose": "lease test", "login_hint": "slow@example.com"}


async def pending(runtime: Runtime) -> list[Any]:
    return await runtime.db.read(lambda tx: tx.pending_reservations())


async def until_pending(runtime: Runtime) -> Any:
    for _ in range(500):
        found = await pending(runtime)
        if found:
            return found[0]
        await asyncio.sleep(0.01)
    raise AssertionError("no reservation became pending")


async def another_replica(database: str, at: ManualClock) -> Broker:
    """A broker of another process (on another machine) sharing the database."""
    other = Broker(await open_database(database), clock=at)
    other.owner = "replica-b.example:4242:1"
    return other


async def test_a_lapsed_lease_is_refunded_by_another_process_and_the_late_holder_cannot_commit(
    runtime: Runtime, client: Client, database: str
) -> None:
    assert runtime.tenant is not None
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 2, "max_unit_price": 100})
    runtime.tenant.state.faults.latency = 1.0  # Token Vault is slow: the reservation waits
    call = asyncio.ensure_future(client.call_tool("request_token", ASK))
    reservation = await until_pending(runtime)
    assert reservation.lease_until == DEMO_NOW + timedelta(seconds=60)  # TVM_RESERVATION_LEASE's default
    other = await another_replica(database, ManualClock(DEMO_NOW + timedelta(seconds=30)))
    try:
        assert await other.recover_reservations(transport="lease") == 0  # its lease still holds
        other.clock = ManualClock(DEMO_NOW + timedelta(seconds=61))
        assert await other.recover_reservations(transport="lease") == 1
    finally:
        await other.db.close()
    result = await call
    assert result.is_error and result.content[0].text.startswith("[vault_unavailable] ")  # type: ignore[union-attr]
    assert "nothing was spent" in result.content[0].text  # type: ignore[union-attr]
    assert "gho_" not in json.dumps(result.model_dump(mode="json"))  # the token fetched late is not handed out
    holdings = await runtime.db.read(lambda tx: tx.holdings_of("auth0|demo-user"))
    assert [(h.units_held, h.units_reserved, h.units_consumed) for h in holdings] == [(2, 0, 0)]
    events = await runtime.db.read(lambda tx: tx.find_audit(AuditFilter(tool="request_token")))
    assert [(e.code, json.loads(e.args).get("reason")) for e in events] == [
        ("vault_unavailable", "lease lapsed"), ("vault_unavailable", None)
    ]
    assert await runtime.db.read(check_invariants) == []


async def test_the_holder_renews_its_leases_while_it_works(runtime: Runtime, client: Client) -> None:
    assert runtime.tenant is not None
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
    runtime.tenant.state.faults.latency = 0.5
    call = asyncio.ensure_future(client.call_tool("request_token", ASK))
    await until_pending(runtime)
    assert runtime.broker.holding == 1
    runtime.broker.clock.advance(timedelta(seconds=50))  # type: ignore[attr-defined]
    assert await runtime.broker.renew_leases() == 1
    [renewed] = await pending(runtime)
    assert renewed.lease_until == DEMO_NOW + timedelta(seconds=110)
    assert not (await call).is_error
    assert runtime.broker.holding == 0 and await runtime.broker.renew_leases() == 0


async def test_a_grant_whose_reservation_lapsed_does_not_open(
    runtime: Runtime, client: Client, database: str
) -> None:
    assert runtime.tenant is not None
    await ok(client, "buy_quota", {"listing_id": "github-repo-read-api", "units": 1, "max_unit_price": 100})
    runtime.tenant.state.faults.latency = 1.0
    url = "https://demo-tenant.token-vault-mcp.invalid/provider/github/user"
    call = asyncio.ensure_future(client.call_tool("call_api", {
        "connection": "github", "scopes": ["repo:read"], "method": "GET", "url": url, "purpose": "lease",
        "login_hint": "slow@example.com"}))
    await until_pending(runtime)
    other = await another_replica(database, ManualClock(DEMO_NOW + timedelta(seconds=61)))
    try:
        assert await other.recover_reservations(transport="lease") == 1
    finally:
        await other.db.close()
    result = await call
    assert result.is_error and result.content[0].text.startswith("[vault_unavailable] ")  # type: ignore[union-attr]
    balance = await ok(client, "check_balance", {})
    assert balance["grants"] == [] and balance["holdings"][0]["units_remaining"] == 1
    assert await runtime.db.read(check_invariants) == []


async def test_the_configured_lease_is_the_one_a_runtime_uses(database: str, clock: ManualClock) -> None:
    from tests.conftest import demo_runtime

    async with demo_runtime(database, clock, TVM_RESERVATION_LEASE="7") as runtime:
        assert runtime.broker.lease == timedelta(seconds=7)
