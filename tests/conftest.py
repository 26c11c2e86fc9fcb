"""Shared fixtures: a demo runtime on a real SQLite file, with the emulator in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from mcp import Client

from server.app import Runtime, build_mcp, open_runtime
from server.clock import ManualClock
from server.config import load_config
from server.store import Database

T = TypeVar("T")

# Mid-window of the demo listings (2026-01-01 .. 2030-01-01): prices are strictly between start and floor.
DEMO_NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(DEMO_NOW)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "vault.db"


@pytest.fixture
async def db(db_path: Path) -> AsyncIterator[Database]:
    """A store on a real SQLite file (the product's schema), closed after the test."""
    database = await Database.open(db_path)
    try:
        yield database
    finally:
        await database.close()


@asynccontextmanager
async def demo_runtime(db_path: Path, clock: ManualClock, **env: str) -> AsyncIterator[Runtime]:
    """A demo runtime on the SQLite file `db_path`, configured with `env` (TVM_* variables), closed after."""
    rt = await open_runtime(load_config({"TVM_DATABASE": str(db_path), **env}, dotenv=False), clock=clock)
    try:
        yield rt
    finally:
        await rt.aclose()


@pytest.fixture
async def runtime(db_path: Path, clock: ManualClock) -> AsyncIterator[Runtime]:
    async with demo_runtime(db_path, clock) as rt:
        yield rt


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[Client]:
    async with held(Client(build_mcp(runtime, runtime.identity.for_request, "stdio"))) as c:
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
