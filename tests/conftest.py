"""Shared fixtures: a demo runtime on a real store, with the emulator in process.

The store is a SQLite file; in modules marked `both_backends` every test that uses one (`db`,
`database`, `runtime`) runs twice, on SQLite and on PostgreSQL (its own database, created for the test
and dropped after it), unless it is marked `sqlite_only`. PostgreSQL is reached through the
maintenance database of TVM_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from mcp import Client

from server.app import Runtime, build_mcp, open_runtime
from server.clock import ManualClock
from server.config import load_config
from server.store import Database, open_database
from tests.browser import browser  # noqa: F401  (a real headless Chromium for every test that asks)

T = TypeVar("T")

# Mid-window of the demo listings (2026-01-01 .. 2030-01-01): prices are strictly between start and floor.
DEMO_NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(DEMO_NOW)


BACKENDS = ("sqlite", "postgresql")
PG_ADMIN = os.environ.get("TVM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    node = metafunc.definition
    if node.get_closest_marker("both_backends") and not node.get_closest_marker("sqlite_only"):
        metafunc.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The store this test runs on: "sqlite", or "postgresql" (see the module docstring)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "vault.db"


@contextmanager
def pg_database(template: str = "template1") -> Iterator[str]:
    """A new PostgreSQL database (its URL), a copy of `template` (by default an empty one), dropped afterwards."""
    import psycopg

    name = "tvm_t_" + secrets.token_hex(6)
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield pg_url(name)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class PgDatabases:
    """Each PostgreSQL test's own database: a copy of a template that holds the product's schema and nothing
    else (no HMAC key, no accounts: each copy makes its own key when opened). A thread keeps the next copies
    made, and drops used ones, while tests run: CREATE DATABASE takes a third of a second, mostly I/O."""

    SPARES = 2

    def __init__(self, template: str) -> None:
        self.template = template
        self._ready: list[str] = []
        self._used: list[str] = []
        self._closing = False
        self._failure: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="pg-test-databases", daemon=True)
        self._thread.start()

    def take(self) -> str:
        """A new database's name, made for the caller alone."""
        with self._changed:
            while not self._ready and self._failure is None:
                self._changed.wait()
            if self._failure is not None:
                raise RuntimeError(f"cannot create PostgreSQL test databases: {self._failure}")
            name = self._ready.pop(0)
            self._changed.notify_all()
            return name

    def give_back(self, name: str) -> None:
        with self._changed:
            self._used.append(name)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()

    def _work(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            while True:
                with self._changed:
                    while not self._closing and not self._used and len(self._ready) >= self.SPARES:
                        self._changed.wait()
                    drop = self._used.pop(0) if self._used else None
                    closing = self._closing
                if drop is not None:
                    admin.execute(f"DROP DATABASE IF EXISTS {drop} WITH (FORCE)")
                    continue
                if closing:
                    for name in self._ready:
                        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                    return
                name = "tvm_t_" + secrets.token_hex(6)
                try:
                    admin.execute(f"CREATE DATABASE {name} TEMPLATE {self.template}")
                except psycopg.Error as exc:
                    with self._changed:
                        self._failure = exc
                        self._changed.notify_all()
                    return
                with self._changed:
                    self._ready.append(name)
                    self._changed.notify_all()


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    import psycopg

    with pg_database() as url:
        asyncio.run(_close_after_open(url))  # the schema, made by the product
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM meta WHERE key = 'token_hmac_key'")
            conn.execute("DELETE FROM accounts")
        databases = PgDatabases(url.rsplit("/", 1)[1].partition("?")[0])
        try:
            yield databases
        finally:
            databases.close()


async def _close_after_open(url: str) -> None:
    await (await open_database(url)).close()


def pg_url(name: str) -> str:
    """The URL of the database `name` on the test server."""
    base, _, query = PG_ADMIN.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")


@pytest.fixture
def database(backend: str, db_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """TVM_DATABASE for this test's store: the SQLite file's path, or a fresh PostgreSQL database's URL."""
    if backend == "sqlite":
        yield str(db_path)
        return
    databases: PgDatabases = request.getfixturevalue("pg_databases")
    name = databases.take()
    try:
        yield pg_url(name)
    finally:
        databases.give_back(name)


@pytest.fixture
async def db(database: str) -> AsyncIterator[Database]:
    """A store with the product's schema (a SQLite file, or PostgreSQL: see `backend`), closed after the test."""
    store = await open_database(database)
    try:
        yield store
    finally:
        await store.close()


class Side:
    """Another process's connection to the test's store, to change it behind the broker's back.

    Each statement commits on its own; `?` placeholders work on both backends.
    """

    def __init__(self, database: str) -> None:
        self.postgres = database.startswith("postgresql://")
        if self.postgres:
            import psycopg

            self._pg = psycopg.connect(database, autocommit=True)
        else:
            self._lite = sqlite3.connect(database, isolation_level=None)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.postgres:
            cur = self._pg.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
            return list(cur.fetchall()) if cur.description else []
        return self._lite.execute(sql, params).fetchall()

    def close(self) -> None:
        (self._pg if self.postgres else self._lite).close()


@contextmanager
def side(database: str) -> Iterator[Side]:
    connection = Side(database)
    try:
        yield connection
    finally:
        connection.close()


@asynccontextmanager
async def demo_runtime(database: str | Path, clock: ManualClock, **env: str) -> AsyncIterator[Runtime]:
    """A demo runtime on the store `database` (TVM_DATABASE), configured with `env` (TVM_* variables), closed after."""
    rt = await open_runtime(load_config({"TVM_DATABASE": str(database), **env}, dotenv=False), clock=clock)
    try:
        yield rt
    finally:
        await rt.aclose()


@pytest.fixture
async def runtime(database: str, clock: ManualClock) -> AsyncIterator[Runtime]:
    async with demo_runtime(database, clock) as rt:
        yield rt


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[Client]:
    async with demo_client(runtime) as c:
        yield c


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of jobs in each transaction the store runs from now on (group commit at work)."""
    import server.store.database as database

    sizes: list[int] = []
    real_batch = database._run_batch

    def counted(conn: Any, batch: list[Any], names: dict[str, int], wait: float = 0.0) -> Any:
        outcomes = real_batch(conn, batch, names, wait)
        if outcomes is not None:  # None: the write lock was busy and nothing ran
            sizes.append(len(batch))
        return outcomes

    monkeypatch.setattr(database, "_run_batch", counted)
    return sizes


def demo_client(runtime: Runtime) -> AbstractAsyncContextManager[Client]:
    """The SDK's in-process client on `runtime`'s MCP server, as the stdio user (the demo account)."""
    return held(Client(build_mcp(runtime, runtime.identity.for_request, "stdio")))


@asynccontextmanager
async def held(context: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """Enter and exit `context` in one task of its own.

    pytest-asyncio tears fixtures down in another task than it set them up in, which the
    SDK's anyio task groups refuse; a dedicated owner task keeps both ends together.
    """
    entered: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def owner() -> None:
        try:
            async with context as value:
                entered.set_result(value)
                await release.wait()
        except BaseException as exc:
            if not entered.done():
                entered.set_exception(exc)
            else:
                raise

    task = asyncio.create_task(owner())
    try:
        yield await entered
    finally:
        release.set()
        await task


def text_of(result: Any) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def ok(client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    """Call a tool that must succeed; return its structured content."""
    result = await client.call_tool(tool, args)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return result.structured_content


async def refused(client: Client, tool: str, args: dict[str, Any]) -> str:
    """Call a tool that must fail; return its `[code] message` text."""
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool} unexpectedly succeeded: {result.structured_content}"
    text = text_of(result)
    assert text.startswith("["), text
    return text
