"""The store seam: what the broker, the CLI and the tests hold, whichever backend is behind it.

A store runs *jobs*: synchronous functions of a `Tx` (server.store.tx), each in a transaction
with whatever else commits with it. Two backends implement it:

- SQLite (server.store.database): one file, the embedded default; jobs batched into group
  commits on one connection.
- PostgreSQL (server.store.postgres): one database shared by any number of replicas; jobs
  batched per replica, writers across replicas ordered by the database.

`open_database(TVM_DATABASE's value)` picks the backend: a `postgresql://` (or `postgres://`)
URL is PostgreSQL, anything else the path of a SQLite file.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from server.store.tx import Tx

T = TypeVar("T")
Job = Callable[["Tx"], T]
URL_SCHEMES = ("postgresql", "postgres")


class StoreUnavailable(Exception):
    """The database could not commit (disk, lock, corruption, a lost connection). Nothing of the batch was
    kept — unless `outcome_unknown`: the connection was lost while committing and nothing could tell
    whether the commit landed."""

    def __init__(self, message: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


class DatabaseMissing(Exception):
    """Opened only to read, the database is not there (no SQLite file, no schema in PostgreSQL)."""


def is_database_url(value: str | os.PathLike[str]) -> bool:
    """Whether TVM_DATABASE's value names a PostgreSQL database rather than a SQLite file."""
    return isinstance(value, str) and value.split("://", 1)[0].lower() in URL_SCHEMES and "://" in value


def shown_url(url: str) -> str:
    """`url` fit for messages and logs: its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def deliver(batch: Sequence[tuple[Any, asyncio.Future[Any]]], outcomes: Sequence[tuple[bool, Any]]) -> None:
    """Hand each job of a committed batch its outcome: its value, or its own exception."""
    for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def fail_all(batch: Sequence[tuple[Any, asyncio.Future[Any]]], exc: BaseException) -> None:
    """The batch itself failed (not one job of it): every waiting call hears StoreUnavailable."""
    for _, future in batch:
        if not future.done():
            future.set_exception(StoreUnavailable(str(exc)))


class Database:
    """What every backend offers. Open one with `await open_database(target)` (or `Database.open`)."""

    path: Path | str  # where it is, for messages: the SQLite file, or the PostgreSQL URL without its password
    hmac_key: bytes  # the per-database key of token fingerprints (server.audit.token_fingerprint)
    on_batch: Callable[[int], None] | None = None  # told the number of jobs of each transaction run (metrics)
    # told of each round trip to a database server (metrics; SQLite's statements run in process and make none),
    # on whatever thread made it
    on_round_trip: Callable[[], None] | None = None

    @classmethod
    async def open(cls, target: str | os.PathLike[str], *, create: bool = True) -> Database:
        """Open the store at `target` (see open_database)."""
        return await open_database(target, create=create)

    async def write(self, job: Job[T]) -> T:
        """Run `job` in a write transaction, batched with concurrent jobs; return its result.

        The job's own exception is re-raised (its changes rolled back). Raises StoreUnavailable when
        the batch could not commit.
        """
        raise NotImplementedError

    async def read(self, job: Job[T]) -> T:
        """Run a read-only `job` on committed data (one consistent view). Raises StoreUnavailable."""
        raise NotImplementedError

    async def probe(self, job: Job[T]) -> T:
        """Run a write `job` that most often only reads (call_api finding its live grant): as `write` does,
        or, on a backend whose readers wait for no writer, first without the write lock, each statement on
        the data committed when it runs, and again as a write only when it turns out to write (its on_undo
        hooks put back what the first run changed). Raises what `write` raises."""
        return await self.write(job)

    def reader(self) -> Database:
        """Where long read-only jobs go (the console's audit verify, agent activity, audit scans): a store
        whose `read` runs them off the event loop and holds no lock writers wait for. Most backends read
        that way already and answer themselves; SQLite answers a reader with connections of its own."""
        return self

    async def close(self) -> None:
        raise NotImplementedError


async def open_database(target: str | os.PathLike[str], *, create: bool = True) -> Database:
    """Open (creating and migrating as needed) the store TVM_DATABASE names: PostgreSQL for a URL, else SQLite.

    With `create` false the store must already exist (reading commands: a mistyped TVM_DATABASE must
    not answer from a fresh, empty database). Raises DatabaseMissing, StoreUnavailable.
    """
    if is_database_url(target):
        from server.store.postgres import PgDatabase  # the driver is loaded only when it is used

        return await PgDatabase.connect(str(target), create=create)
    from server.store.database import SqliteDatabase

    return await SqliteDatabase.open(target, create=create)
