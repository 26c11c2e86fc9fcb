"""Ledger rules that no tool reaches directly: operator credits and their bounds."""

from __future__ import annotations

import pytest

from server import ledger, market
from server.broker import Broker
from server.demo import demo_listings
from server.errors import InvalidArgument
from server.invariants import check_invariants
from server.ledger import MAX_BALANCE, MAX_CREDIT
from server.store import Database, Tx
from tests.conftest import DEMO_NOW, side

pytestmark = pytest.mark.both_backends


async def test_credits_are_capped_so_balances_never_overflow(db: Database) -> None:
    broker = Broker(db)
    for bad in (0, -5, MAX_CREDIT + 1):
        with pytest.raises(InvalidArgument):
            await broker.credit("auth0|big", bad)
    for _ in range(MAX_BALANCE // MAX_CREDIT):
        await broker.credit("auth0|big", MAX_CREDIT)
    with pytest.raises(InvalidArgument):
        await broker.credit("auth0|big", 1)
    assert await db.read(lambda tx: tx.balance("auth0|big")) == MAX_BALANCE
    assert await db.read(check_invariants) == []


async def test_system_accounts_cannot_be_credited(db: Database) -> None:
    for account in ("market", "mint"):
        with pytest.raises(InvalidArgument):
            await Broker(db).credit(account, 10)


async def test_a_settled_reservation_forgets_its_owner(db: Database, database: str) -> None:
    """The owning process (host:pid:start) matters only while a unit is reserved: settled rows drop it."""
    await db.write(lambda tx: market.load(tx, demo_listings()))
    await Broker(db).credit("auth0|r", 10_000)
    await db.write(lambda tx: ledger.buy(tx, "auth0|r", "github-repo-read", 2, 10_000, None, DEMO_NOW))

    def reserve(tx: Tx) -> str:
        return ledger.reserve(tx, "auth0|r", "github", ["repo:read"], "h:1:2", DEMO_NOW)[0]

    first, second = await db.write(reserve), await db.write(reserve)
    assert await db.write(lambda tx: ledger.settle(tx, first, committed=True, now=DEMO_NOW))
    owners = await db.read(lambda tx: [r.owner for r in tx.pending_reservations()])
    assert owners == ["h:1:2"]  # the pending one keeps it (recovery at start needs it)
    assert await db.write(lambda tx: ledger.settle(tx, second, committed=False, now=DEMO_NOW))
    assert await db.read(lambda tx: tx.pending_reservations()) == []
    with side(database) as conn:
        assert conn.execute("SELECT owner FROM reservations") == [("",), ("",)]


async def test_a_free_unit_is_bought_with_no_transfer_and_the_books_still_balance(db: Database) -> None:
    specs = market.parse_listings({"listing": [{
        "id": "free", "title": "Free", "connection": "github", "scopes": ["repo:read"], "supply": 3,
        "start_price": 0, "floor_price": 0, "opens_at": DEMO_NOW.replace(year=2026, month=1, day=1),
        "closes_at": DEMO_NOW.replace(year=2030),
    }]})
    await db.write(lambda tx: market.load(tx, specs))
    await db.write(lambda tx: ledger.credit(tx, "auth0|a", 5, DEMO_NOW))
    first = await db.write(lambda tx: ledger.buy(tx, "auth0|a", "free", 2, 0, "k", DEMO_NOW))
    again = await db.write(lambda tx: ledger.buy(tx, "auth0|a", "free", 2, 0, "k", DEMO_NOW))
    second = await db.write(lambda tx: ledger.buy(tx, "auth0|a", "free", 1, 0, None, DEMO_NOW))
    assert (first.total, first.units_held, first.balance_after) == (0, 2, 5)
    assert again == first and second.units_held == 3
    assert await db.read(lambda tx: tx.balance("auth0|a")) == 5
    rows = await db.read(lambda tx: tx._x("SELECT transfer_id FROM purchases ORDER BY purchased_at, id").fetchall())
    assert [r[0] for r in rows] == [None, None]  # no transfer to point at
    assert await db.read(check_invariants) == []
