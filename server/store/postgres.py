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
replicas append), no lock taken. A *probe* (`PgDatabase.probe`: call_api finding its live grant) is a
write job tried first on a read connection with no transaction, each statement on what is committed
when it runs; the first statement that would write ends the try, and the job runs again as a write.

**Round trips** are what a call waits for here (see PgTx): a statement no step waits on is sent with
the next one that has an answer to wait for, in one pipeline, and a tool's first reads go with its
rate-limit token (`Tx.prefetch`), so a warm call makes two or three round trips.

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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import lru_cache
from typing import Any, TypeVar, cast

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from server.models import Holding, Receipt
from server.store.base import Database, DatabaseMissing, Job, StoreUnavailable, deliver, fail_all, shown_url
from server.store.pg_schema import PG_MIGRATIONS, PG_SCHEMA_VERSION
from server.store.tx import (
    ADD_SOLD,
    ADD_UNITS,
    AUDIT_HEAD_KEY,
    HOLDING_COLUMNS,
    INSERT_AUDIT,
    MOVE,
    PURCHASE_COLUMNS,
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
# what a transaction that sent nothing else has no need to send at all
_CONTROL = frozenset({_BEGIN_WRITE, _WRITE_LOCK, _READ_HEAD, _BEGIN_READ, _SAVEPOINT, _RELEASE, _ROLLBACK_TO})
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


# Tx.sell's statements as one: the units sold, the credits moved and their transfer (none when free), the units
# held, the purchase row (its transfer the one just made)
_SELL = (
    f"WITH sold AS ({ADD_SOLD} RETURNING id), moved AS ({MOVE} AND ? > 0), "
    "transfer AS (INSERT INTO transfers(ts, debit, credit, amount, reason, reference) "
    "SELECT ?, ?, ?, ?, 'buy_quota', ? WHERE ? > 0 RETURNING id), "
    f"held AS ({ADD_UNITS}) "
    f"INSERT INTO purchases({PURCHASE_COLUMNS}) "
    "SELECT ?, ?, sold.id, ?, ?, ?, ?, ?, ?, ?, ?, (SELECT id FROM transfer) "
    "FROM (SELECT 1) AS one LEFT JOIN sold ON TRUE"
)
_ADD_UNITS_RETURNING = (
    f"WITH h AS ({ADD_UNITS} RETURNING *) SELECT {HOLDING_COLUMNS} FROM h JOIN listings l ON l.id = h.listing_id"
)


@lru_cache(maxsize=1024)
def _placeholders(sql: str) -> str:
    """Tx's `?` placeholders as psycopg's `%s` (Tx's statements hold no other `?` and no `%`)."""
    assert "%" not in sql
    return sql.replace("?", "%s")


class PgTx(Tx):
    """A transaction in progress on one PostgreSQL connection: Tx's statements, PostgreSQL's dialect.

    **Round trips.** Every round trip to the database costs far more than the statement it carries (another
    process to wake on each side, and on an idle machine a sleeping CPU), so the statements whose answer no
    step waits for are not sent on their own: the BEGIN (with the write lock and the audit head), savepoint
    statements, and blind writes (`_w`: an audit event, a usage count, a purchase row) wait in `_unsent`
    and travel in one psycopg pipeline with the next statement whose answer is needed, or with the COMMIT;
    so do the reads a tool starts with (`prefetch`), whose answers then wait here for it.
    (A pipeline, not one multi-statement query with the values bound in: the server then parses and plans
    every statement every time, which costs more than the round trips it saves; in a pipeline each is
    still prepared once.) The database runs them in the order they were asked for, so it is at every
    statement where Tx's statements one by one would have put it. A deferred write that fails fails
    whatever carries it, inside the same job: a later statement of the job, the COMMIT of a job alone, or
    in a batch the flush each job makes before its savepoint is released (`end_job`).
    """

    def __init__(
        self, conn: psycopg.Connection[Any], names: dict[str, int] | None = None, *, probing: bool = False,
        on_round_trip: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(names)
        self._conn = conn
        self._on_round_trip = on_round_trip
        # no transaction: reads only, each on its own (PgDatabase.probe); the first write ends the try
        self._probing = probing
        # the transaction itself failed (a lost connection, a deadlock): whatever a job made of the error,
        # the whole batch is over (and retried when nothing of it can have been kept)
        self.failure: psycopg.OperationalError | None = None
        self._x = self._execute
        # meta values read under the write lock (the audit head, at BEGIN): no other writer can change them
        # before COMMIT, so they are read once and kept as this transaction writes them
        self._meta: dict[str, bytes | str | None] = {}
        # statements not sent yet (psycopg placeholders, values), each with what reads its result, if anything
        self._unsent: list[tuple[str, Any, Callable[[psycopg.Cursor[Any]], None] | None]] = []
        self._begun = False  # the BEGIN was sent (before that, a job that sends nothing needs no transaction)
        # per open savepoint, innermost last: where its SAVEPOINT stands in _unsent, or -1 once it was sent
        self._savepoints: list[int] = []
        self._written = -1  # len(_unsent) after the last deferred write of the current job (-1: none)
        self._head_unread = False  # the BEGIN that reads the audit head waits to be sent
        self.wrote = False  # a statement that may change the database was sent or waits to be
        # reads sent ahead (prefetch), by (statement, values): their cursors, answered once, dropped at a write
        self._fetched: dict[tuple[str, Any], psycopg.Cursor[Any]] = {}
        self._prefetching = False

    # ---- beginning ------------------------------------------------------------------------------------
    def begin_write(self) -> None:
        """The write transaction begins with the next round trip: the write lock first, always (the one order
        every writer takes its locks in), then the audit head, which every event chains on."""
        self._unsent += [(_BEGIN_WRITE, None, None), (_WRITE_LOCK, None, None), (_READ_HEAD, None, self._read_head)]
        self._head_unread = True

    def begin_read(self) -> None:
        self._unsent.append((_BEGIN_READ, None, None))

    def _read_head(self, cur: psycopg.Cursor[Any]) -> None:
        self._meta = {AUDIT_HEAD_KEY: _meta_value(cur.fetchone())}
        self._head_unread = False

    # ---- sending --------------------------------------------------------------------------------------
    def _execute(self, sql: str, params: Any = None) -> psycopg.Cursor[Any]:
        return self._named(_placeholders(sql), params)

    def _named(self, sql: str, params: Any = None) -> psycopg.Cursor[Any]:
        """Execute a statement in psycopg's own placeholders (`%(name)s`), after the statements not sent
        yet, in one round trip; the cursor on its result."""
        if not sql.startswith("SELECT"):
            self._writing()
        elif self._fetched or self._prefetching:
            return self._read_ahead([(sql, params)])[0]
        return self._send([(sql, params)])[0]

    def _writing(self, keeps_reads: bool = False) -> None:
        """A statement that may write is sent or queued: what was read ahead may no longer hold (unless
        it `keeps_reads`: it writes no table a read ahead reads)."""
        if self._probing:
            raise _WouldWrite
        assert not self._prefetching, "prefetch() reads only"
        self.wrote = True
        if not keeps_reads:
            self._fetched.clear()

    # ---- reading ahead (prefetch) -----------------------------------------------------------------------
    def prefetch(self, reads: Callable[[], object]) -> None:
        self._prefetching = True
        try:
            reads()
        finally:
            self._prefetching = False

    def _keeper(self, key: tuple[str, Any]) -> Callable[[psycopg.Cursor[Any]], None]:
        def keep(cur: psycopg.Cursor[Any]) -> None:
            self._fetched[key] = cur
        return keep

    def _read_ahead(self, reads: Sequence[tuple[str, Any]]) -> list[psycopg.Cursor[Any]]:
        """The cursors of these reads: queued while prefetching (empty answers to the prefetch itself),
        taken from what was read ahead when every one of them was, else sent."""
        keys = [_read_key(sql, params) for sql, params in reads]
        if self._prefetching:
            for (sql, params), key in zip(reads, keys, strict=True):
                if key is not None:
                    self._unsent.append((sql, params, self._keeper(key)))
            return [_NOTHING_YET] * len(reads)
        if all(key in self._fetched for key in keys):
            return [self._fetched.pop(key) for key in keys]  # type: ignore[arg-type]  # (no None is a key)
        return self._send(reads)

    # ---- writes no step waits on -------------------------------------------------------------------------
    def _w(self, sql: str, params: Any = None) -> None:
        """A write no step reads the result of: sent with the next round trip."""
        self._later(_placeholders(sql), params or None)

    def _later(self, sql: str, params: Any, *, keeps_reads: bool = False) -> None:
        """`_w` in psycopg's own placeholders."""
        self._writing(keeps_reads)
        self._unsent.append((sql, params, None))
        self._written = len(self._unsent)

    def _send(self, last: Sequence[tuple[str, Any]]) -> list[psycopg.Cursor[Any]]:
        """The statements not sent yet, then `last`, in one round trip: a cursor on each of `last`'s results."""
        unsent, self._unsent = self._unsent, []
        if not unsent and not last:
            return []
        self._savepoints = [-2 if at == -2 else -1 for at in self._savepoints]  # all sent (-2: probing)
        self._written = -1
        self._begun = True
        conn = self._conn
        if self._on_round_trip is not None:
            self._on_round_trip()
        try:
            if not unsent and len(last) == 1:
                return [conn.execute(*last[0])]
            if len(last) <= 1 and all(p is None for _, p in last) and all(
                params is None and read in (None, self._read_head) for _, params, read in unsent
            ):  # nothing to bind, no cursor to keep: one query of several statements (the BEGIN, savepoints, a COMMIT)
                cur = conn.execute(";\n".join([*(sql for sql, _, _ in unsent), *(sql for sql, _ in last)]))
                for _, _, read in unsent:
                    if read is not None:
                        read(cur)
                    cur.nextset()
                return [cur]
            with conn.pipeline():
                waiting = [(conn.execute(sql, params), read) for sql, params, read in unsent]
                cursors = [conn.execute(sql, params) for sql, params in last]
            for cur, read in waiting:
                if read is not None:
                    read(cur)
            return cursors
        except psycopg.OperationalError as exc:
            self._failed(exc)
            raise

    def _failed(self, exc: psycopg.OperationalError) -> None:
        if self.failure is None:
            self.failure = exc

    def _fetch_all(self, reads: Sequence[tuple[str, Sequence[Any]]]) -> list[list[Any]]:
        """The reads (and the statements not sent yet) in one round trip."""
        return [cur.fetchall() for cur in self._read_ahead([(_placeholders(sql), params) for sql, params in reads])]

    # ---- savepoints: sent with the statement after them, or not at all when nothing ran inside one --------
    def savepoint(self) -> Mark:
        if self._probing:  # nothing is written: nothing to undo but Python state
            self._savepoints.append(-2)
            return self.mark()
        self._savepoints.append(len(self._unsent))
        self._unsent.append((_SAVEPOINT, None, None))
        return self.mark()

    def release_savepoint(self) -> None:
        at = self._savepoints.pop()
        if at == -2:
            return
        if at >= 0:  # nothing inside it was sent: it and what it holds become part of the enclosing level
            del self._unsent[at]
            if self._written > at:
                self._written -= 1
        else:
            self._unsent.append((_RELEASE, None, None))

    def rollback_savepoint(self, mark: Mark) -> None:
        at = self._savepoints.pop()
        if at == -2:
            pass
        elif at >= 0:  # nothing inside it was sent: drop what waits, the database has nothing to undo
            del self._unsent[at:]
        else:  # all that waits came after the savepoint (sending it sent everything before)
            self._unsent = [(_ROLLBACK_TO, None, None), (_RELEASE, None, None)]
        if self._written > len(self._unsent):
            self._written = -1
        self._fetched.clear()  # (read inside what is undone: not kept, to keep the rule simple)
        self.undo(mark)

    def end_job(self) -> None:
        """A job of a batch returned (its savepoint still open): its deferred writes go now, so that one
        that fails fails this job and not the next one's statement."""
        if self._written >= 0:
            self._send([])

    # ---- ending ---------------------------------------------------------------------------------------
    def commit(self) -> bool:
        """End the transaction, keeping what it did, with every statement not sent yet; False when the
        database had already failed it (it answers ROLLBACK to a COMMIT then). One that wrote nothing ends
        with ROLLBACK, which keeps the same (nothing) without waiting for the log to reach the disk; one
        that never sent a statement was never begun, and nothing is sent."""
        if not self._begun and all(sql in _CONTROL for sql, _, _ in self._unsent):
            self._unsent = []
            return True
        if not self.wrote:
            self._send([("ROLLBACK", None)])
            return True
        return self._send([("COMMIT", None)])[0].statusmessage == "COMMIT"

    @property
    def begun(self) -> bool:
        """Some statement of this transaction was sent (so there is something to roll back)."""
        return self._begun

    # meta values are text or bytes, as they were set (SQLite's column takes either)
    def get_meta(self, key: str) -> bytes | None:
        if key == AUDIT_HEAD_KEY and self._probing:
            raise _WouldWrite  # (only a writer chains an event on it)
        if key == AUDIT_HEAD_KEY and self._head_unread:
            self._send([])  # the BEGIN, which reads it under the lock
        if key in self._meta:
            value = self._meta[key]
        else:
            value = _meta_value(self._x("SELECT text, bytes FROM meta WHERE key = ?", (key,)).fetchone())
        return cast(bytes | None, value)  # text or bytes, as Tx.get_meta says

    def set_meta(self, key: str, value: bytes | str) -> None:
        text, blob = (None, bytes(value)) if isinstance(value, bytes | memoryview) else (value, None)
        self._w(_SET_META, (key, text, blob))
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
        self._w(f"WITH head AS ({_SET_META}) {INSERT_AUDIT}", (head[0], head[1], None, *row))
        self._kept(*head)

    def control_version(self) -> int:
        row = self._x("SELECT text FROM meta WHERE key = 'control_version'").fetchone()
        return 0 if row is None else int(row[0])

    def bump_control_version(self) -> None:
        self._w(
            "INSERT INTO meta(key, text) VALUES ('control_version', '1') "
            "ON CONFLICT(key) DO UPDATE SET text = CAST(CAST(meta.text AS BIGINT) + 1 AS TEXT)"
        )

    def take_rate_token(
        self, account: str, agent: str, per_minute: int, now: datetime, *, take: bool = True, debt: bool = False
    ) -> float:
        """Tx.take_rate_token in one round trip when a token is taken: the bucket's refill, check and write
        are one upsert (the same arithmetic as Tx's, in the same order), and none of its own with `debt`
        (it is sent with the next). A refusal, or a look only, reads the bucket as Tx does (no row comes
        back when the upsert's condition fails)."""
        if take and per_minute >= 1:
            params = {
                "account": account, "agent": agent, "full": float(per_minute), "at": to_micros(now),
                "floor": 1.0 - per_minute, "debt": debt,
            }
            if debt:  # taken whatever the bucket holds: nothing to wait for
                self._later(_TAKE_RATE_TOKEN, params, keeps_reads=True)
                return 0.0
            self._writing(keeps_reads=True)  # (only rate_buckets, which no read ahead reads)
            if self._send([(_TAKE_RATE_TOKEN, params)])[0].fetchone() is not None:
                return 0.0
        return super().take_rate_token(account, agent, per_minute, now, take=take, debt=debt)

    # a step's statements as one, with data-modifying WITH (one round trip where Tx makes two or three)
    def transfer(self, debit: str, credit: str, amount: int, reason: str, reference: str | None, ts: str) -> int:
        return self._insert_id(
            f"WITH moved AS ({MOVE}) {TRANSFER}",
            (debit, amount, credit, amount, debit, credit, ts, debit, credit, amount, reason, reference),
        )

    def add_units(self, account: str, listing_id: str, units: int, ts: str) -> Holding:
        return _holding(self._x(_ADD_UNITS_RETURNING, (account, listing_id, units, units, ts)).fetchone())

    def sell(
        self, receipt: Receipt, *, account: str, market: str, idempotency_key: str | None, fingerprint: str
    ) -> bool:
        """Tx.sell as one statement, sent with the next (see there): when the units are not counted as sold,
        the purchase row's listing_id is NULL, which its NOT NULL refuses (the error fails the job)."""
        r = receipt
        self._w(_SELL, (
            r.units, r.listing_id, r.units,
            account, r.total, market, r.total, account, market, r.total,
            r.purchased_at, account, market, r.total, r.purchase_id, r.total,
            account, r.listing_id, r.units, r.units, r.purchased_at,
            r.purchase_id, account, r.units, r.unit_price, r.total, r.balance_after, r.units_held, r.purchased_at,
            idempotency_key, fingerprint,
        ))
        return True

    def _take_unit(self, holding_id: int, into: str, reservation: tuple[Any, ...], chosen: bool = False) -> bool:
        """One statement; `chosen` (see Tx.reserve_unit), sent with the next one: when no unit was taken, the
        reservation's holding_id is NULL, which its NOT NULL refuses (the error fails the job)."""
        insert = (
            f"WITH taken AS ({TAKE_UNIT.format(into=into)} RETURNING id) INSERT INTO reservations(id, holding_id, "
            "status, owner, created_at, settled_at) SELECT ?, taken.id, ?, ?, ?, CAST(? AS TEXT) FROM "
        )
        if chosen:
            self._w(insert + "(SELECT 1) AS one LEFT JOIN taken ON TRUE", (holding_id, *reservation))
            return True
        return bool(self._x(insert + "taken", (holding_id, *reservation)).rowcount == 1)

    def _insert_id(self, sql: str, params: Any) -> int:
        row = self._x(sql + " RETURNING id", params).fetchone()
        return int(row[0])

    def _arg(self, key: str) -> str:
        return f"(CAST(args AS JSONB) ->> '{key}')"

    def _arg_true(self, key: str) -> str:
        return f"(CAST(args AS JSONB) -> '{key}') = CAST('true' AS JSONB)"


class _WouldWrite(BaseException):
    """A probing job is about to write (PgDatabase.probe): it runs again as a write. A BaseException, so
    that no job's own `except Exception` (audit.append's, say) takes it for a failure of its own."""


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

    async def probe(self, job: Job[T]) -> T:
        if self._closed:
            raise StoreUnavailable("the database is closed")
        tried = await asyncio.get_running_loop().run_in_executor(self._read_threads, self._probe, job)
        if tried is None:  # it writes, or the try failed: the write path runs it (and says why it fails)
            return await self.write(job)
        return cast(T, tried[0])

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
        tx = PgTx(conn, self._names, on_round_trip=self.on_round_trip)
        backend = conn.info.backend_pid  # the server process of this transaction (see _landed)
        committing = False
        try:
            if write:
                tx.begin_write()
            else:
                tx.begin_read()
            outcomes, keep = _run_jobs(tx, jobs)
            if not keep:  # a lone job failed: nothing to commit
                tx.rolled_back()
                if tx.begun:
                    _rollback(conn)
                return outcomes
            committing = True
            kept = tx.commit()
        except psycopg.Error as exc:
            if committing and not tx.wrote:  # only its end was lost: the jobs read, and what they read stands
                tx.committed()
                _rollback(conn)  # (nothing to do when the connection went)
                return outcomes
            landed = self._landed(tx.last_event, backend) if committing and conn.broken else None
            if landed:  # it did commit: its outcomes stand (the callers were told nothing yet)
                tx.committed()
                return outcomes
            tx.rolled_back()
            if tx.begun:
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
        if not kept:  # pragma: no cover - PostgreSQL answers ROLLBACK to COMMIT in a failed transaction
            tx.rolled_back()
            raise StoreUnavailable("the transaction had failed and was rolled back")
        tx.committed()
        return outcomes


    def _probe(self, job: Job[T]) -> tuple[T] | None:
        """`job` run without a transaction, each statement on its own (READ COMMITTED, autocommit): its
        result, or None when it would write or anything failed (its Python state then put back)."""
        try:
            conn = self._pool.getconn()
        except PoolTimeout:
            return None
        tx = PgTx(conn, self._names, probing=True, on_round_trip=self.on_round_trip)
        try:
            value = job(tx)
        except BaseException:  # _WouldWrite, or whatever the write run will meet again and report
            tx.rolled_back()
            return None
        finally:
            self._pool.putconn(conn)
        tx.committed()
        return (value,)

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
            tx.end_job()
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


class _NothingYet:
    """What a read made while prefetching answers (its rows come later, with the next round trip)."""

    rowcount = 0

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list[Any]:
        return []

    def __iter__(self) -> Iterator[Any]:
        return iter(())


_NOTHING_YET = cast(psycopg.Cursor[Any], _NothingYet())


def _read_key(sql: str, params: Any) -> tuple[str, Any] | None:
    """What identifies a read (its statement and values), or None when its values cannot be compared."""
    values = tuple(sorted(params.items())) if isinstance(params, dict) else tuple(params or ())
    try:
        hash(values)
    except TypeError:
        return None
    return sql, values


def _one(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The one row of the cursor's current result."""
    row = cur.fetchone()
    assert row is not None
    return cast(tuple[Any, ...], row)


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
