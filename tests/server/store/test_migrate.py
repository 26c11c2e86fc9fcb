"""`db migrate` (server.store.migrate, SPEC §12): a SQLite database with a long, varied history, copied through the
real command into an empty PostgreSQL database, verifies there, exports the same log line for line, shows the same
books and finds the same token's events; a target that is not empty, not PostgreSQL or fails halfway keeps nothing."""

from __future__ import annotations

import asyncio
import os
import pty
import random
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest

from server import audit, market
from server.audit import Event
from server.clock import ManualClock, rfc3339
from server.policy import parse_policy
from server.store import Tx, open_database
from server.store.migrate import TABLES, MigrationFailed, MigrationRefused, migrate
from server.store.pg_schema import PG_SCHEMA_VERSION
from tests.conftest import DEMO_NOW, demo_client, demo_runtime, ok, pg_database, refused, side
from tests.server.provider_harness import provider_api
from tests.server.test_cli import Done, environment, run

EVENTS = 12_000  # appended straight to the chain, beyond the tool calls' own: more than two batches of the copy
ASK = {"connection": "github", "scopes": ["repo:read"], "purpose": "list open pull requests"}
POLICY = """
[[agent]]
id = "ci-bot"
calls_per_minute = 30
max_spend_per_day = 1000
"""


@dataclass(frozen=True)
class History:
    path: Path
    account: str  # the demo user, who bought, spent and called
    token: str  # a token request_token handed out (its events are looked up on the copy)


def appended(count: int) -> Iterator[Event]:
    """Varied events: rejected authentications, refusals, odd text, token fingerprints, latencies."""
    draw = random.Random(14)
    for n in range(count):
        kind = n % 5
        yield Event(
            ts=rfc3339(DEMO_NOW + timedelta(seconds=n, microseconds=n % 997)),
            transport=("stdio", "http", "sse")[n % 3],
            outcome=("ok", "denied", "error", "ok", "denied")[kind],
            account=None if kind == 4 else f"auth0|user-{n % 17}",
            agent=None if kind == 4 else f"agent-{n % 5}",
            tool=None if kind == 4 else ("request_token", "buy_quota", "call_api", "check_balance")[n % 4],
            scope=None if kind == 4 else "request:token",
            code=(None, "forbidden", "vault_unavailable", None, "invalid_token")[kind],
            args={"purpose": f"run {n}: café ✓ \u202e\x1b[2J", "units": n % 9, "secret": "x"} if kind != 4 else {},
            token_id=draw.randbytes(32) if kind == 1 else None,  # denied: an ok request_token needs a reservation
            latency_ms=None if kind == 3 else draw.random() * 1000,
        )


def append_all(tx: Tx, events: list[Event]) -> None:
    for event in events:
        audit.append(tx, event)


async def build(path: Path) -> History:
    """A history made by the product itself: tools over MCP on the demo tenant, operator actions, a long log."""
    clock = ManualClock(DEMO_NOW)
    async with provider_api() as provider, demo_runtime(path, clock) as rt:
        window = {"opens_at": DEMO_NOW - timedelta(days=1), "closes_at": DEMO_NOW + timedelta(days=30)}
        proxy = market.parse_listings({"listing": [{
            "id": "github-api", "title": "GitHub API", "connection": "github", "scopes": ["repo:read"],
            "delivery": "proxy", "api": [provider.base_url], "supply": 50, "start_price": 10, "floor_price": 2,
            **window,
        }]})
        await rt.db.write(lambda tx: market.load(tx, proxy))
        assert rt.tenant is not None
        async with demo_client(rt) as c:
            buy = {"listing_id": "github-repo-read", "units": 3, "max_unit_price": 100, "idempotency_key": "k-1"}
            first = await ok(c, "buy_quota", buy)
            assert (await ok(c, "buy_quota", buy))["purchase_id"] == first["purchase_id"]  # charged once
            await refused(c, "buy_quota", {**buy, "idempotency_key": "k-2", "max_unit_price": 1})
            token = await ok(c, "request_token", ASK)
            clock.advance(timedelta(minutes=2))
            await ok(c, "request_token", {**ASK, "purpose": "again, «quoted» \x07"})
            await refused(c, "request_token", {**ASK, "connection": "gitlab"})
            await ok(c, "buy_quota", {"listing_id": "github-api", "units": 2, "max_unit_price": 100})
            call = {**ASK, "method": "GET", "url": provider.base_url + "/echo/repos/acme/x?per_page=5"}
            await ok(c, "call_api", call)
            await ok(c, "call_api", call)  # inside the grant the first call opened
            await ok(c, "check_balance", {})
        await rt.broker.credit("auth0|bob", 750)
        await rt.broker.transfer_credits("cli:ops", "auth0|bob", "auth0|carol", 50, "move-1")  # operator moves
        await rt.broker.transfer_units("cli:ops", rt.tenant.account, "auth0|carol", "github-repo-read", 1)
        await rt.broker.load_policy(parse_policy(tomllib.loads(POLICY)), by="cli:ops")
        await rt.broker.block_agent("ci-bot", "ran away with the budget", by="cli:ops")
        events = list(appended(EVENTS))
        for start in range(0, EVENTS, 2_000):
            await rt.db.write(partial(append_all, events=events[start : start + 2_000]))
        return History(path, rt.tenant.account, str(token["access_token"]))


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return asyncio.run(build(tmp_path_factory.mktemp("source") / "vault.db"))


