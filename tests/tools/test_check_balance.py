"""check_balance through the SDK client: only the caller's own wallet."""

from __future__ import annotations

import pytest
from mcp import Client

from server.app import Runtime
from tests.conftest import ok, refused

pytestmark = pytest.mark.both_backends


async def test_shows_the_demo_wallet_and_holdings(client: Client, runtime: Runtime) -> None:
    assert runtime.tenant is not None
    empty = await ok(client, "check_balance", {})
    assert empty["account"] == runtime.tenant.account
    assert empty["balance"] == 10_000
    assert empty["holdings"] == []
    await ok(client, "buy_quota", {"listing_id": "stripe-read-only", "units": 2, "max_unit_price": 100})
    after = await ok(client, "check_balance", {})
    assert after["holdings"] == [
        {"listing_id": "stripe-read-only", "connection": "stripe", "scopes": ["read_only"], "units_remaining": 2,
         "delivery": "token"}
    ]


async def test_no_argument_can_name_another_account(client: Client, runtime: Runtime) -> None:
    await runtime.broker.credit("auth0|someone-else", 777)
    text = await refused(client, "check_balance", {"account": "auth0|someone-else"})
    assert text.startswith("[invalid_argument] ")
    mine = await ok(client, "check_balance", {})
    assert mine["balance"] == 10_000
