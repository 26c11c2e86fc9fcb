"""PostgreSQL's own claims (server.store.postgres): the schema made once with its version, replicas writing one
database at once (no oversold listing, no wallet below zero, one charge per idempotency key, one verifiable audit
chain), whole-batch retries after a deadlock or a lost connection that keep exactly one event per effect, and
StoreUnavailable when the database cannot commit, with service back by itself afterwards."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from server import audit, ledger, market
from server.app import Runtime
from server.audit import Event
from server.broker import Broker, Call
from server.config import load_config
from server.demo import DEMO_ISSUER
from server.errors import BrokerError, ConfigError, InsufficientFunds, SoldOut
from server.invariants import check_invariants
from server.models import Receipt
from server.principal import Principal
from server.store import Database, DatabaseMissing, StoreUnavailable, Tx, open_database
from server.store.pg_schema import PG_SCHEMA_VERSION
from server.store.postgres import MAX_ATTEMPTS, PgDatabase
from tests.conftest import demo_client, ok, pg_database, side

NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)
SCOPES = frozenset({"read:market", "buy:quota", "read:balance", "request:token", "call:api"})


@pytest.fixture
def url(database: str) -> str:
    return database


@pytest.fixture
def backend() -> str:
    return "postgresql"


@pytest.fixture
async def replicas(url: str) -> AsyncIterator[tuple[PgDatabase, PgDatabase]]:
    """Two stores on one database, as two replicas of the broker would have."""
    first, second = await open_database(url), await open_database(url)
    assert isinstance(first, PgDatabase) and isinstance(second, PgDatabase)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def event(account: str) -> Event:
    return Event(ts="2027-06-01T12:00:00.000000Z", transport="http", outcome="ok", account=account, tool="t")


async def stock(db: Database, supply: int) -> None:
    specs = market.parse_listings({"listing": [{
        "id": "last-units", "title": "GitHub: read", "connection": "github", "scopes": ["repo:read"],
        "supply": supply, "start_price": 10, "floor_price": 10, "opens_at": datetime(2026, 1, 1, tzinfo=UTC),
        "closes_at": datetime(2030, 1, 1, tzinfo=UTC),
    }]})
    await db.write(lambda tx: market.load(tx, specs))


def buyer(account: str) -> Principal:
    return Principal(account, "agent", SCOPES)


async def buy(broker: Broker, account: str, key: str | None = None) -> str:
    call = Call("buy_quota", "buy:quota", "http", {"listing_id": "last-units", "units": 1})
    try:
        await broker.buy_quota(call, buyer(account), listing_id="last-units", units=1, max_unit_price=10,
                               idempotency_key=key)
    except BrokerError as error:
        return error.code
    return "ok"


# ---- the schema ----------------------------------------------------------------------------------

async def test_the_schema_is_made_once_with_its_version_while_replicas_start_together(url: str) -> None:
    stores = await asyncio.gather(*(open_database(url) for _ in range(4)))
    try:
        assert len({s.hmac_key for s in stores}) == 1  # one key: the one the first replica made
    finally:
        for store in stores:
            await store.close()
    with side(url) as other:
        assert other.execute("SELECT version FROM schema_version") == [(PG_SCHEMA_VERSION,)]
        assert other.execute("SELECT name, kind, balance FROM accounts ORDER BY name") == [
            ("market", "market", 0), ("mint", "mint", 0)]


async def test_a_schema_newer_than_the_program_is_refused(url: str) -> None:
    await (await open_database(url)).close()
    with side(url) as other:
        other.execute("UPDATE schema_version SET version = ?", (PG_SCHEMA_VERSION + 1,))
    with pytest.raises(StoreUnavailable, match="newer than this program"):
        await open_database(url)


async def test_reading_refuses_a_database_without_the_schema_and_leaves_it_empty() -> None:
    with pg_database() as empty:
        with pytest.raises(DatabaseMissing, match="no token-vault-mcp schema"):
            await open_database(empty, create=False)
        with side(empty) as other:
            assert other.execute("SELECT to_regclass('schema_version')") == [(None,)]


def cli(tmp_path: Path, database: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH0_", "TVM_"))}
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=tmp_path, env={**env, "TVM_DATABASE": database},
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_cli_refuses_to_read_a_database_without_the_schema_naming_tvm_database(tmp_path: Path) -> None:
    with pg_database() as empty:
        done = cli(tmp_path, empty, "audit", "verify")
    line = done.stderr.strip()
    assert done.returncode == 2
    assert "TVM_DATABASE" in line and "no token-vault-mcp schema" in line and "\n" not in line


def test_the_cli_verifies_the_log_on_postgresql(tmp_path: Path, url: str) -> None:
    assert cli(tmp_path, url, "wallet", "credit", "auth0|alice", "100").returncode == 0
    done = cli(tmp_path, url, "audit", "verify")
    assert done.returncode == 0 and "1" in done.stdout


def test_an_unreachable_database_is_one_line_without_its_password(tmp_path: Path) -> None:
    done = cli(tmp_path, "postgresql://postgres:hunter2@127.0.0.1:1/nowhere?connect_timeout=2", "audit", "verify")
    assert done.returncode == 1
    line = done.stderr.strip()
    assert line.startswith("token-vault-mcp: the database is unavailable: postgresql://postgres:***@127.0.0.1:1/")
    assert "hunter2" not in line and "\n" not in line


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("postgresql://u:pw@db.internal:54x2/vault", "port"),
        ("postgresql://u:pw@db.internal:5432/", "name the database"),
        ("postgresql://u:pw@db.internal/vault?nonsense=1", "nonsense"),
    ],
)
def test_a_wrong_database_url_names_tvm_database_and_hides_the_password(value: str, said: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config({"TVM_DATABASE": value}, dotenv=False)
    assert str(raised.value).startswith("TVM_DATABASE") and said in str(raised.value)
    assert "pw" not in str(raised.value).replace("postgresql", "")


def test_a_postgresql_url_selects_postgresql_and_any_other_value_a_sqlite_file(tmp_path: Path) -> None:
    url = load_config({"TVM_DATABASE": "postgresql://vault:s3cret@db.internal:5432/vault"}, dotenv=False)
    assert url.database_url == "postgresql://vault:s3cret@db.internal:5432/vault"
    assert "s3cret" not in repr(url)
    lite = load_config({"TVM_DATABASE": str(tmp_path / "postgresql.db")}, dotenv=False)
    assert lite.database_url is None and lite.database == tmp_path / "postgresql.db"


# ---- replicas on one database ------------------------------------------------------------------------

async def test_twenty_buyers_on_two_replicas_share_the_last_ten_units_exactly_once(
    replicas: tuple[PgDatabase, PgDatabase],
) -> None:
    a, b = replicas
    await stock(a, 10)
    brokers = (Broker(a), Broker(b))
    for n in range(20):
        await brokers[n % 2].credit(f"auth0|buyer-{n}", 10)
    outcomes = await asyncio.gather(*(buy(brokers[n % 2], f"auth0|buyer-{n}") for n in range(20)))
    assert sorted(outcomes) == ["ok"] * 10 + [SoldOut.code] * 10
    listing = await a.read(lambda tx: tx.get_listing("last-units"))
    assert listing is not None and listing.sold == 10
    assert await b.read(check_invariants) == []
    result = await b.read(audit.verify_log)
    assert result.ok and result.checked == 20 + 20  # the credits and every call, refusals included


async def test_one_wallet_racing_on_two_replicas_is_spent_to_zero_and_never_below(
    replicas: tuple[PgDatabase, PgDatabase],
) -> None:
    a, b = replicas
    await stock(a, 100)
    brokers = (Broker(a), Broker(b))
    await brokers[0].credit("auth0|one", 70)  # seven units' worth
    outcomes = await asyncio.gather(*(buy(brokers[n % 2], "auth0|one") for n in range(20)))
    assert sorted(outcomes) == [InsufficientFunds.code] * 13 + ["ok"] * 7
    assert await a.read(lambda tx: tx.balance("auth0|one")) == 0
    assert await a.read(check_invariants) == []
    assert (await b.read(audit.verify_log)).ok


async def test_one_idempotency_key_racing_on_two_replicas_charges_once(
    replicas: tuple[PgDatabase, PgDatabase],
) -> None:
    a, b = replicas
    await stock(a, 100)
    brokers = (Broker(a), Broker(b))
    await brokers[0].credit("auth0|retry", 1000)
    outcomes = await asyncio.gather(*(buy(brokers[n % 2], "auth0|retry", key="same-key") for n in range(10)))
    assert outcomes == ["ok"] * 10  # every retry answered with the one receipt
    assert await a.read(lambda tx: tx.balance("auth0|retry")) == 990
    assert await a.read(check_invariants) == []


async def test_events_written_by_two_replicas_make_one_gap_free_chain(replicas: tuple[PgDatabase, PgDatabase]) -> None:
    a, b = replicas
    ids = await asyncio.gather(*(
        (a if n % 2 else b).write(lambda tx, n=n: audit.append(tx, event(f"auth0|{n % 5}"))) for n in range(60)
    ))
    assert sorted(ids) == list(range(1, 61))
    for store in (a, b):
        result = await store.read(audit.verify_log)
        assert (result.ok, result.checked) == (True, 60)
    accounts = await a.read(lambda tx: {r.account for r in tx.iter_audit()})
    assert accounts == {f"auth0|{n}" for n in range(5)}  # each name once in audit_names, whoever added it



async def test_events_travel_with_the_commit_after_a_begin_that_read_the_head_under_the_lock(
    replicas: tuple[PgDatabase, PgDatabase], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = replicas
    await a.write(lambda tx: audit.append(tx, event("auth0|x")))  # its names are known from here on
    await b.write(lambda tx: audit.append(tx, event("auth0|x")))  # the head moved behind a's back
    sent = round_trips(monkeypatch)
    assert await a.write(lambda tx: [audit.append(tx, event("auth0|x")) for _ in range(2)]) == [3, 4]
    monkeypatch.undo()
    begin, rest = sent  # two round trips: the first event needs the head, the rest goes with the COMMIT
    assert begin.split(";\n")[1:] == ["SELECT id FROM write_lock WHERE id = 1 FOR UPDATE",
                                      "SELECT text, bytes FROM meta WHERE key = 'audit_head'"]
    *events, commit = rest.split(";\n")  # (no event's values hold ";\n")
    assert commit == "COMMIT"
    assert len(events) == 2 and all(s.startswith("WITH head AS (INSERT INTO meta") for s in events)
    result = await b.read(audit.verify_log)
    assert (result.ok, result.checked) == (True, 4)


def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each round trip of the store's connections sends from now on: the text of a query (its values
    after " -- "), or of a pipeline's statements joined by ";\\n" (as a query of several statements is written)."""
    sent: list[str] = []
    collecting: dict[int, list[str]] = {}
    real_execute, real_pipeline = psycopg.Connection.execute, psycopg.Connection.pipeline

    def execute(conn: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        if threading.current_thread().name.startswith("tvm-pg"):  # the store's threads (not the test's helpers)
            collecting.get(id(conn), sent).append(str(query) + ("" if params is None else f" -- {params!r}"))
        return real_execute(conn, query, params, **kw)

    @contextmanager
    def pipeline(conn: Any) -> Iterator[Any]:
        statements = collecting[id(conn)] = []
        try:
            with real_pipeline(conn) as p:
                yield p
        finally:
            del collecting[id(conn)]
            if statements:
                sent.append(";\n".join(statements))

    monkeypatch.setattr(psycopg.Connection, "execute", execute)
    monkeypatch.setattr(psycopg.Connection, "pipeline", pipeline)
    return sent


async def test_savepoints_travel_with_the_next_statement_and_still_undo_what_ran_inside_them(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await open_database(url)

    def job(tx: Tx) -> list[str | None]:
        tx.savepoint()
        tx.ensure_wallet("auth0|kept")  # a blind write: it waits
        empty = tx.savepoint()
        tx.rollback_savepoint(empty)  # nothing ran inside: nothing sent
        tx.savepoint()
        tx.release_savepoint()  # nor here
        inner = tx.savepoint()
        tx.ensure_wallet("auth0|dropped")  # never sent: its savepoint is rolled back before anything went
        tx.rollback_savepoint(inner)
        inner = tx.savepoint()
        tx.ensure_wallet("auth0|undone")
        before = tx.account_kind("auth0|undone")  # 1: BEGIN … SAVEPOINT, the writes, this read
        tx.rollback_savepoint(inner)  # ROLLBACK TO and RELEASE wait for the next statement
        tx.savepoint()
        tx.ensure_wallet("auth0|released")
        tx.release_savepoint()
        kinds = [tx.account_kind(n) for n in ("auth0|kept", "auth0|dropped", "auth0|undone", "auth0|released")]
        tx.release_savepoint()
        return [before, *kinds]  # 2, 3, 4, 5; then 6: COMMIT

    try:
        sent = round_trips(monkeypatch)
        assert await db.write(job) == ["wallet", "wallet", None, None, "wallet"]
        monkeypatch.undo()
        assert len(sent) == 6 and sent[-1] == "RELEASE atomic;\nCOMMIT", sent
        assert sent[0].startswith("BEGIN") and "auth0|kept" in sent[0] and "auth0|dropped" not in sent[0], sent
        assert sent[1].startswith("ROLLBACK TO atomic;\nRELEASE atomic;\nINSERT INTO accounts"), sent
        assert await db.read(lambda tx: [tx.account_kind(n) for n in ("auth0|kept", "auth0|undone")]) == [
            "wallet", None]
    finally:
        await db.close()


async def test_a_job_that_sends_nothing_begins_no_transaction(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = await open_database(url)
    try:
        sent = round_trips(monkeypatch)
        assert await db.write(lambda tx: tx.savepoint() and None) is None
        assert await db.read(lambda tx: 7) == 7
        monkeypatch.undo()
        assert sent == []
    finally:
        await db.close()


async def test_a_deferred_write_that_fails_fails_its_own_job_in_a_batch_and_not_the_next(url: str) -> None:
    db = await open_database(url)
    try:
        await db.write(lambda tx: tx.ensure_wallet("auth0|a"))

        def bad(tx: Tx) -> None:
            tx.ensure_wallet("auth0|bad")
            tx._w("INSERT INTO accounts(name, kind) VALUES (?, 'wallet')", ("auth0|a",))  # a duplicate key

        def good(tx: Tx) -> str | None:
            tx.ensure_wallet("auth0|good")
            return tx.account_kind("auth0|good")

        first, second = await asyncio.gather(db.write(bad), db.write(good), return_exceptions=True)
        assert isinstance(first, psycopg.errors.UniqueViolation) and second == "wallet"
        assert await db.read(lambda tx: [tx.account_kind(n) for n in ("auth0|bad", "auth0|good")]) == [
            None, "wallet"]
        alone = await asyncio.gather(db.write(bad), return_exceptions=True)  # alone: it fails with the COMMIT
        assert isinstance(alone[0], StoreUnavailable) and "duplicate key" in str(alone[0])
        assert await db.read(lambda tx: tx.account_kind("auth0|bad")) is None
    finally:
        await db.close()


# ---- round trips ----------------------------------------------------------------------------------

TOKEN_ASK = {"connection": "github", "scopes": ["repo:read"], "purpose": "round trips"}
API_ASK = {**TOKEN_ASK, "method": "GET", "url": DEMO_ISSUER + "provider/github/user"}


async def test_each_tool_call_takes_the_round_trips_its_answers_need_and_no_more(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with demo_client(runtime) as client:
        for listing in ("github-repo-read", "github-repo-read-api"):
            await ok(client, "buy_quota", {"listing_id": listing, "units": 5, "max_unit_price": 100})
        await ok(client, "request_token", TOKEN_ASK)  # a fresh exchange: the next asks reuse its answer
        await ok(client, "call_api", API_ASK)  # opens the grant the next call runs in
        await ok(client, "check_balance", {})  # (each audit name is written once, by its first event)
        counted: dict[str, int] = {}
        for tool, args in (
            ("check_balance", {}),  # the reads (with the rate token), then the event with the COMMIT
            ("buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100}),  # the same
            ("request_token", TOKEN_ASK),  # the same: the unit is taken with the event
            ("call_api", API_ASK),  # the grant found without the lock; then as check_balance
        ):
            sent = round_trips(monkeypatch)
            await ok(client, tool, args)
            monkeypatch.undo()
            counted[tool] = len(sent)
        assert counted == {"check_balance": 2, "buy_quota": 2, "request_token": 2, "call_api": 3}
    assert await runtime.db.read(check_invariants) == []


async def test_reads_sent_ahead_answer_once_and_not_after_a_write(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = await open_database(url)
    try:
        await db.write(lambda tx: ledger.credit(tx, "auth0|a", 10, NOW))

        def job(tx: Tx) -> list[int | None]:
            tx.prefetch(lambda: tx.balance("auth0|a"))
            tx.take_rate_token("auth0|a", "agent", 60, NOW)  # 1: BEGIN, the read ahead, the token (rate_buckets)
            ahead = tx.balance("auth0|a")  # answered by the read ahead
            tx.transfer("mint", "auth0|a", 5, "credit", None, "t")  # 2
            after = tx.balance("auth0|a")  # 3: a write came between
            return [ahead, after]

        sent = round_trips(monkeypatch)
        assert await db.write(job) == [10, 15]
        monkeypatch.undo()
        assert len(sent) == 4 and "rate_buckets" in sent[0] and "SELECT balance" in sent[0], sent
        assert "SELECT balance" not in sent[1] and "SELECT balance" in sent[2], sent
    finally:
        await db.close()


async def test_a_probe_reads_without_the_write_lock_and_runs_as_a_write_once_it_would_write(url: str) -> None:
    db = await open_database(url)
    try:
        await db.write(lambda tx: ledger.credit(tx, "auth0|a", 10, NOW))
        undone: list[str] = []

        def look(tx: Tx) -> int | None:
            return tx.balance("auth0|a")

        def look_then_credit(tx: Tx) -> int:
            tx.on_undo(lambda: undone.append("first run"))
            balance = tx.balance("auth0|a") or 0
            return ledger.credit(tx, "auth0|a", balance, NOW)

        with side(url) as holder:  # another replica's batch holds the write lock
            holder.execute("BEGIN")
            holder.execute("SELECT id FROM write_lock WHERE id = 1 FOR UPDATE")
            assert await asyncio.wait_for(db.probe(look), 5) == 10  # it did not wait for the lock
            doubling = asyncio.ensure_future(db.probe(look_then_credit))
            await asyncio.sleep(0.3)
            assert not doubling.done()  # it writes: it waits for the lock like any write
            holder.execute("ROLLBACK")
            assert await doubling == 20
        assert undone == ["first run"]  # the try's Python state was put back before the write ran it again
        assert await db.read(lambda tx: tx.balance("auth0|a")) == 20
        assert await db.read(check_invariants) == []
    finally:
        await db.close()


async def test_writes_sent_unanswered_still_fail_their_job_when_what_the_caller_counted_on_is_gone(url: str) -> None:
    db = await open_database(url)
    try:
        await stock(db, 1)
        await db.write(lambda tx: ledger.credit(tx, "auth0|a", 100, NOW))
        holding = await db.write(lambda tx: tx.add_units("auth0|a", "last-units", 1, "t").id)
        await db.write(lambda tx: tx.spend_unit(holding, "res_1", "t", chosen=True))
        with pytest.raises(StoreUnavailable, match="holding_id"):  # no unit was there after all
            await db.write(lambda tx: tx.spend_unit(holding, "res_2", "t", chosen=True))
        receipt = Receipt("pur_1", "last-units", 2, 10, 20, 80, 2, "t")  # more than the one left
        with pytest.raises(StoreUnavailable, match="listing_id"):
            await db.write(lambda tx: tx.sell(receipt, account="auth0|a", market="market",
                                               idempotency_key=None, fingerprint=""))
        assert await db.read(lambda tx: (tx.balance("auth0|a"), len(tx.holdings_of("auth0|a")))) == (100, 1)
        rows = await db.read(
            lambda tx: tx._x("SELECT id FROM reservations UNION ALL SELECT id FROM purchases").fetchall()
        )
        assert [r[0] for r in rows] == ["res_1"]
    finally:
        await db.close()


# ---- retries and failures ------------------------------------------------------------------------

def lock_waiter(url: str) -> Callable[[], bool]:
    """Whether some session of the database waits for a row lock right now."""
    def waiting() -> bool:
        with side(url) as other:
            return bool(other.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )[0][0])
    return waiting


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "gave up waiting"
        await asyncio.sleep(0.01)


async def test_a_deadlock_retries_the_whole_call_and_keeps_one_event_per_effect(url: str) -> None:
    with side(url) as other:  # this database's sessions look for deadlocks soon (the side waits longer)
        other.execute(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET deadlock_timeout = '50ms'")
    db = await open_database(url)
    try:
        await stock(db, 10)
        broker = Broker(db)
        await broker.credit("auth0|x", 100)
        runs: list[int] = []
        real = broker.control.admit

        def admit(tx: Tx, principal: Principal, now: datetime, take: bool = True) -> None:
            runs.append(1)
            real(tx, principal, now, take)

        broker.control.admit = admit  # type: ignore[method-assign]
        holder = psycopg.connect(url, autocommit=True)  # another session: an operator's psql, say
        holder.execute("SET deadlock_timeout = '10s'")
        holder.execute("BEGIN")
        holder.execute("UPDATE accounts SET balance = balance WHERE name = 'auth0|x'")  # the wallet's row lock
        bought = asyncio.ensure_future(buy(broker, "auth0|x"))
        await until(lock_waiter(url))  # the broker holds the write lock and waits for the wallet
        takes = threading.Thread(target=lambda: holder.execute("SELECT id FROM write_lock FOR UPDATE"))
        takes.start()  # and now the holder waits for the write lock: a deadlock; the broker's side gives way
        await asyncio.to_thread(takes.join, 10)
        holder.execute("COMMIT")
        holder.close()
        assert await asyncio.wait_for(bought, 10) == "ok"
        assert len(runs) == 2  # the job ran twice: the first run was rolled back whole
        assert await db.read(lambda tx: tx.balance("auth0|x")) == 90
        events = await db.read(lambda tx: [r.tool for r in tx.iter_audit()])
        assert events == ["wallet_credit", "buy_quota"]
        with side(url) as other:  # the retry took its rate-limit token again (the first run's was rolled back)
            [(tokens,)] = other.execute("SELECT tokens FROM rate_buckets WHERE account = 'auth0|x'")
        assert 598 < tokens < 600
        assert await db.read(check_invariants) == []
        assert (await db.read(audit.verify_log)).ok
    finally:
        await db.close()


async def test_a_connection_lost_before_commit_is_retried_with_one_event(url: str) -> None:
    db = await open_database(url)
    try:
        runs: list[int] = []

        def dies_once(tx: Tx) -> int:
            runs.append(1)
            new_id = audit.append(tx, event("auth0|once"))
            if len(runs) == 1:  # the connection goes mid-transaction (a restart, a failover)
                with side(url) as other:
                    other.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                tx.get_meta("audit_head")
            return new_id

        assert await db.write(dies_once) == 1
        assert len(runs) == 2
        result = await db.read(audit.verify_log)
        assert (result.ok, result.checked) == (True, 1)
        names = await db.read(lambda tx: sorted(tx.audit_names().values()))
        assert names.count("auth0|once") == 1
    finally:
        await db.close()


async def test_idle_connections_cut_by_a_restart_are_replaced_without_an_error(url: str) -> None:
    db = await open_database(url)
    try:
        # several pooled connections: reads that overlap (each holds its connection 0.1 s) need one each
        await asyncio.gather(*(db.read(lambda tx: tx._x("SELECT pg_sleep(0.1)").fetchall()) for _ in range(6)))
        with side(url) as other:
            cut = other.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert len(cut) >= 2
        assert await db.write(lambda tx: audit.append(tx, event("auth0|after"))) == 1
        assert await db.read(lambda tx: tx.audit_count()) == 1
    finally:
        await db.close()


async def test_a_database_that_keeps_failing_is_store_unavailable_with_nothing_kept_and_then_service_resumes(
    url: str,
) -> None:
    db = await open_database(url)
    try:
        runs: list[int] = []

        def always_cut(tx: Tx) -> None:
            runs.append(1)
            audit.append(tx, event("auth0|never"))
            tx._x("SELECT pg_terminate_backend(pg_backend_pid())")

        with pytest.raises(StoreUnavailable):
            await db.write(always_cut)
        assert len(runs) == MAX_ATTEMPTS
        broker = Broker(db)
        assert await broker.credit("auth0|later", 5) == 5  # the pool connected again by itself
        result = await db.read(audit.verify_log)
        assert (result.ok, result.checked) == (True, 1)
        assert "auth0|never" not in await db.read(lambda tx: sorted(tx.audit_names().values()))
    finally:
        await db.close()


async def test_a_failed_job_in_a_batch_rolls_back_alone_on_postgresql(url: str) -> None:
    db = await open_database(url)
    try:
        def fails(tx: Tx) -> None:
            audit.append(tx, event("auth0|ghost"))
            tx._x("SELECT 1 / 0")  # a statement error: PostgreSQL aborts the job's savepoint, not the batch

        jobs = [fails if n % 3 == 0 else (lambda tx, n=n: audit.append(tx, event(f"auth0|good-{n}")))
                for n in range(9)]
        outcomes = await asyncio.gather(*(db.write(job) for job in jobs), return_exceptions=True)
        assert sum(isinstance(o, psycopg.errors.DivisionByZero) for o in outcomes) == 3
        assert sorted(o for o in outcomes if isinstance(o, int)) == list(range(1, 7))
        assert (await db.read(audit.verify_log)).ok
        assert "auth0|ghost" not in await db.read(lambda tx: tx.audit_names().values())
    finally:
        await db.close()


@pytest.mark.parametrize("landed", [True, False], ids=["committed-then-lost", "lost-before-the-commit-landed"])
async def test_a_connection_lost_while_committing_is_told_apart_by_the_log_and_answered_truly(
    url: str, landed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await open_database(url)
    try:
        await stock(db, 10)
        broker = Broker(db)
        await broker.credit("auth0|x", 100)
        real_execute = psycopg.Connection.execute
        armed = [True]

        def execute(self: psycopg.Connection[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
            if str(query).endswith("COMMIT") and armed[0]:  # with the statements that waited for it
                armed[0] = False
                if landed:
                    real_execute(self, query, *args, **kwargs)  # the commit lands on the server
                self.pgconn.finish()  # … and the answer never arrives: the connection is gone
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return real_execute(self, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Connection, "execute", execute)
        assert await buy(broker, "auth0|x", key="k1") == "ok"  # told the truth either way: it was bought
        monkeypatch.undo()
        assert not armed[0]
        receipts = await db.read(lambda tx: tx.buy_context("auth0|x", "last-units", "k1")[0])
        assert receipts is not None
        events = await db.read(lambda tx: [r for r in tx.iter_audit() if r.tool == "buy_quota"])
        assert [r.outcome for r in events] == ["ok"]  # one effect, one event: not lost, not doubled
        assert await db.read(check_invariants) == []
    finally:
        await db.close()
