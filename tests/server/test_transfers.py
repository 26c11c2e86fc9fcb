"""Operator moves of credits and units (SPEC §11): double-entry, audited on both accounts, idempotent,
refused without funds or units with nothing changed, and conserved when moves race (two stores at once)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from mcp import Client

from server import ledger, market
from server.app import Runtime
from server.broker import Broker
from server.demo import demo_listings
from server.errors import (
    BrokerError,
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidArgument,
    NoQuota,
    UnknownListing,
)
from server.invariants import check_invariants
from server.models import Grant
from server.store import AuditFilter, Database, Tx, open_database
from tests.conftest import DEMO_NOW, ok, refused, side

pytestmark = pytest.mark.both_backends

OPERATOR = "console:ops@example.com"
LISTING = "github-repo-read"
LEDGER_TABLES = ("accounts", "transfers", "holdings", "purchases", "moves", "listings", "reservations", "grants")


async def funded(db: Database, **wallets: int) -> Broker:
    """A broker on `db` with the demo market and each named wallet credited."""
    await db.write(lambda tx: market.load(tx, demo_listings()))
    broker = Broker(db)
    for account, amount in wallets.items():
        await broker.credit(account, amount)
    return broker


async def bought(db: Database, account: str, units: int) -> None:
    await db.write(lambda tx: ledger.buy(tx, account, LISTING, units, 10_000, None, DEMO_NOW))


def snapshot(database: str) -> dict[str, list[tuple[Any, ...]]]:
    with side(database) as conn:
        return {t: sorted(conn.execute(f"SELECT * FROM {t}"), key=repr) for t in LEDGER_TABLES}


def held(database: str, account: str) -> int:
    with side(database) as conn:
        rows = conn.execute("SELECT units_held FROM holdings WHERE account = ? AND listing_id = ?", (account, LISTING))
    return rows[0][0] if rows else 0


async def events(db: Database, tool: str) -> list[tuple[str | None, str | None, str, dict[str, Any]]]:
    found = await db.read(lambda tx: tx.find_audit(AuditFilter(tool=tool)))
    return [(e.account, e.agent, e.outcome, json.loads(e.args)) for e in found]


async def test_credits_move_with_one_transfer_and_an_event_on_each_account(db: Database) -> None:
    broker = await funded(db, alice=100)
    move = await broker.transfer_credits(OPERATOR, "alice", "bob", 30)
    assert (move.kind, move.from_account, move.to_account, move.amount) == ("credits", "alice", "bob", 30)
    assert (move.from_after, move.to_after, move.operator, move.replayed) == (70, 30, OPERATOR, False)
    assert await db.read(lambda tx: (tx.balance("alice"), tx.balance("bob"))) == (70, 30)
    recorded = await events(db, "wallet_transfer")
    assert [(account, agent, outcome, args["side"]) for account, agent, outcome, args in recorded] == [
        ("alice", "operator", "ok", "from"), ("bob", "operator", "ok", "to")
    ]
    for _, _, _, args in recorded:
        assert args["operator"] == OPERATOR and args["move_id"] == move.move_id and args["amount"] == 30
        assert (args["from_account"], args["to_account"]) == ("alice", "bob")
    assert await db.read(check_invariants) == []


async def test_units_move_to_a_holding_of_the_same_listing_and_the_receiver_spends_them(
    runtime: Runtime, client: Client, database: str
) -> None:
    me = (await ok(client, "check_balance", {}))["account"]
    broker = runtime.broker
    await broker.credit("auth0|seller", 1_000)
    await bought(runtime.db, "auth0|seller", 3)
    move = await broker.transfer_units(OPERATOR, "auth0|seller", me, LISTING, 2)
    assert (move.kind, move.listing_id, move.amount, move.from_after, move.to_after) == ("units", LISTING, 2, 1, 2)
    holdings = (await ok(client, "check_balance", {}))["holdings"]
    assert [(h["listing_id"], h["units_remaining"]) for h in holdings] == [(LISTING, 2)]
    for _ in range(2):  # a moved unit pays for a token as a bought one does
        await ok(client, "request_token", {"connection": "github", "scopes": ["repo:read"], "purpose": "moved"})
    assert "[no_quota]" in await refused(
        client, "request_token", {"connection": "github", "scopes": ["repo:read"], "purpose": "none left"}
    )
    assert held(database, "auth0|seller") == 1
    recorded = await events(runtime.db, "quota_transfer")
    assert [(a, args["side"], args["units"]) for a, _, _, args in recorded] == [
        ("auth0|seller", "from", 2), (me, "to", 2)
    ]
    assert await runtime.db.read(check_invariants) == []


async def test_reserved_units_stay_and_only_held_ones_move(db: Database, database: str) -> None:
    broker = await funded(db, alice=1_000)
    await bought(db, "alice", 2)
    await db.write(lambda tx: ledger.reserve(tx, "alice", "github", ["repo:read"], "h:1:2", DEMO_NOW))
    with pytest.raises(NoQuota, match="1 more are reserved"):
        await broker.transfer_units(OPERATOR, "alice", "bob", LISTING, 2)
    assert (await broker.transfer_units(OPERATOR, "alice", "bob", LISTING, 1)).to_after == 1
    with side(database) as conn:
        assert conn.execute(
            "SELECT account, units_bought, units_held, units_reserved FROM holdings ORDER BY account"
        ) == [("alice", 1, 0, 1), ("bob", 1, 1, 0)]
    assert await db.read(check_invariants) == []


async def test_a_live_grant_stays_with_the_account_that_paid_for_it(db: Database, database: str) -> None:
    """A grant (§8) was one unit spent: moving the holding's other units leaves it where it is."""
    broker = await funded(db, alice=1_000)
    await bought(db, "alice", 3)

    def open_grant(tx: Tx) -> str:
        rid, holding = ledger.reserve(tx, "alice", "github", ["repo:read"], "h:1:2", DEMO_NOW)
        assert ledger.settle(tx, rid, committed=True, now=DEMO_NOW)
        tx.insert_grant(Grant("gr_1", "alice", "agent-a", "github", ("repo:read",), None, holding.id, rid,
                              bytes(32), DEMO_NOW, DEMO_NOW + timedelta(minutes=10)))
        return rid

    await db.write(open_grant)
    await broker.transfer_units(OPERATOR, "alice", "bob", LISTING, 2)
    live = await db.read(lambda tx: (tx.live_grants("alice", "agent-a", DEMO_NOW),
                                     tx.live_grants("bob", "agent-a", DEMO_NOW)))
    assert [g.id for g in live[0]] == ["gr_1"] and live[1] == []
    with side(database) as conn:
        assert conn.execute("SELECT g.account, h.account FROM grants g JOIN holdings h ON h.id = g.holding_id") == [
            ("alice", "alice")
        ]
        assert conn.execute("SELECT account, units_held, units_consumed FROM holdings ORDER BY account") == [
            ("alice", 0, 1), ("bob", 2, 0)
        ]


