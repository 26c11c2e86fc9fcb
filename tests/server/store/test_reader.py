"""`Database.reader()`: long read-only jobs that stall neither the event loop nor the writers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server import ledger
from server.clock import SystemClock
from server.store import Database, StoreUnavailable, Tx

pytestmark = pytest.mark.both_backends


async def test_a_long_read_on_the_reader_lets_writes_commit_meanwhile(db: Database) -> None:
    await db.write(lambda tx: ledger.credit(tx, "auth0|alice", 5, SystemClock().now()))
    entered, release = threading.Event(), threading.Event()

    def slow(tx: Tx) -> int | None:
        entered.set()
        assert release.wait(10)  # a scan of a million events, say
        return tx.balance("auth0|alice")

    reading = asyncio.ensure_future(db.reader().read(slow))
    assert await asyncio.to_thread(entered.wait, 10)
    # the loop is free and no write lock is held: a write commits while the read is still under way
    after = await asyncio.wait_for(db.write(lambda tx: ledger.credit(tx, "auth0|alice", 7, SystemClock().now())), 5)
    assert after == 12 and not reading.done()
    release.set()
    assert await reading in (5, 12)  # its own snapshot (SQLite: from before the write)
    assert await db.reader().read(lambda tx: tx.balance("auth0|alice")) == 12


@pytest.mark.sqlite_only
async def test_the_sqlite_reader_cannot_write(db: Database) -> None:
    with pytest.raises(StoreUnavailable):
        await db.reader().read(lambda tx: tx.ensure_wallet("auth0|mallory"))
    with pytest.raises(StoreUnavailable):
        await db.reader().write(lambda tx: None)
    assert await db.read(lambda tx: tx.balance("auth0|mallory")) is None
