"""Ledger rules that no tool reaches directly: operator credits and their bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.broker import Broker
from server.errors import InvalidArgument
from server.invariants import check_invariants
from server.ledger import MAX_BALANCE, MAX_CREDIT
from server.store import Database


async def test_credits_are_capped_so_balances_never_overflow(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "cap.db")
    try:
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
    finally:
        await db.close()


async def test_system_accounts_cannot_be_credited(tmp_path: Path) -> None:
    db = await Database.open(tmp_path / "sys.db")
    try:
        for account in ("market", "mint"):
            with pytest.raises(InvalidArgument):
                await Broker(db).credit(account, 10)
    finally:
        await db.close()
