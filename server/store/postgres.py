"""PostgreSQL behind the store seam: one database that any number of replicas share (SPEC §12).

**Driver: psycopg 3 with psycopg_pool, its synchronous API on worker threads.** Jobs are synchronous
functions of a `Tx`, the seam the domain is written against and shares with SQLite; with psycopg's
sync connections a job's statements run one after another on a worker thread, with no event-loop
hop per statement, while the loop keeps serving. asyncpg would make every `Tx` method a coroutine
(rewriting the domain) or cost a thread-to-loop hop per statement. psycopg 3 is libpq's maintained
Python binding (binary wheels), prepares repeated statements on the server by itself, and its pool
replaces broken connections by itself.

**Isolation: READ COMMITTED plus one explicit lock, always taken first.** Every write transaction
begins by locking the one row of `write_lock`. Writers of all replicas are therefore ordered one
after another, like SQLite's single writer: each statement after the lock sees everything committed
before, so the domain's read-then-write steps (an idempotency key looked up then inserted, a rate
bucket read then updated, supply and balance checked then moved) hold across replicas as they do in
one process, and the CHECK and UNIQUE constraints stay the last word on wallets, supply and
idempotency. Since no broker transaction takes any other lock before this one, two replicas can never
deadlock. SERIALIZABLE was the other choice, and a worse one here: every write appends to the one
audit chain, so any two concurrent writers conflict on its head and one of them would redo its whole
batch every time; the lock makes it wait instead of working twice. Group commit is where it pays:
the jobs that arrive together on a replica share one transaction (one lock, one WAL flush), each in
its own savepoint, so one job's failure rolls back only that job.

**The audit chain stays one gap-free chain.** An event's id is the recorded head's id + 1 and its
hash chains from the head's hash (server.audit.append), read and written under the write lock; ids
come from no sequence, so a rolled-back transaction leaves no gap, and `audit verify` walks one
chain whichever replica wrote each event.

**Reads** run in REPEATABLE READ READ ONLY transactions, on their own pooled connections alongside
the writer: one snapshot for the whole job (`audit verify` walks a chain that stands still while other
replicas append), no lock taken.

**Retries.** A batch is run again from the start, on another connection, up to MAX_ATTEMPTS times
with a short random backoff, when the database certainly kept none of it: a serialization failure
or a deadlock (40001, 40P01; only another session's locks can cause one, say an operator's psql) or
the connection lost before COMMIT was sent (idle connections a restart has cut). A connection lost
while committing may have committed: StoreUnavailable, never a retry. Any other failure of the
database (it is down, a lock wait over LOCK_TIMEOUT) is StoreUnavailable at once, so a tool answers
audit_unavailable with nothing half-done, and the pool connects again by itself. A job may thus run
more than once: the `Tx` bookkeeping (audit name ids kept only after COMMIT, `on_undo`) puts back
the Python state it changed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import lru_cache
from typing import Any, TypeVar, cast

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from server.models import Holding
from server.store.base import Database, DatabaseMissing, Job, StoreUnavailable, deliver, fail_all, shown_url
from server.store.pg_schema import PG_MIGRATIONS, PG_SCHEMA_VERSION
from server.store.tx import (
    ADD_UNITS,
    AUDIT_HEAD_KEY,
    HOLDING_COLUMNS,
    INSERT_AUDIT,
    MOVE,
    TAKE_UNIT,
    TRANSFER,
    Mark,
    Tx,
    _holding,
    to_micros,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_BATCH = 256
MAX_ATTEMPTS = 5  # runs of one batch, the first included
POOL_SIZE = 8  # connections per replica: one writer, the rest for reads
CONNECT_TIMEOUT = 5.0  # seconds to wait for a connection (a tool call then answers audit_unavailable)
LOCK_TIMEOUT = "10s"  # longest wait for the write lock (another replica's batch), as SQLite's busy timeout
IDLE_IN_TRANSACTION_TIMEOUT = "60s"  # a replica stuck inside a transaction gives the write lock back
MIGRATION_LOCK = 0x74766D00  # pg_advisory_lock key: one replica at a time creates or migrates the schema

_BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED"
_WRITE_LOCK = "SELECT id FROM write_lock WHERE id = 1 FOR UPDATE"
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
# read in the same round trip once the lock is held (a statement of its own: it sees every commit before)
_READ_HEAD = f"SELECT text, bytes FROM meta WHERE key = '{AUDIT_HEAD_KEY}'"
_SAVEPOINT, _RELEASE, _ROLLBACK_TO = "SAVEPOINT atomic", "RELEASE atomic", "ROLLBACK TO atomic"
_SET_META = (
    "INSERT INTO meta(key, text, bytes) VALUES (?, ?, ?) "
    "ON CONFLICT(key) DO UPDATE SET text = excluded.text, bytes = excluded.bytes"
)
# Tx.take_rate_token's read, refill, check and write as one statement: a new bucket starts full (the token
# taken from it), a stored one is refilled since its last write and capped at the (perhaps lowered) rate;
# the token is taken when one is there, or always with `debt` (down to one minute's worth below zero).
# No row comes back when it is refused (the row is left as it was).
_BUCKET = (
    "LEAST(%(full)s, CASE WHEN %(at)s > b.updated_at THEN b.tokens + "
    "CAST(%(at)s - b.updated_at AS DOUBLE PRECISION) / CAST(60e6 AS DOUBLE PRECISION) * %(full)s ELSE b.tokens END)"
)
_TAKE_RATE_TOKEN = (
    "INSERT INTO rate_buckets AS b (account, agent, tokens, updated_at) "
    "VALUES (%(account)s, %(agent)s, %(full)s - 1, %(at)s) "
    f"ON CONFLICT (account, agent) DO UPDATE SET tokens = GREATEST({_BUCKET}, %(floor)s) - 1, "
    "updated_at = GREATEST(b.updated_at, excluded.updated_at) "
    f"WHERE %(debt)s OR {_BUCKET} >= 1 RETURNING b.tokens"
)


@lru_cache(maxsize=1024)
def _placeholders(sql: str) -> str:
    """Tx's `?` placeholders as psycopg's `%s` (Tx's statements hold no other `?` and no `%`)."""
    assert "%" not in sql
    return sql.replace("?", "%s")


class PgTx(Tx):
    """A transaction in progress on one PostgreSQL connection: Tx's statements, PostgreSQL's dialect."""

    def __init__(self, conn: psycopg.Connection[Any], names: dict[str, int] | None = None) -> None:
        super().__init__(names)
        self._conn = conn
        # the transaction itself failed (a lost connection, a deadlock): whatever a job made of the error,
        # the whole batch is over (and retried when nothing of it can have been kept)
        self.failure: psycopg.OperationalError | None = None
        self._x = self._execute
        # meta values read under the write lock (the audit head, at BEGIN): no other writer can change them
        # before COMMIT, so they are read once and kept as this transaction writes them
        self._meta: dict[str, bytes | str | None] = {}
        # savepoint statements not sent yet: they go with the next statement, in the same round trip
        self._unsent: list[str] = []

    def began(self, meta: dict[str, bytes | str | None]) -> None:
        """The write transaction began, the write lock held, with these meta values read."""
        self._meta = meta

    def _execute(self, sql: str, params: Any = None) -> psycopg.Cursor[Any]:
        return self._named(_placeholders(sql), params)

    def _named(self, sql: str, params: Any = None) -> psycopg.Cursor[Any]:
        """Execute a statement in psycopg's own placeholders (`%(name)s`), after the savepoint statements
        not sent yet, in one round trip: one query string when it has no parameters, else a pipeline."""
        conn, unsent = self._conn, self._unsent
        try:
            if not unsent:
                return conn.execute(sql, params)
            self._unsent = []
            if params is None:
                cur = conn.execute("; ".join([*unsent, sql]))
                for _ in unsent:
                    cur.nextset()
                return cur
            with conn.pipeline():
                for statement in unsent:
                    conn.execute(statement)
                cur = conn.execute(sql, params)
            return cur
        except psycopg.OperationalError as exc:
            if self.failure is None:
                self.failure = exc
            raise

    def _fetch_all(self, reads: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """The reads (and any savepoint statement not sent yet) in one pipeline: one round trip."""
        conn, unsent = self._conn, self._unsent
        self._unsent = []
        try:
            with conn.pipeline():
                for statement in unsent:
                    conn.execute(statement)
                cursors = [conn.execute(_placeholders(sql), params) for sql, params in reads]
            return [cur.fetchall() for cur in cursors]
        except psycopg.OperationalError as exc:
            if self.failure is None:
                self.failure = exc
            raise

    # Savepoints are sent with the statement after them (or not at all when none runs inside one): a tool call's
    # savepoint and its release cost no round trip of their own. In the order they were asked for, so the
    # database is where Tx's statements one by one would have put it at every statement.
    def savepoint(self) -> Mark:
        self._unsent.append(_SAVEPOINT)
        return self.mark()

    def release_savepoint(self) -> None:
        if self._unsent and self._unsent[-1] == _SAVEPOINT:
            self._unsent.pop()  # nothing ran inside it
        else:
            self._unsent.append(_RELEASE)

    def rollback_savepoint(self, mark: Mark) -> None:
        if self._unsent and self._unsent[-1] == _SAVEPOINT:
            self._unsent.pop()  # nothing ran inside it: nothing to roll back
        else:
            self._x(f"{_ROLLBACK_TO}; {_RELEASE}")
        self.undo(mark)

    def committing(self) -> None:
        """COMMIT is next: savepoint statements still unsent (releases, empty savepoints) change nothing."""
        self._unsent = []

    # meta values are text or bytes, as they were set (SQLite's column takes either)
    def get_meta(self, key: str) -> bytes | None:
        if key in self._meta:
            value = self._meta[key]
        else:
            value = _meta_value(self._x("SELECT text, bytes FROM meta WHERE key = ?", (key,)).fetchone())
        return cast(bytes | None, value)  # text or bytes, as Tx.get_meta says

    def set_meta(self, key: str, value: bytes | str) -> None:
        text, blob = (None, bytes(value)) if isinstance(value, bytes | memoryview) else (value, None)
        self._x(_SET_META, (key, text, blob))
        self._kept(key, blob if blob is not None else text)

    def _kept(self, key: str, value: bytes | str | None) -> None:
        """`key` now holds `value` in this transaction: so does the copy of it, if one is kept."""
        if key in self._meta:
            before = self._meta[key]
            self._meta[key] = value
            self.on_undo(lambda: self._meta.__setitem__(key, before))

    def _write_audit_row(self, row: tuple[Any, ...], head: tuple[str, str] | None) -> None:
        """The event's row and its head meta in one statement (one round trip, not two)."""
        if head is None:
            super()._write_audit_row(row, head)
            return
        self._x(f"WITH head AS ({_SET_META}) {INSERT_AUDIT}", (head[0], head[1], None, *row))
        self._kept(*head)

    def control_version(self) -> int:
        row = self._x("SELECT text FROM meta WHERE key = 'control_version'").fetchone()
        return 0 if row is None else int(row[0])

    def bump_control_version(self) -> None:
        self._x(
            "INSERT INTO meta(key, text) VALUES ('control_version', '1') "
            "ON CONFLICT(key) DO UPDATE SET text = CAST(CAST(meta.text AS BIGINT) + 1 AS TEXT)"
        )

    def take_rate_token(
        self, account: str, agent: str, per_minute: int, now: datetime, *, take: bool = True, debt: bool = False
    ) -> float:
        """Tx.take_rate_token in one round trip when a token is taken: the bucket's refill, check and write
        are one upsert (the same arithmetic as Tx's, in the same order). A refusal, or a look only, reads
        the bucket as Tx does (no row comes back when the upsert's condition fails)."""
        if take and per_minute >= 1:
            row = self._named(_TAKE_RATE_TOKEN, {
                "account": account, "agent": agent, "full": float(per_minute), "at": to_micros(now),
                "floor": 1.0 - per_minute, "debt": debt,
            }).fetchone()
            if row is not None:
                return 0.0
        return super().take_rate_token(account, agent, per_minute, now, take=take, debt=debt)

    # a step's statements as one, with data-modifying WITH (one round trip where Tx makes two or three)
    def transfer(self, debit: str, credit: str, amount: int, reason: str, reference: str | None, ts: str) -> int:
        return self._insert_id(
            f"WITH moved AS ({MOVE}) {TRANSFER}",
            (debit, amount, credit, amount, debit, credit, ts, debit, credit, amount, reason, reference),
        )

    def add_units(self, account: str, listing_id: str, units: int, ts: str) -> Holding:
        row = self._x(
            f"WITH h AS ({ADD_UNITS} RETURNING *) "
            f"SELECT {HOLDING_COLUMNS} FROM h JOIN listings l ON l.id = h.listing_id",
            (account, listing_id, units, units, ts),
        ).fetchone()
        return _holding(row)

    def _take_unit(self, holding_id: int, into: str, reservation: tuple[Any, ...]) -> bool:
        sql = (
            f"WITH taken AS ({TAKE_UNIT.format(into=into)} RETURNING id) INSERT INTO reservations(id, holding_id, "
            "status, owner, created_at, settled_at) SELECT ?, id, ?, ?, ?, CAST(? AS TEXT) FROM taken"
        )
        return bool(self._x(sql, (holding_id, *reservation)).rowcount == 1)

    def _insert_id(self, sql: str, params: Any) -> int:
        row = self._x(sql + " RETURNING id", params).fetchone()
        return int(row[0])

    def _arg(self, key: str) -> str:
        return f"(CAST(args AS JSONB) ->> '{key}')"

    def _arg_true(self, key: str) -> str:
        return f"(CAST(args AS JSONB) -> '{key}') = CAST('true' AS JSONB)"


class _Again(Exception):
    """The database kept nothing of this run of the batch, and another run may succeed."""


class PgDatabase(Database):
    """The broker's PostgreSQL database. Open with `await PgDatabase.connect(url)` (or `open_database`)."""

    def __init__(self, url: str, pool: ConnectionPool[Any], hmac_key: bytes) -> None:
        self.path = shown_url(url)
        self.hmac_key = hmac_key
        self._pool = pool
        self._names: dict[str, int] = {}  # audit name → id, as committed (see Tx.name_id)
        self._queue: list[tuple[Job[Any], asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        # one writer per replica: its batches would only queue for the write lock one behind the other
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="tvm-pg-write")
        self._read_threads = ThreadPoolExecutor(POOL_SIZE - 1, thread_name_prefix="tvm-pg-read")
        self.on_batch = None

    @classmethod
    async def connect(cls, url: str, *, create: bool = True) -> PgDatabase:
        """Connect to the database at `url`, creating or migrating its schema (one replica at a time).

        With `create` false the schema must be there already. Raises DatabaseMissing, StoreUnavailable.
        """
        try:
            key = await asyncio.to_thread(_prepare, url, create)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"{shown_url(url)}: {_one_line(exc)}") from None
        pool: ConnectionPool[Any] = ConnectionPool(
            url, min_size=1, max_size=POOL_SIZE, open=False, kwargs={"autocommit": True}, configure=_configure,
            timeout=CONNECT_TIMEOUT, name="token-vault-mcp",
        )
        try:
            await asyncio.to_thread(pool.open, True, CONNECT_TIMEOUT)
        except PoolTimeout:
            await asyncio.to_thread(pool.close)
            raise StoreUnavailable(f"{shown_url(url)}: no connection within {CONNECT_TIMEOUT:g} s") from None
        return cls(url, pool, key)

    async def write(self, job: Job[T]) -> T:
        if self._closed:
            raise StoreUnavailable("the database is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((job, future))
        if self._writer is None or self._writer.done():
            # started on the loop's next turn: the jobs of this turn join the same batch
            self._writer = asyncio.create_task(self._drain())
        return await future

    async def read(self, job: Job[T]) -> T:
        if self._closed:
            raise StoreUnavailable("the database is closed")
        loop = asyncio.get_running_loop()
        ((ok, value),) = await loop.run_in_executor(self._read_threads, self._run, [job], False)
        if ok:
            return cast(T, value)
        raise value

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            await asyncio.shield(self._writer)
        await asyncio.to_thread(self._pool.close)
        self._write_thread.shutdown(wait=False)
        self._read_threads.shutdown(wait=False)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                outcomes = await loop.run_in_executor(self._write_thread, self._run, [j for j, _ in batch], True)
            except BaseException as exc:  # the batch itself failed (not one job of it)
                fail_all(batch, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            deliver(batch, outcomes)

    # ---- on a worker thread -----------------------------------------------------------------
    def _run(self, jobs: list[Job[Any]], write: bool) -> list[tuple[bool, Any]]:
        """Run `jobs` in one transaction (a write batch, or one read): each job's outcome. Retries the
        whole of it while the database kept nothing of it; StoreUnavailable for every job when it fails."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return self._attempt(jobs, write)
            except _Again as again:
                if attempt == MAX_ATTEMPTS:
                    log.error("gave up on a transaction after %d attempts: %s", attempt, again)
                    return [(False, StoreUnavailable(str(again)))] * len(jobs)
                log.info("running a transaction again (attempt %d): %s", attempt + 1, again)
                time.sleep(min(0.005 * 2**attempt, 0.2) * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
            except StoreUnavailable as exc:
                return [(False, exc)] * len(jobs)
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(self, jobs: list[Job[Any]], write: bool) -> list[tuple[bool, Any]]:
        try:
            conn = self._pool.getconn()
        except PoolTimeout:
            raise StoreUnavailable(f"no connection to the database within {CONNECT_TIMEOUT:g} s") from None
        tx = PgTx(conn, self._names)
        backend = conn.info.backend_pid  # the server process of this transaction (see _landed)
        committing = False
        try:
            if write:
                # one round trip: the lock first, always (the one order every writer takes its locks in), then
                # the audit head, which every event chains on
                cur = conn.execute(f"{_BEGIN_WRITE}; {_WRITE_LOCK}; {_READ_HEAD}")
                cur.nextset()
                cur.nextset()
                tx.began({AUDIT_HEAD_KEY: _meta_value(cur.fetchone())})
            else:
                conn.execute(_BEGIN_READ)
            outcomes, keep = _run_jobs(tx, jobs)
            if not keep:  # a lone job failed: nothing to commit
                tx.rolled_back()
                _rollback(conn)
                return outcomes
            committing = True
            tx.committing()
            status = conn.execute("COMMIT").statusmessage
        except psycopg.Error as exc:
            landed = self._landed(tx.last_event, backend) if committing and conn.broken else None
            if landed:  # it did commit: its outcomes stand (the callers were told nothing yet)
                tx.committed()
                return outcomes
            tx.rolled_back()
            _rollback(conn)
            if (exc.sqlstate or "").startswith("40"):  # transaction rollback: 40001, 40P01; nothing was kept
                raise _Again(_one_line(exc)) from None
            if conn.broken and (not committing or landed is False):  # the server rolled back what it began
                self._pool.check()  # drop the other idle connections a restart has cut, before the next try
                raise _Again(_one_line(exc)) from None
            if conn.broken:
                raise StoreUnavailable(
                    "the connection was lost while committing (the batch may or may not be kept): "
                    f"{_one_line(exc)}",
                    outcome_unknown=True,
                ) from None
            raise StoreUnavailable(_one_line(exc)) from None
        finally:
            self._pool.putconn(conn)
        if status != "COMMIT":  # pragma: no cover - PostgreSQL answers ROLLBACK to COMMIT in a failed transaction
            tx.rolled_back()
            raise StoreUnavailable("the transaction had failed and was rolled back")
        tx.committed()
        return outcomes


    def _landed(self, event: tuple[int, bytes] | None, backend: int) -> bool | None:
        """After a connection lost while committing: whether the transaction whose last audit event is
        `event` was kept (its event is in the log), or None when that cannot be told (no event, its server
        process `backend` still running and so perhaps still committing, or the database still away).
        The chain makes it exact: an id holds that hash only if that very commit won."""
        if event is None:
            return None
        event_id, digest = event
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with self._pool.connection(timeout=CONNECT_TIMEOUT) as conn:
                    if conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)).fetchone():
                        time.sleep(0.05)  # its commit may still be under way: wait for it to end
                        continue
                    row = conn.execute("SELECT hash FROM audit WHERE id = %s", (event_id,)).fetchone()
                return row is not None and bytes(row[0]) == digest
            except (psycopg.Error, PoolTimeout):
                time.sleep(0.1)
        return None


def _run_jobs(tx: PgTx, jobs: list[Job[Any]]) -> tuple[list[tuple[bool, Any]], bool]:
    """Each job's outcome, and whether to commit. A job alone needs no savepoint (its failure rolls the
    transaction back); in a batch each job has its own. Raises the transaction's own failure (PgTx.failure)."""
    if len(jobs) == 1:
        try:
            value = jobs[0](tx)
        except BaseException as exc:
            if tx.failure is not None:
                raise tx.failure from None
            return [(False, exc)], False
        if tx.failure is not None:
            raise tx.failure
        return [(True, value)], True
    outcomes: list[tuple[bool, Any]] = []
    for job in jobs:
        mark = tx.savepoint()
        try:
            value = job(tx)
        except BaseException as exc:
            if tx.failure is not None:
                raise tx.failure from None
            tx.rollback_savepoint(mark)
            outcomes.append((False, exc))
            continue
        if tx.failure is not None:
            raise tx.failure
        tx.release_savepoint()
        outcomes.append((True, value))
    return outcomes, True


def _meta_value(row: tuple[Any, ...] | None) -> bytes | str | None:
    """A meta row's (text, bytes) as the value it was set to."""
    return None if row is None else bytes(row[1]) if row[1] is not None else row[0]


def _rollback(conn: psycopg.Connection[Any]) -> None:
    if conn.broken or conn.closed:
        return
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:  # the connection went; the server rolls back on its own
        pass


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Every pooled connection's session settings."""
    conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    conn.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _prepare(url: str, create: bool) -> bytes:
    """Create or migrate the schema under the migration lock (one replica at a time); the HMAC key.

    Raises DatabaseMissing (no schema, and `create` false), StoreUnavailable, psycopg.Error.
    """
    with psycopg.connect(url, autocommit=True, connect_timeout=round(CONNECT_TIMEOUT)) as conn:
        if not create and conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,):
            raise DatabaseMissing(f"the PostgreSQL database {shown_url(url)} holds no token-vault-mcp schema")
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            with conn.transaction():
                migrate_schema(conn)
                found = conn.execute("SELECT bytes FROM meta WHERE key = 'token_hmac_key'").fetchone()
                if found is not None:
                    return bytes(found[0])
                key = secrets.token_bytes(32)
                conn.execute("INSERT INTO meta(key, bytes) VALUES ('token_hmac_key', %s)", (key,))
                conn.execute("INSERT INTO accounts(name, kind) VALUES ('market', 'market'), ('mint', 'mint')")
                return key
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def migrate_schema(conn: psycopg.Connection[Any]) -> None:
    """Create the schema, or bring it up to PG_SCHEMA_VERSION, inside the caller's transaction.

    The caller holds MIGRATION_LOCK (one replica at a time). Raises StoreUnavailable for a schema newer
    than this program knows, psycopg.Error.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        "one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one), version INTEGER NOT NULL)"
    )
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    version = 0 if row is None else int(row[0])
    if version > PG_SCHEMA_VERSION:
        raise StoreUnavailable(
            f"the database schema is version {version}, newer than this program knows ({PG_SCHEMA_VERSION})"
        )
    for target, script in PG_MIGRATIONS:
        if target > version:
            conn.execute(script)  # type: ignore[call-overload]  # a fixed script, several statements
            version = target
    conn.execute(
        "INSERT INTO schema_version(version) VALUES (%s) ON CONFLICT (one) DO UPDATE SET version = excluded.version",
        (version,),
    )
