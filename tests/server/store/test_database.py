"""Group commit: jobs batch into one transaction, each in its own savepoint; audit name ids stay true.

The claims about names and savepoints hold on both backends; how SQLite's writer leads, runs inline
and waits for its file's write lock is SQLite's alone (PostgreSQL's own: test_postgres.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server import audit
from server.audit import Event
from server.store import Database, StoreUnavailable, Tx, open_database
from server.store.database import SOLO_CALLS
from tests.conftest import side

pytestmark = pytest.mark.both_backends
SQLITE_WRITER = pytest.mark.sqlite_only  # how SQLite's one connection leads, batches inline and waits for the file lock


def event(account: str) -> Event:
    return Event(ts="2026-11-01T00:00:00.000000Z", transport="stdio", outcome="ok", account=account, tool="t")


def append_then_fail(account: str):  # type: ignore[no-untyped-def]
    def job(tx: Tx) -> None:
        audit.append(tx, event(account))
        raise RuntimeError("the job's own failure")

    return job


async def test_a_failed_jobs_new_name_is_not_remembered(db: Database) -> None:
    with pytest.raises(RuntimeError):
        await db.write(append_then_fail("auth0|ghost"))
    # the name's row was rolled back; a later, different name may take its id
    await db.write(lambda tx: audit.append(tx, event("auth0|real")))
    await db.write(lambda tx: audit.append(tx, event("auth0|ghost")))
    result = await db.read(audit.verify_log)
    assert (result.ok, result.checked) == (True, 2)
    accounts = await db.read(lambda tx: [r.account for r in tx.iter_audit()])
    assert accounts == ["auth0|real", "auth0|ghost"]


async def test_concurrent_jobs_share_one_transaction_and_fail_alone(db: Database) -> None:
    jobs = [append_then_fail(f"auth0|bad-{n}") if n % 3 == 0 else
            (lambda tx, n=n: audit.append(tx, event(f"auth0|good-{n % 4}"))) for n in range(30)]
    outcomes = await asyncio.gather(*(db.write(job) for job in jobs), return_exceptions=True)
    assert sum(isinstance(o, RuntimeError) for o in outcomes) == 10
    assert sorted(o for o in outcomes if isinstance(o, int)) == list(range(1, 21))
    result = await db.read(audit.verify_log)
    assert (result.ok, result.checked) == (True, 20)
    names = await db.read(lambda tx: sorted(tx.audit_names().values()))
    assert names == ["auth0|good-0", "auth0|good-1", "auth0|good-2", "auth0|good-3", "ok", "stdio", "t"]


async def test_names_added_by_another_process_are_found(db: Database, database: str) -> None:
    await db.write(lambda tx: audit.append(tx, event("auth0|one")))
    other = await open_database(database)  # e.g. a CLI command next to the server, or another replica
    try:
        await other.write(lambda tx: audit.append(tx, event("auth0|two")))
    finally:
        await other.close()
    await db.write(lambda tx: audit.append(tx, event("auth0|two")))
    await db.write(lambda tx: audit.append(tx, event("auth0|three")))
    with side(database) as conn:
        rows = conn.execute("SELECT account FROM audit_events ORDER BY id")
    assert rows == [("auth0|one",), ("auth0|two",), ("auth0|two",), ("auth0|three",)]
    assert (await db.read(audit.verify_log)).ok


@SQLITE_WRITER
async def test_one_job_at_a_time_runs_inline_and_still_fails_alone(db: Database) -> None:
    assert await db.write(lambda tx: audit.append(tx, event("auth0|one"))) == 1
    assert db._writer is None  # no writer task, no future: run in the caller's own turn
    with pytest.raises(RuntimeError, match="own failure"):
        await db.write(append_then_fail("auth0|ghost"))
    assert await db.write(lambda tx: audit.append(tx, event("auth0|two"))) == 2
    assert (await db.read(audit.verify_log)).ok
    names = await db.read(lambda tx: sorted(tx.audit_names().values()))
    assert "auth0|ghost" not in names


async def test_a_job_waits_for_a_group_commit_under_way(db: Database) -> None:
    batch = [asyncio.ensure_future(db.write(lambda tx, n=n: audit.append(tx, event(f"auth0|{n}")))) for n in range(5)]
    await asyncio.sleep(0)  # the writer has taken the batch to its thread
    late = await db.write(lambda tx: audit.append(tx, event("auth0|late")))
    assert sorted(await asyncio.gather(*batch)) == [1, 2, 3, 4, 5] and late == 6
    result = await db.read(audit.verify_log)
    assert (result.ok, result.checked) == (True, 6)


@SQLITE_WRITER
async def test_a_job_that_cannot_begin_keeps_nothing(db: Database, db_path: Path) -> None:
    side = sqlite3.connect(db_path, isolation_level=None)
    side.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    db.busy_timeout = 0.05
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            await db.write(lambda tx: audit.append(tx, event("auth0|one")))
    finally:
        side.execute("ROLLBACK")
        side.close()
    assert await db.write(lambda tx: audit.append(tx, event("auth0|one"))) == 1


@SQLITE_WRITER
async def test_jobs_ready_together_share_the_leaders_commit(db: Database, batch_sizes: list[int]) -> None:
    ids = await asyncio.gather(*(db.write(lambda tx, n=n: audit.append(tx, event(f"auth0|{n}"))) for n in range(12)))
    assert sorted(ids) == list(range(1, 13)) and batch_sizes == [12]
    assert ids[0] == 1  # the leader's job comes first in its batch


@SQLITE_WRITER
async def test_a_leader_cancelled_before_its_job_ran_leaves_the_others_to_commit(db: Database) -> None:
    leader = asyncio.ensure_future(db.write(lambda tx: audit.append(tx, event("auth0|gone"))))
    follower = asyncio.ensure_future(db.write(lambda tx: audit.append(tx, event("auth0|stays"))))
    await asyncio.sleep(0)  # the leader waits one turn for company; the follower has joined it
    leader.cancel()
    assert await asyncio.wait_for(follower, 10) == 1
    with pytest.raises(asyncio.CancelledError):
        await leader
    accounts = await db.read(lambda tx: [r.account for r in tx.iter_audit()])
    assert accounts == ["auth0|stays"]
    assert await db.write(lambda tx: audit.append(tx, event("auth0|next"))) == 2  # nothing is left stuck


@SQLITE_WRITER
async def test_after_a_run_of_lone_calls_leaders_stop_waiting_but_still_probe(db: Database) -> None:
    waited: list[bool] = []
    for _ in range(3 * SOLO_CALLS):
        turned: list[int] = []
        asyncio.get_running_loop().call_soon(turned.append, 1)  # runs if the leader yields a turn
        await db.write(lambda tx, turned=turned: waited.append(bool(turned)))
    probe = [True] + [False] * (SOLO_CALLS - 1)
    assert waited == [True] * SOLO_CALLS + probe + probe


@SQLITE_WRITER
async def test_overlapping_calls_after_a_lone_run_share_commits_again(db: Database, batch_sizes: list[int]) -> None:
    for n in range(3 * SOLO_CALLS + 1):  # a long run of lone calls: leaders no longer wait
        await db.write(lambda tx, n=n: audit.append(tx, event(f"auth0|lone-{n}")))
    batch_sizes.clear()
    await asyncio.gather(*(db.write(lambda tx, n=n: audit.append(tx, event(f"auth0|{n}"))) for n in range(40)))
    assert sum(batch_sizes) == 40
    assert batch_sizes.count(1) < SOLO_CALLS and max(batch_sizes) > 1  # the next probe found company
    batch_sizes.clear()
    await asyncio.gather(*(db.write(lambda tx, n=n: audit.append(tx, event(f"auth0|{n}"))) for n in range(10)))
    assert batch_sizes == [10]  # and leaders wait for company again
    result = await db.read(audit.verify_log)
    assert (result.ok, result.checked) == (True, 3 * SOLO_CALLS + 1 + 50)


@SQLITE_WRITER
async def test_a_lock_held_elsewhere_is_waited_for_off_the_event_loop(db: Database, db_path: Path) -> None:
    side = sqlite3.connect(db_path, isolation_level=None)
    side.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        writes = [asyncio.ensure_future(db.write(lambda tx, n=n: audit.append(tx, event(f"auth0|{n}"))))
                  for n in range(5)]
        ticks = 0
        for _ in range(20):  # the loop keeps turning while the jobs wait for the lock
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20 and not any(w.done() for w in writes)
    finally:
        side.execute("ROLLBACK")
        side.close()
    assert sorted(await asyncio.gather(*writes)) == [1, 2, 3, 4, 5]
    assert await db.write(lambda tx: audit.append(tx, event("auth0|after"))) == 6
    assert db._writer is not None  # the waiting went through the worker thread
    result = await db.read(audit.verify_log)
    assert (result.ok, result.checked) == (True, 6)


@SQLITE_WRITER
async def test_a_lone_call_that_finds_the_lock_held_waits_for_it_without_blocking_the_loop(
    db: Database, db_path: Path
) -> None:
    for n in range(3 * SOLO_CALLS):  # lone calls: leaders no longer wait a turn, they run inline at once
        await db.write(lambda tx, n=n: audit.append(tx, event(f"auth0|lone-{n}")))
    side = sqlite3.connect(db_path, isolation_level=None)
    side.execute("BEGIN IMMEDIATE")
    loop = asyncio.get_running_loop()
    started = loop.time()
    write = asyncio.ensure_future(db.write(lambda tx: audit.append(tx, event("auth0|waiting"))))
    await asyncio.sleep(0.05)
    blocked_for = loop.time() - started
    assert blocked_for < 1 and not write.done()  # the inline attempt gave up at once
    side.execute("ROLLBACK")
    side.close()
    assert await write == 3 * SOLO_CALLS + 1



async def test_a_rate_bucket_fills_takes_refuses_and_goes_into_debt_alike_on_both_backends(db: Database) -> None:
    # PostgreSQL takes a token in one upsert, SQLite reads the bucket and then writes it: the same arithmetic
    start = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)

    async def at(seconds: float, per_minute: int = 6, **kw: bool) -> float:
        moment = start + timedelta(seconds=seconds)
        return await db.write(lambda tx: tx.take_rate_token("auth0|a", "bot", per_minute, moment, **kw))

    async def tokens() -> float:
        return float(await db.read(lambda tx: tx._x("SELECT tokens FROM rate_buckets").fetchone()[0]))

    assert [await at(0) for _ in range(6)] == [0.0] * 6  # a new bucket starts full: 6 a minute
    assert await tokens() == 0.0
    assert await at(0) == pytest.approx(10.0)  # empty: the next token in 10 s, nothing taken
    assert (await at(5), await at(5, take=False)) == (pytest.approx(5.0), pytest.approx(5.0))
    assert await at(20) == 0.0  # refilled by 2, one taken
    assert (await at(20, take=False), await tokens()) == (0.0, 1.0)  # a look takes nothing
    assert await at(20) == 0.0
    assert await at(25, debt=True) == 0.0  # taken below zero
    assert await tokens() == pytest.approx(-0.5)
    assert await at(25) == pytest.approx(15.0)
    assert await at(24) == pytest.approx(15.0)  # a clock that went back refills nothing
    for _ in range(20):  # debt stops at one minute's worth
        assert await at(25, debt=True) == 0.0
    assert await tokens() == pytest.approx(1.0 - 6 - 1)
    assert await at(3600, per_minute=2) == 0.0  # refilled, capped at a lowered rate, one taken
    assert await tokens() == pytest.approx(1.0)


async def test_a_transfer_and_a_unit_taken_are_all_or_nothing_on_both_backends(db: Database) -> None:
    # one statement each on PostgreSQL, two on SQLite: the same outcome
    def setup(tx: Tx) -> int:
        for name in ("auth0|a", "auth0|b"):
            tx.ensure_wallet(name)
        tx.transfer("mint", "auth0|a", 10, "credit", None, "t0")
        tx._x("INSERT INTO listings(id, title, connection, scopes, supply, sold, start_price, floor_price, opens_at, "
              "closes_at, delivery, api, methods, approval) VALUES ('l', 'L', 'github', '[]', 5, 0, 1, 1, 0, 1, "
              "'token', '[]', '[]', 'none')")
        return tx.add_units("auth0|a", "l", 1, "t0").id

    holding = await db.write(setup)
    with pytest.raises(Exception):  # noqa: B017 - the backend's own integrity error: a wallet below zero
        await db.write(lambda tx: tx.transfer("auth0|a", "auth0|b", 11, "buy", None, "t1"))
    await db.write(lambda tx: tx.transfer("auth0|a", "auth0|a", 4, "to itself", None, "t1"))
    assert await db.read(lambda tx: (tx.balance("auth0|a"), tx.balance("auth0|b"))) == (10, 0)
    assert await db.write(lambda tx: tx.spend_unit(holding, "res_1", "t2"))
    assert not await db.write(lambda tx: tx.reserve_unit(holding, "res_2", "me", "t2"))  # none held any more
    assert await db.write(lambda tx: tx.add_units("auth0|a", "l", 2, "t3").units_held) == 2
    assert await db.write(lambda tx: tx.reserve_unit(holding, "res_3", "me", "t3"))
    rows = await db.read(
        lambda tx: tx._x("SELECT id, status, owner, settled_at FROM reservations ORDER BY id").fetchall()
    )
    assert [tuple(r) for r in rows] == [("res_1", "committed", "", "t2"), ("res_3", "pending", "me", None)]
    [h] = await db.read(lambda tx: tx.holdings_of("auth0|a"))
    assert (h.units_bought, h.units_held, h.units_consumed, h.units_reserved) == (3, 1, 1, 1)