@pytest.fixture
def target() -> Iterator[str]:
    with pg_database() as url:
        yield url


def cli(history: History, *args: str, on: str | None = None, stdin: str | None = None) -> Done:
    """The real command, with TVM_DATABASE the source (or `on`)."""
    return run(history.path.parent, *args, env={"TVM_DATABASE": on or str(history.path)}, stdin=stdin)


def contents(url: str) -> dict[str, list[str]]:
    """Every row of every table of a PostgreSQL database, as text, by table."""
    with side(url) as db:
        tables = [t for (t,) in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return {t: sorted(str(r) for r in db.execute(f"SELECT * FROM {t}")) for t in sorted(tables)}


def source_rows(history: History) -> dict[str, int]:
    with side(str(history.path)) as db:
        return {t: db.execute(f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}


def test_migrated_copy_verifies_exports_the_same_log_and_shows_the_same_books(history: History, target: str) -> None:
    done = cli(history, "db", "migrate", "--to", target)
    assert done.code == 0, done.err
    rows = source_rows(history)
    assert rows["audit"] > EVENTS and rows["purchases"] == 2 and rows["grants"] == 1 and rows["agent_blocks"] == 1
    summary = {line.split()[0]: line.split()[1] for line in done.out.splitlines()[2:-1]}
    assert summary == {t: str(n) for t, n in rows.items()}
    with side(str(history.path)) as lite:
        key, head = (lite.execute("SELECT value FROM meta WHERE key = ?", (k,))[0][0]
                     for k in ("token_hmac_key", "audit_head"))
    assert f"audit: {rows['audit']} events, head {head};" in done.out

    verified = cli(history, "audit", "verify", "--ledger", on=target)
    assert (verified.code, verified.out) == (0, f"audit chain OK: {rows['audit']} events\nledger invariants OK\n")
    with side(target) as pg:
        assert pg.execute("SELECT bytes FROM meta WHERE key = 'token_hmac_key'")[0][0] == key
        assert {t: pg.execute(f"SELECT count(*) FROM {t}")[0][0] for t in TABLES} == rows
    same = [
        ["audit", "export"], ["audit", "list", "--limit", "0", "--json"], ["audit", "list", "--agent", "agent-3"],
        ["wallet", "show", history.account, "--json"], ["wallet", "show", "auth0|bob"], ["wallet", "show", "market"],
        ["policy", "show", "--json"], ["agent", "list", "--json"],
    ]
    for command in same:
        before, after = cli(history, *command), cli(history, *command, on=target)
        assert (after.code, after.raw) == (before.code, before.raw) == (0, before.raw), command
    assert len(before.raw) > 0
    export = cli(history, "audit", "export", on=target).out.splitlines()
    assert len(export) == rows["audit"]

    found = cli(history, "audit", "lookup", "--token-stdin", "--json", on=target, stdin=history.token + "\n")
    assert found.code == 0 and found.out
    assert found.raw == cli(history, "audit", "lookup", "--token-stdin", "--json", stdin=history.token + "\n").raw


def test_the_copy_carries_on_past_the_copied_ids_and_chain(history: History, target: str) -> None:
    assert cli(history, "db", "migrate", "--to", target).code == 0
    with side(target) as pg:
        last_transfer = pg.execute("SELECT max(id) FROM transfers")[0][0]
    credited = cli(history, "wallet", "credit", "auth0|carol", "40", on=target)
    assert credited.code == 0, credited.err
    assert cli(history, "agent", "block", "agent-new", on=target).code == 0  # a new audit name, a new id
    verified = cli(history, "audit", "verify", "--ledger", on=target)
    assert verified.code == 0, verified.out
    assert f"audit chain OK: {source_rows(history)['audit'] + 2} events" in verified.out
    with side(target) as pg:
        assert pg.execute("SELECT max(id) FROM transfers")[0][0] == last_transfer + 1


def test_a_second_migrate_into_the_now_full_target_is_refused_and_changes_nothing(
    history: History, target: str
) -> None:
    assert cli(history, "db", "migrate", "--to", target).code == 0
    before = contents(target)
    again = cli(history, "db", "migrate", "--to", target)
    assert (again.code, again.out) == (1, "")
    assert again.err.count("\n") == 1 and "is not empty (table meta has rows)" in again.err
    assert contents(target) == before


def test_a_database_a_broker_opened_or_another_schema_version_or_other_tables_is_refused(
    history: History, target: str
) -> None:
    asyncio.run(_open_and_close(target))  # the product's own schema, its own HMAC key and accounts
    opened = cli(history, "db", "migrate", "--to", target)
    assert opened.code == 1 and "is not empty" in opened.err
    with side(target) as pg:
        pg.execute("UPDATE schema_version SET version = ?", (PG_SCHEMA_VERSION - 1,))
    older = cli(history, "db", "migrate", "--to", target)
    assert older.code == 1 and f"schema at version {PG_SCHEMA_VERSION - 1}, not {PG_SCHEMA_VERSION}" in older.err
    with pg_database() as other:
        with side(other) as pg:
            pg.execute("CREATE TABLE notes (line TEXT)")
        foreign = cli(history, "db", "migrate", "--to", other)
        assert foreign.code == 1 and "it holds tables: notes" in foreign.err
        assert contents(other) == {"notes": []}


async def _open_and_close(url: str) -> None:
    await (await open_database(url)).close()


@pytest.mark.parametrize(
    ("to", "source", "says"),
    [
        ("sqlite:///tmp/x.db", None, "--to must name a PostgreSQL database"),
        ("/tmp/x.db", None, "--to must name a PostgreSQL database"),
        ("postgresql://postgres@127.0.0.1:5432/", None, "--to must name a PostgreSQL database"),
        (None, "missing.db", "TVM_DATABASE: there is no database at"),
        (None, "postgresql://postgres@127.0.0.1:5432/postgres", "TVM_DATABASE: db migrate copies a SQLite database"),
    ],
)
def test_bad_usage_exits_2_with_one_line(history: History, target: str, to: str | None, source: str | None,
                                          says: str) -> None:
    on = None if source is None else source if "://" in source else str(history.path.parent / source)
    done = cli(history, "db", "migrate", "--to", to or target, on=on)
    assert (done.code, done.out) == (2, "")
    assert done.err.count("\n") == 1 and says in done.err
    assert contents(target) == {}


async def test_a_failure_before_commit_leaves_the_target_empty(history: History, target: str) -> None:
    with pytest.raises(MigrationFailed, match="nothing was kept: made to fail"):
        await migrate(history.path, target, check=lambda tx: ["made to fail"])
    assert contents(target) == {}  # not even the schema


async def test_rows_are_copied_batch_by_batch_with_progress(history: History, target: str) -> None:
    seen: list[tuple[str, int]] = []
    done = await migrate(history.path, target, batch_rows=1_000, progress=lambda table, n: seen.append((table, n)))
    audit_rows = done.rows["audit"]
    assert [n for table, n in seen if table == "audit"] == [*range(1_000, audit_rows, 1_000), audit_rows]
    assert done.events == audit_rows
    with pytest.raises(MigrationRefused):
        await migrate(history.path, target)


def test_progress_is_shown_on_stderr_when_it_is_a_terminal(history: History, target: str) -> None:
    leader, follower = pty.openpty()
    env = environment(history.path.parent, {"TVM_DATABASE": str(history.path)})
    proc = subprocess.Popen([sys.executable, "-m", "server", "db", "migrate", "--to", target], env=env,
                            cwd=history.path.parent, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    shown = b""
    while chunk := _read(leader):
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    assert proc.stdout is not None and proc.stdout.read().startswith(b"copied ")
    assert f"copying audit: {source_rows(history)['audit']} rows".encode() in shown


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other end closed
        return b""
