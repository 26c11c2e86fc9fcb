"""buy_quota through the SDK client: receipts, idempotency, every refusal, and no partial effects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from mcp import Client

from server import market
from server.app import Runtime
from server.clock import ManualClock
from server.invariants import check_invariants
from server.market import parse_listings
from tests.conftest import ok, refused

pytestmark = pytest.mark.both_backends

BUY = {"listing_id": "github-repo-read", "units": 3, "max_unit_price": 100}


async def balance(client: Client) -> int:
    return (await ok(client, "check_balance", {}))["balance"]


async def test_buy_charges_the_current_price_and_adds_units(client: Client, runtime: Runtime) -> None:
    listing = (await ok(client, "list_market", {"connection": "github"}))["listings"][0]
    receipt = await ok(client, "buy_quota", BUY)
    assert receipt["unit_price"] == listing["unit_price"]
    assert receipt["total"] == 3 * listing["unit_price"]
    assert receipt["balance_after"] == 10_000 - receipt["total"]
    assert receipt["units_held"] == 3
    assert await balance(client) == receipt["balance_after"]
    assert await runtime.db.read(check_invariants) == []


async def test_same_idempotency_key_and_arguments_charge_once(client: Client, clock: ManualClock) -> None:
    first = await ok(client, "buy_quota", {**BUY, "idempotency_key": "order-1"})
    clock.advance(timedelta(days=30))  # the price moved; the receipt must not
    second = await ok(client, "buy_quota", {**BUY, "idempotency_key": "order-1"})
    assert second == first
    assert await balance(client) == 10_000 - first["total"]


async def test_same_idempotency_key_with_other_arguments_is_refused(client: Client) -> None:
    await ok(client, "buy_quota", {**BUY, "idempotency_key": "order-2"})
    text = await refused(client, "buy_quota", {**BUY, "units": 4, "idempotency_key": "order-2"})
    assert text.startswith("[idempotency_key_reused] ")


async def test_unknown_listing(client: Client) -> None:
    assert (await refused(client, "buy_quota", {**BUY, "listing_id": "no-such"})).startswith("[unknown_listing] ")


async def test_listing_not_open_or_closed_cannot_be_bought_but_units_stay_usable(
    client: Client, runtime: Runtime, clock: ManualClock
) -> None:
    await ok(client, "buy_quota", BUY)
    clock.set(clock.now().replace(year=2031))
    text = await refused(client, "buy_quota", BUY)
    assert text.startswith("[listing_closed] ")
    token = await ok(client, "request_token", {"connection": "github", "scopes": ["repo:read"], "purpose": "t"})
    assert token["units_remaining"] == 2
    clock.set(clock.now().replace(year=2025))
    assert (await refused(client, "buy_quota", BUY)).startswith("[listing_closed] ")


async def test_sold_out_when_supply_is_short(client: Client, runtime: Runtime) -> None:
    specs = parse_listings(
        {"listing": [{"id": "tiny", "title": "Tiny", "connection": "github", "scopes": ["repo:read"],
                      "supply": 2, "start_price": 1, "floor_price": 1,
                      "opens_at": datetime(2026, 1, 1, tzinfo=UTC), "closes_at": datetime(2030, 1, 1, tzinfo=UTC)}]}
    )
    await runtime.db.write(lambda tx: market.load(tx, specs))
    await ok(client, "buy_quota", {"listing_id": "tiny", "units": 2, "max_unit_price": 1})
    text = await refused(client, "buy_quota", {"listing_id": "tiny", "units": 1, "max_unit_price": 1})
    assert text.startswith("[sold_out] ")


async def test_insufficient_funds_changes_nothing(client: Client, runtime: Runtime) -> None:
    before = await ok(client, "check_balance", {})
    text = await refused(client, "buy_quota", {"listing_id": "github-repo-write", "units": 10_000,
                                                "max_unit_price": 1000})
    assert text.startswith("[insufficient_funds] ") or text.startswith("[sold_out] ")
    text = await refused(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1000,
                                                "max_unit_price": 1000})
    assert text.startswith("[insufficient_funds] ")
    after = await ok(client, "check_balance", {})
    assert (after["balance"], after["holdings"]) == (before["balance"], before["holdings"])
    assert await runtime.db.read(check_invariants) == []


async def test_price_above_limit(client: Client) -> None:
    text = await refused(client, "buy_quota", {**BUY, "max_unit_price": 1})
    assert text.startswith("[price_above_limit] ")
    assert "max_unit_price" in text


async def test_bad_arguments_are_invalid_argument(client: Client) -> None:
    for args in (
        {**BUY, "units": 0},
        {**BUY, "units": 10_001},
        {**BUY, "max_unit_price": -1},
        {"listing_id": "github-repo-read", "units": 1},
        {**BUY, "idempotency_key": ""},
        {**BUY, "idempotency_key": "k" * 129},
        {**BUY, "units": "three"},
        {**BUY, "account": "someone-else"},
        {**BUY, "listing_id": "Robert'); DROP TABLE listings;--"},
    ):
        assert (await refused(client, "buy_quota", args)).startswith("[invalid_argument] "), args
    assert await balance(client) == 10_000