@pytest.mark.parametrize(
    ("move", "error"),
    [
        (lambda b: b.transfer_credits(OPERATOR, "alice", "bob", 10_000), InsufficientFunds),
        (lambda b: b.transfer_credits(OPERATOR, "nobody", "bob", 1), InsufficientFunds),
        (lambda b: b.transfer_credits(OPERATOR, "alice", "alice", 1), InvalidArgument),
        (lambda b: b.transfer_credits(OPERATOR, "alice", "mint", 1), InvalidArgument),
        (lambda b: b.transfer_credits(OPERATOR, "market", "bob", 1), InvalidArgument),
        (lambda b: b.transfer_credits(OPERATOR, "alice", "bob", 0), InvalidArgument),
        (lambda b: b.transfer_credits(OPERATOR, "alice", "bob", -4), InvalidArgument),
        (lambda b: b.transfer_credits(OPERATOR, "alice", "bob", 1, "k" * 129), InvalidArgument),
        (lambda b: b.transfer_units(OPERATOR, "alice", "bob", LISTING, 4), NoQuota),
        (lambda b: b.transfer_units(OPERATOR, "bob", "alice", LISTING, 1), NoQuota),
        (lambda b: b.transfer_units(OPERATOR, "alice", "bob", "no-such-listing", 1), UnknownListing),
        (lambda b: b.transfer_units(OPERATOR, "alice", "market", LISTING, 1), InvalidArgument),
        (lambda b: b.transfer_units(OPERATOR, "alice", "alice", LISTING, 1), InvalidArgument),
        (lambda b: b.transfer_credits(OPERATOR, "alice", "bob", 5, "used"), IdempotencyKeyReused),
        (lambda b: b.transfer_units(OPERATOR, "alice", "bob", LISTING, 1, "used"), IdempotencyKeyReused),
    ],
    ids=["short-of-funds", "no-wallet", "same-wallet", "to-mint", "from-market", "zero", "negative",
         "long-key", "short-of-units", "no-holding", "unknown-listing", "units-to-market", "same-holder",
         "key-reused-credits", "key-reused-units"],
)
async def test_a_refused_move_changes_nothing_and_is_one_denied_event(
    db: Database, database: str, move: Any, error: type[BrokerError]
) -> None:
    broker = await funded(db, alice=1_000)
    await bought(db, "alice", 3)
    await broker.transfer_credits(OPERATOR, "alice", "carol", 4, "used")
    before = snapshot(database)
    audit_before = await db.read(lambda tx: tx.audit_count())
    with pytest.raises(error):
        await move(broker)
    assert snapshot(database) == before
    assert await db.read(lambda tx: tx.audit_count()) == audit_before + 1
    (last,) = await db.read(lambda tx: tx.find_audit(AuditFilter(), limit=1, newest_first=True))
    assert (last.outcome, last.code, last.agent) == ("denied", error.code, "operator")
    assert json.loads(last.args)["operator"] == OPERATOR
    assert await db.read(check_invariants) == []


