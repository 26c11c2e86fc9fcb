"""One SQLite file, opened through aiosqlite, with group commit.

Every write is a *job*: a synchronous function of a `Tx`. Jobs that arrive together (in
the same turn of the event loop, or while a commit is under way) run in one
`BEGIN IMMEDIATE … COMMIT`, each inside its own savepoint, so one job's failure rolls back
only that job, and N concurrent callers pay for one fsync instead of N. A batch runs on
aiosqlite's worker thread, so its fsync overlaps the event loop's other work; a lone job
runs inline in its caller, sparing thread hand-offs, a task and a future (jobs are short: a
tool call's transaction). Durability is never traded away: WAL with `synchronous=FULL`.

The event loop never waits for SQLite's write lock: inline, `BEGIN IMMEDIATE` runs with no
busy timeout, and when another process (a `wallet credit`, a `market load`, another server)
holds the lock, the job goes to the worker thread, which waits up to `busy_timeout` for it
while the loop keeps serving. In WAL mode a transaction that began holds the lock until its
COMMIT, so nothing after `BEGIN IMMEDIATE` can be busy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from server.store.base import Database, DatabaseMissing, Job, StoreUnavailable, deliver, fail_all
from server.store.schema import MIGRATIONS, SCHEMA_VERSION
from server.store.tx import SqliteTx

T = TypeVar("T")
log = logging.getLogger(__name__)

MAX_BATCH = 256
BUSY_TIMEOUT = 10.0  # seconds a transaction waits (on the worker thread) for another process's write lock
# One call at a time (an agent's loop), a leader's turn of waiting is ~50 µs for nothing: after this
# many leaders in a row found no company, only every this-many-th waits (see Database.write).
SOLO_CALLS = 8


class SqliteDatabase(Database):
    """The broker's SQLite database. Open with `await SqliteDatabase.open(path)` (or `open_database`)."""

    def __init__(self, path: Path, conn: aiosqlite.Connection, hmac_key: bytes, *, inline: bool = True) -> None:
        self.path = path
        self._conn = conn
        self.hmac_key = hmac_key
        self.busy_timeout = BUSY_TIMEOUT
        # Jobs may try the write lock on the loop itself only where a begun transaction cannot be busy
        # (WAL); otherwise (a filesystem without WAL) every job runs on the worker thread.
        self._inline = inline
        self._queue: list[tuple[Job[Any], asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._leading = False  # a call is collecting the jobs ready to join its commit
        self._solo = 0  # leaders in a row that found no company (see write)
        self._closed = False
        self._names: dict[str, int] = {}  # audit name → id, as committed (see Tx.name_id)
        self.on_batch: Callable[[int], None] | None = None  # told the jobs of each transaction run (metrics)
        self._reader: SqliteReader | None = None

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> SqliteDatabase:
        """Open (creating and migrating as needed) the database at `path`; with `create` false it must exist.

        Raises DatabaseMissing."""
        file = Path(path)  # callers expand ~ (config does)
        if not create and not await asyncio.to_thread(file.exists):
            raise DatabaseMissing(f"there is no database at {file}")
        await asyncio.to_thread(file.parent.mkdir, parents=True, exist_ok=True)
        conn = await aiosqlite.connect(file, isolation_level=None, check_same_thread=False)
        try:
            key, wal = await conn._execute(_prepare, conn._conn)
        except BaseException:
            await conn.close()
            raise
        try:
            os.chmod(file, 0o600)
        except OSError:  # pragma: no cover - e.g. a read-only mount; not fatal
            pass
        return cls(file, conn, key, inline=wal)

    async def write(self, job: Job[T]) -> T:
        """Run `job` in a write transaction, batched with concurrent jobs; return its result.

        The job's own exception is re-raised (its changes rolled back). Raises
        StoreUnavailable when the batch could not commit.
        """
        if self._closed:
            raise StoreUnavailable("the database is closed")
        if self._leading or not (self._writer is None or self._writer.done()):
            self._solo = 0  # calls overlap: wait for company again
            return await self._enqueue(job)
        # Nothing under way: this call leads. Calls ready to run in this turn of the loop join it
        # (they queue behind it); if none did (one call at a time), its transaction runs right
        # here, sparing a writer task and a future. After SOLO_CALLS leaders in a row found no
        # company, only every SOLO_CALLS-th still waits its turn (a probe): the others run at once.
        if self._solo < SOLO_CALLS or self._solo % SOLO_CALLS == 0:
            self._leading = True
            try:
                await asyncio.sleep(0)
            except BaseException:  # cancelled before its job ran: the calls that joined go on without it
                self._leading = False
                self._start_writer()
                raise
            self._leading = False
            if self._queue:
                self._solo = 0
                return await self._enqueue(job, first=True)
        self._solo += 1
        try:  # no await from here to the end of the transaction: nothing can interleave
            outcomes = _run_batch(self._conn._conn, [(job, None)], self._names) if self._inline else None
        except Exception as exc:  # the transaction itself failed (not the job)
            raise StoreUnavailable(str(exc)) from None
        if outcomes is None:  # another process holds the write lock: wait for it off the loop
            self._solo = 0
            return await self._enqueue(job, first=True)
        if self.on_batch is not None:
            self.on_batch(1)
        ((ok, value),) = outcomes
        if ok:
            return cast(T, value)
        raise value

    def _enqueue(self, job: Job[T], *, first: bool = False) -> asyncio.Future[T]:
        """Queue `job` for the writer's next group commit."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if first:
            self._queue.insert(0, (job, future))
        else:
            self._queue.append((job, future))
        if not self._leading:
            self._start_writer()
        return future

    def _start_writer(self) -> None:
        if self._queue and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._drain())

    async def read(self, job: Job[T]) -> T:
        """Run a read-only `job` (serialized with the writer; it sees committed data)."""
        return await self.write(job)

    def reader(self) -> Database:
        """Long read-only jobs on connections of their own (see `SqliteReader`), opened on first use."""
        if self._reader is None:
            self._reader = SqliteReader(Path(self.path), self.hmac_key)
        return self._reader

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            await asyncio.shield(self._writer)
        if self._reader is not None:
            await self._reader.close()
        await self._conn.close()


    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                outcomes = None
                if len(batch) == 1 and self._inline:
                    # A lone job (one call at a time) runs right here: the two thread hand-offs would cost
                    # more than its transaction. Only this task touches the connection, so never both at once.
                    outcomes = _run_batch(self._conn._conn, batch, self._names)
                if outcomes is None:  # a batch, or the write lock is held elsewhere: the thread waits for it
                    outcomes = await self._conn._execute(
                        _run_batch, self._conn._conn, batch, self._names, self.busy_timeout
                    )
            except BaseException as exc:  # the batch itself failed (not one job of it)
                fail_all(batch, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            deliver(batch, outcomes)


def _prepare(conn: sqlite3.Connection) -> tuple[bytes, bool]:
    """Set the connection up, create or migrate the schema; the HMAC key and whether WAL is on."""
    conn.execute(f"PRAGMA busy_timeout = {round(BUSY_TIMEOUT * 1000)}")  # on the worker thread
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    wal = str(mode).lower() == "wal"
    if not wal:  # pragma: no cover - e.g. a network filesystem
        log.warning("SQLite refused WAL mode (%s); running with %s", mode, mode)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"the database schema is version {version}, newer than this program knows ({SCHEMA_VERSION})"
            )
        for number in range(version, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
        row = conn.execute("SELECT value FROM meta WHERE key = 'token_hmac_key'").fetchone()
        if row is None:
            key = secrets.token_bytes(32)
            conn.execute("INSERT INTO meta(key, value) VALUES ('token_hmac_key', ?)", (key,))
            for name, kind in (("market", "market"), ("mint", "mint")):
                conn.execute("INSERT INTO accounts(name, kind) VALUES (?, ?)", (name, kind))
        else:
            key = bytes(row[0])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if wal:  # inline BEGINs never wait; the worker thread polls for the lock (see _begin)
        conn.execute("PRAGMA busy_timeout = 0")
    return key, wal


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _run_batch(
    conn: sqlite3.Connection, batch: list[tuple[Job[Any], Any]], names: dict[str, int], wait: float = 0.0
) -> list[tuple[bool, Any]] | None:
    """Run `batch` in one transaction: each job's outcome, or None when the write lock is held elsewhere
    and `wait` is 0 (nothing ran). With `wait`, wait up to that many seconds for the lock."""
    try:
        _begin(conn, wait)
    except sqlite3.Error as exc:
        if wait <= 0 and _busy(exc):
            return None
        return [(False, StoreUnavailable(str(exc)))] * len(batch)
    tx = SqliteTx(conn, names)
    if len(batch) == 1:
        return _run_alone(conn, tx, batch[0][0])
    outcomes: list[tuple[bool, Any]] = []
    for job, _ in batch:
        conn.execute("SAVEPOINT job")
        mark = tx.mark()
        try:
            value = job(tx)
        except BaseException as exc:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            tx.undo(mark)
            outcomes.append((False, exc))
        else:
            conn.execute("RELEASE job")
            outcomes.append((True, value))
    failed = _commit(conn, tx)
    return outcomes if failed is None else [(False, failed)] * len(batch)


def _begin(conn: sqlite3.Connection, wait: float) -> None:
    """BEGIN IMMEDIATE; while another connection holds the write lock, try again for up to `wait` seconds.

    Polling here (on the worker thread) rather than SQLite's busy timeout keeps the connection's own
    timeout at 0, so an inline attempt on the event loop never sleeps. Raises sqlite3.Error.
    """
    deadline = time.monotonic() + wait
    pause = 0.001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            left = deadline - time.monotonic()
            if not _busy(exc) or left <= 0:
                raise
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.02)


def _busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) if isinstance(code, int) else False


def _run_alone(conn: sqlite3.Connection, tx: SqliteTx, job: Job[Any]) -> list[tuple[bool, Any]]:
    """A batch of one needs no savepoint: its failure rolls the whole transaction back."""
    try:
        value = job(tx)
    except BaseException as exc:
        if conn.in_transaction:  # SQLite may have rolled back already (e.g. SQLITE_FULL)
            conn.execute("ROLLBACK")
        tx.rolled_back()
        return [(False, exc)]
    failed = _commit(conn, tx)
    return [(True, value)] if failed is None else [(False, failed)]


def _commit(conn: sqlite3.Connection, tx: SqliteTx) -> StoreUnavailable | None:
    """COMMIT (the durable fsync); on failure roll back and say why (nothing of the batch was kept)."""
    try:
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        log.error("commit failed: %s", exc)
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:  # pragma: no cover - the transaction is already gone
            pass
        tx.rolled_back()
        return StoreUnavailable(str(exc))
    tx.committed()
    return None


class SqliteReader(Database):
    """Read-only jobs on read-only connections of their own, on worker threads.

    `SqliteDatabase.read` shares the writer's connection and its `BEGIN IMMEDIATE` (often inline on the
    event loop): right for a tool call's short reads, wrong for a scan of a million events, which would
    stall the loop and every writer meanwhile. Here each job runs in a deferred transaction (one
    consistent WAL snapshot) that takes no write lock, so writers go on while it reads. Writes are refused
    by the connection itself (`mode=ro`).
    """

    WORKERS = 2

    def __init__(self, path: Path, hmac_key: bytes) -> None:
        self.path: Path = path
        self.hmac_key = hmac_key
        self._threads = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="sqlite-reader")
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            self._local.conn = conn
            with self._lock:
                self._opened.append(conn)
        return conn

    def _run(self, job: Job[T]) -> T:
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            return job(SqliteTx(conn, {}))
        finally:
            conn.execute("ROLLBACK")

    async def read(self, job: Job[T]) -> T:
        """Run a read-only `job` on a worker thread. Raises StoreUnavailable when SQLite fails."""
        if self._closed:
            raise StoreUnavailable("the database is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, self._run, job)
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from None

    async def write(self, job: Job[T]) -> T:
        raise StoreUnavailable("a reader does not write")

    async def close(self) -> None:
        self._closed = True
        await asyncio.to_thread(self._threads.shutdown, wait=True)
        with self._lock:
            for conn in self._opened:
                conn.close()
            self._opened.clear()
