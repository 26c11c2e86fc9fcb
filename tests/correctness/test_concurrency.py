"""Many clients at once, over Streamable HTTP and in process: no oversell, no overdraft, one charge per key.

Fast by default; `TVM_SLOW=1` multiplies the number of clients and calls. Runs on SQLite and on PostgreSQL
(`both_backends`: a fresh database per test).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from server import market
from server.app import Runtime, build_mcp
from server.clock import ManualClock
from server.config import load_config
from server.invariants import check_invariants
from server.principal import Principal, SubjectToken
from server.store import AuditFilter, SqliteDatabase
from tests.conftest import DEMO_NOW, held, text_of
from tests.server import remote_harness
from tests.server.remote_harness import ALL_SCOPES, Remote, remote_server

pytestmark = pytest.mark.both_backends

SCALE = 4 if os.environ.get("TVM_SLOW") == "1" else 1
CLIENTS = 8 * SCALE
WINDOW = {"opens_at": datetime(2026, 1, 1, tzinfo=UTC), "closes_at": datetime(2030, 1, 1, tzinfo=UTC)}
LAST_UNITS = {"id": "last-units", "title": "scarce", "connection": "github", "scopes": ["repo:read"],
              "supply": 10, "start_price": 1, "floor_price": 1, **WINDOW}
FLAT_TEN = {"id": "flat-ten", "title": "flat", "connection": "stripe", "scopes": ["read_only"],
            "supply": 100_000, "start_price": 10, "floor_price": 10, **WINDOW}

CallTool = Callable[[str, str, dict[str, Any]], Awaitable[tuple[bool, str]]]


async def connect_clients(stack: AsyncExitStack, kind: str, remote: Remote, accounts: list[str]) -> CallTool:
    """`CLIENTS` sessions per account; returns call(account, tool, args) → (ok, code) spreading load."""
    sessions: dict[str, list[Client]] = {}
    for account in accounts:
        sessions[account] = []
        for n in range(CLIENTS):
            if kind == "http":
                client = remote.client(remote.token(account, azp=f"agent-{n}"))
            else:
                bearer = remote.token(account, azp=f"agent-{n}")
                principal = Principal(account, f"agent-{n}", frozenset(ALL_SCOPES),
                                      SubjectToken(bearer, "access_token"))
                client = Client(build_mcp(remote.runtime, _fixed(principal), "memory"))
            sessions[account].append(await stack.enter_async_context(held(client)))
    turn = Counter[str]()

    async def call(account: str, tool: str, args: dict[str, Any]) -> tuple[bool, str]:
        turn[account] += 1
        client = sessions[account][turn[account] % len(sessions[account])]
        result = await client.call_tool(tool, args)
        if result.is_error:
            return False, text_of(result).split("]", 1)[0].lstrip("[")
        return True, "ok"

    return call


def _fixed(principal: Principal) -> Callable[[object], Awaitable[Principal]]:
    async def principals(_: object) -> Principal:
        return principal

    return principals


def serve_from(monkeypatch: pytest.MonkeyPatch, database: str) -> None:
    """Make `remote_server` open its runtime on `database` (TVM_DATABASE) rather than on a file of its own."""
    monkeypatch.setattr(remote_harness, "load_config",
                        lambda env, **kw: load_config({**env, "TVM_DATABASE": database}, **kw))


@pytest.fixture(params=["http", "memory"])
async def setup(
    request: pytest.FixtureRequest, tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Remote, CallTool]]:
    serve_from(monkeypatch, database)
    async with held(remote_server(tmp_path, "http", ManualClock(DEMO_NOW))) as remote, AsyncExitStack() as stack:
        assert isinstance(remote.runtime.db, SqliteDatabase) != database.startswith("postgresql://")
        specs = market.parse_listings({"listing": [LAST_UNITS, FLAT_TEN]})
        await remote.runtime.db.write(lambda tx: market.load(tx, specs))
        remote.tenant.state.add_user("auth0|carol")
        for account in ("auth0|alice", "auth0|bob", "auth0|carol"):
            remote.tenant.state.connect_account(account, "stripe", ["read_only"])
        await remote.runtime.broker.credit("auth0|carol", 100)
        call = await connect_clients(stack, request.param, remote, ["auth0|alice", "auth0|bob", "auth0|carol"])
        yield remote, call


async def audited_calls(runtime: Runtime) -> int:
    records = await runtime.db.read(lambda tx: tx.find_audit(AuditFilter()))
    return sum(1 for r in records if r.tool in ("list_market", "check_balance", "buy_quota", "request_token"))


async def test_races_never_oversell_overdraw_or_double_charge(setup: tuple[Remote, CallTool]) -> None:
    remote, call = setup
    runtime = remote.runtime
    before = await audited_calls(runtime)
    calls = 0

    # 1. Everyone races for the last 10 units.
    buyers = [call(a, "buy_quota", {"listing_id": "last-units", "units": 1, "max_unit_price": 5})
              for a in ("auth0|alice", "auth0|bob") for _ in range(3 * CLIENTS)]
    outcomes = Counter(code for _, code in await asyncio.gather(*buyers))
    calls += len(buyers)
    assert outcomes == {"ok": 10, "sold_out": len(buyers) - 10}

    # 2. Carol's 100 credits, spent by many agents at once on a 10-credit unit.
    spenders = [call("auth0|carol", "buy_quota", {"listing_id": "flat-ten", "units": 1, "max_unit_price": 10})
                for _ in range(4 * CLIENTS)]
    outcomes = Counter(code for _, code in await asyncio.gather(*spenders))
    calls += len(spenders)
    assert outcomes == {"ok": 10, "insufficient_funds": len(spenders) - 10}
    assert await runtime.db.read(lambda tx: tx.balance("auth0|carol")) == 0

    # 3. One idempotency key retried concurrently: one charge, one receipt.
    alice_before = await runtime.db.read(lambda tx: tx.balance("auth0|alice"))
    retries = [call("auth0|alice", "buy_quota", {"listing_id": "flat-ten", "units": 2, "max_unit_price": 10,
                                                 "idempotency_key": "same-order"}) for _ in range(2 * CLIENTS)]
    assert all(ok for ok, _ in await asyncio.gather(*retries))
    calls += len(retries)
    assert await runtime.db.read(lambda tx: tx.balance("auth0|alice")) == alice_before - 20

    # 4. Carol's 10 stripe units, requested by many agents at once.
    tokens = [call("auth0|carol", "request_token", {"connection": "stripe", "scopes": ["read_only"],
                                                    "purpose": "race"}) for _ in range(3 * CLIENTS)]
    outcomes = Counter(code for _, code in await asyncio.gather(*tokens))
    calls += len(tokens)
    assert outcomes == {"ok": 10, "no_quota": len(tokens) - 10}

    assert await runtime.db.read(check_invariants) == []
    listing = await runtime.db.read(lambda tx: tx.get_listing("last-units"))
    assert listing is not None and listing.sold == listing.supply == 10
    assert await audited_calls(runtime) - before == calls
