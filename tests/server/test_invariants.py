"""The invariant checker catches each way the books can be broken behind the broker's back."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from mcp import Client

from server.app import Runtime
from server.invariants import check_invariants
from tests.conftest import Side, ok, side

pytestmark = pytest.mark.both_backends
Corruption = Callable[[Side], object]


async def history(client: Client) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 3, "max_unit_price": 100})
    await ok(client, "request_token", {"connection": "github", "scopes": ["repo:read"], "purpose": "p"})


async def history_with_moves(client: Client, runtime: Runtime) -> None:
    """The history, then an operator moves credits and one unit from the demo account to auth0|bob."""
    await history(client)
    me = (await ok(client, "check_balance", {}))["account"]
    await runtime.broker.transfer_credits("cli:ops", me, "auth0|bob", 50)
    await runtime.broker.transfer_units("cli:ops", me, "auth0|bob", "github-repo-read", 1)


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda db: db.execute("UPDATE accounts SET balance = balance + 5 WHERE name = 'auth0|demo-user'"),
         "balances sum to 5"),
        (lambda db: db.execute("DELETE FROM purchases"), "≠ its purchases"),
        (lambda db: db.execute("UPDATE listings SET sold = sold + 1 WHERE id = 'github-repo-read'"),
         "sold count differs"),
        (lambda db: db.execute("UPDATE reservations SET status = 'refunded'"), "reserved/consumed units differ"),
        (lambda db: db.execute(
            "DELETE FROM audit WHERE id IN (SELECT id FROM audit_events WHERE tool = 'request_token')"
        ), "ok request_token events, not 1"),
        (lambda db: db.execute(
            "UPDATE audit SET args = '{}' WHERE id IN (SELECT id FROM audit_events WHERE tool = 'buy_quota')"
        ), "audit chain broken"),
    ],
    ids=["money-from-nowhere", "purchase-erased", "phantom-sale", "consumed-unit-unrecorded", "token-event-erased",
         "audit-edited"],
)
async def test_each_corruption_is_named(
    client: Client, runtime: Runtime, database: str, corrupt: Corruption, expected: str
) -> None:
    await history(client)
    assert await runtime.db.read(check_invariants) == []
    with side(database) as other:
        if not other.postgres:
            other.execute("PRAGMA ignore_check_constraints = ON")
        corrupt(other)
    problems = await runtime.db.read(check_invariants)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda db: db.execute("UPDATE moves SET amount = amount + 1 WHERE kind = 'units'"),
         "≠ its purchases and moves"),
        (lambda db: db.execute("UPDATE holdings SET units_held = units_held + 1, units_bought = units_bought + 1 "
                               "WHERE account = 'auth0|bob'"), "units sold ≠ held + reserved + spent"),
        (lambda db: db.execute("UPDATE transfers SET amount = amount + 1 WHERE reason = 'wallet_transfer'"),
         "does not match its transfer"),
        (lambda db: db.execute("DELETE FROM moves WHERE kind = 'credits'"), "no operator move made it"),
        (lambda db: db.execute(
            "DELETE FROM audit WHERE id = (SELECT max(id) FROM audit_events WHERE tool = 'quota_transfer')"
        ), "not one on each of auth0|"),
    ],
    ids=["moved-units-miscounted", "units-from-nowhere", "moved-credits-miscounted", "move-erased",
         "move-event-erased"],
)
async def test_each_corruption_of_an_operator_move_is_named(
    client: Client, runtime: Runtime, database: str, corrupt: Corruption, expected: str
) -> None:
    await history_with_moves(client, runtime)
    assert await runtime.db.read(check_invariants) == []
    with side(database) as other:
        if not other.postgres:
            other.execute("PRAGMA ignore_check_constraints = ON")
        corrupt(other)
    problems = await runtime.db.read(check_invariants)
    assert any(expected in p for p in problems), problems