@pytest.mark.parametrize("name", ["", "  ", "two\nlines", "x" * 201])
async def test_operator_and_account_names_are_one_bounded_line(db: Database, database: str, name: str) -> None:
    broker = await funded(db, alice=100)
    before = snapshot(database)
    for move in (broker.transfer_credits(name, "alice", "bob", 1), broker.transfer_credits(OPERATOR, "alice", name, 1),
                 broker.transfer_units(OPERATOR, name, "bob", LISTING, 1)):
        with pytest.raises(InvalidArgument):
            await move
    assert snapshot(database) == before
    refusals = await db.read(lambda tx: tx.find_audit(AuditFilter(outcome="denied")))
    # a refused sender's name is not written as an account (it may be anything a console was sent)
    assert [(e.account, e.tool) for e in refusals] == [
        ("alice", "wallet_transfer"), ("alice", "wallet_transfer"), (None, "quota_transfer")
    ]


async def test_the_same_key_again_answers_the_first_move_and_moves_nothing(db: Database) -> None:
    broker = await funded(db, alice=1_000)
    await bought(db, "alice", 3)
    first = await broker.transfer_credits(OPERATOR, "alice", "bob", 30, "pay-bob")
    again = await broker.transfer_credits("cli:someone-else", "alice", "bob", 30, "pay-bob")
    assert again.replayed and again.move_id == first.move_id
    assert (again.from_after, again.to_after, again.operator) == (first.from_after, first.to_after, OPERATOR)
    units = await broker.transfer_units(OPERATOR, "alice", "bob", LISTING, 2, "units-bob")
    assert (await broker.transfer_units(OPERATOR, "alice", "bob", LISTING, 2, "units-bob")).move_id == units.move_id
    with pytest.raises(IdempotencyKeyReused):  # a key names one move: not another kind, not other accounts
        await broker.transfer_units(OPERATOR, "alice", "bob", LISTING, 2, "pay-bob")
    with pytest.raises(IdempotencyKeyReused):
        await broker.transfer_credits(OPERATOR, "alice", "carol", 30, "pay-bob")
    balances = await db.read(lambda tx: (tx.balance("bob"), len(tx.moves())))
    assert balances == (30, 2)
    replays = [args for _, _, outcome, args in await events(db, "wallet_transfer") if args.get("replayed")]
    assert [(r["move_id"], r["side"]) for r in replays] == [(first.move_id, "from")]
    assert await db.read(check_invariants) == []


async def test_moves_racing_for_the_last_credits_and_units_on_two_stores_conserve_them(
    db: Database, database: str
) -> None:
    """Two stores on one database (two processes, or two replicas on PostgreSQL) move at once: exactly as
    many moves succeed as the funds and units allow, and the books still balance."""
    broker = await funded(db, alice=10_000)
    await bought(db, "alice", 5)
    before = await db.read(lambda tx: tx.balance("alice"))
    assert before is not None
    other_db = await open_database(database)
    try:
        brokers = (broker, Broker(other_db))
        spare = before - 10  # leaves 10: three moves of 3 fit, the fourth does not
        await broker.transfer_credits(OPERATOR, "alice", "reserve", spare)
        credit_moves = [brokers[i % 2].transfer_credits(OPERATOR, "alice", f"to{i}", 3) for i in range(8)]
        unit_moves = [brokers[i % 2].transfer_units(OPERATOR, "alice", f"to{i}", LISTING, 2) for i in range(6)]
        same_key = [brokers[i % 2].transfer_credits(OPERATOR, "reserve", "bob", 1, "once") for i in range(4)]
        outcomes = await asyncio.gather(*credit_moves, *unit_moves, *same_key, return_exceptions=True)
    finally:
        await other_db.close()
    credits, units, keyed = outcomes[:8], outcomes[8:14], outcomes[14:]
    assert sum(not isinstance(o, BaseException) for o in credits) == 3
    assert all(isinstance(o, InsufficientFunds) for o in credits if isinstance(o, BaseException))
    assert sum(not isinstance(o, BaseException) for o in units) == 2
    assert all(isinstance(o, NoQuota) for o in units if isinstance(o, BaseException))
    assert not any(isinstance(o, BaseException) for o in keyed)
    assert len({o.move_id for o in keyed if not isinstance(o, BaseException)}) == 1
    assert await db.read(lambda tx: (tx.balance("alice"), tx.balance("bob"))) == (1, 1)
    assert held(database, "alice") == 1
    assert await db.read(check_invariants) == []
