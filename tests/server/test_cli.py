"""The real `python -m server` command: exit codes, tables and JSON, and the audit tools (SPEC §7)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest

from server import audit, ledger, market
from server.audit import Event
from server.broker import Broker
from server.clock import rfc3339
from server.demo import DEMO_LISTINGS
from server.store import Database, Tx, open_database
from tests.conftest import side

EXPORT_KEYS = ["id", "ts", "account", "agent", "tool", "transport", "scope", "outcome", "code", "args", "token_id",
               "latency_ms", "prev_hash", "hash"]
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@dataclass(frozen=True)
class Done:
    code: int
    out: str
    err: str
    raw: bytes


def environment(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH0_", "TVM_"))}
    env["TVM_DATABASE"] = str(tmp_path / "vault.db")
    env.update(extra)
    return env


def start(tmp_path: Path, args: Sequence[str], env: dict[str, str] | None, stdin: bool) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "server", *args],
        cwd=tmp_path,  # no stray .env is read
        env=environment(tmp_path, env or {}),
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[bytes], stdin: str | None = None) -> Done:
    out, err = proc.communicate(None if stdin is None else stdin.encode(), timeout=60)
    return Done(proc.returncode, out.decode(), err.decode(), out)


def run(tmp_path: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Done:
    return finish(start(tmp_path, args, env, stdin is not None), stdin)


def run_all(tmp_path: Path, *commands: Sequence[str], env: dict[str, str] | None = None) -> list[Done]:
    """Run commands side by side (each process costs about half a second to start); their order is not fixed."""
    procs = [start(tmp_path, command, env, False) for command in commands]
    return [finish(p) for p in procs]


def table(text: str, columns: Sequence[str]) -> list[list[str]]:
    """Cut an aligned table into cells by the header's column positions."""
    header, *rows = text.rstrip("\n").split("\n")
    starts, at = [], 0
    for name in columns:
        at = header.index(name, at)
        starts.append(at)
        at += len(name)
    ends = [*starts[1:], None]
    cells = [[row[a:b].strip() for a, b in zip(starts, ends, strict=True)] for row in rows]
    for row in rows:  # a column begins right after a gap, so values line up under their header
        assert all(s == 0 or row[s - 2 : s] in ("  ", "") for s in starts), (header, row)
    return cells


def seed(db_path: Path, *events: Event, credit: tuple[str, int] | None = None) -> bytes:
    """Write events (and an operator credit) through the Python API; return the database's HMAC key."""

    async def go() -> bytes:
        db = await Database.open(db_path)
        try:
            if credit is not None:
                await Broker(db).credit(*credit)
            for ev in events:
                await db.write(partial(audit.append, event=ev))
            return db.hmac_key
        finally:
            await db.close()

    return asyncio.run(go())


def at(minute: int) -> str:
    return rfc3339(datetime(2026, 12, 1, 12, minute, tzinfo=UTC))


def tool_event(minute: int, **fields: object) -> Event:
    base: dict[str, object] = {"ts": at(minute), "transport": "stdio", "outcome": "ok", "account": "auth0|alice",
                               "agent": "claude", "tool": "request_token", "scope": "request:token"}
    base.update(fields)
    return Event(**base)  # type: ignore[arg-type]


# ---- market ---------------------------------------------------------------------------------------

MARKET_FILE = """
[[listing]]
id = "flat"
title = "Flat price"
connection = "github"
scopes = ["repo:read"]
supply = 10
start_price = 50
floor_price = 50
opens_at = 2000-01-01T00:00:00Z
closes_at = 2100-01-01T00:00:00Z

[[listing]]
id = "decaying"
title = "Decaying price"
connection = "stripe"
scopes = ["read_only", "charges:write"]
supply = 5
start_price = 100
floor_price = 20
opens_at = 2000-01-01T00:00:00Z
closes_at = 2100-01-01T00:00:00Z

[[listing]]
id = "closed"
title = "Already closed"
connection = "github"
scopes = ["repo:write"]
supply = 3
start_price = 30
floor_price = 10
opens_at = 2000-01-01T00:00:00Z
closes_at = 2001-01-01T00:00:00Z

[[listing]]
id = "upcoming"
title = "Not open yet"
connection = "google-oauth2"
scopes = ["calendar"]
supply = 7
start_price = 70
floor_price = 7
opens_at = 2099-01-01T00:00:00+02:00
closes_at = 2100-01-01T00:00:00Z

[[listing]]
id = "proxied"
title = "Through the broker only"
connection = "github"
scopes = ["repo:write"]
supply = 4
start_price = 10
floor_price = 10
opens_at = 2000-01-01T00:00:00Z
closes_at = 2100-01-01T00:00:00Z
delivery = "proxy"
api = ["https://API.github.com:443/", "http://127.0.0.1:9000/provider/github/"]
methods = ["POST", "GET"]
approval = "writes"
"""
MARKET_COLUMNS = ["id", "connection", "scopes", "price", "start", "floor", "remaining", "status", "closes", "delivery",
                  "approval"]


def test_market_load_then_list_as_a_table_and_as_json(tmp_path: Path) -> None:
    (tmp_path / "market.toml").write_text(MARKET_FILE, encoding="utf-8")
    loaded = run(tmp_path, "market", "load", "market.toml")
    assert (loaded.code, loaded.err) == (0, "")
    assert "loaded 5 listing(s)" in loaded.out

    shown, as_json = run_all(tmp_path, ["market", "list"], ["market", "list", "--json"])
    assert shown.code == 0
    rows = table(shown.out, MARKET_COLUMNS)
    by_id = {row[0]: row for row in rows}
    assert list(by_id) == ["closed", "decaying", "flat", "proxied", "upcoming"]
    assert by_id["flat"][1:8] == ["github", "repo:read", "50", "50", "50", "10", "open"]
    assert by_id["decaying"][2] == "charges:write read_only"
    assert 20 <= int(by_id["decaying"][3]) <= 100
    assert by_id["closed"][3:8] == ["10", "30", "10", "3", "closed"]
    assert by_id["upcoming"][3:8] == ["70", "70", "7", "7", "upcoming"]
    assert by_id["closed"][8] == "2001-01-01T00:00:00"
    assert by_id["flat"][9:] == ["token", "none"]
    assert by_id["proxied"][9:] == ["proxy", "writes"]

    assert as_json.code == 0
    items = {item["listing_id"]: item for item in map(json.loads, as_json.out.splitlines())}
    assert list(items) == ["closed", "decaying", "flat", "proxied", "upcoming"]
    assert items["flat"] == {
        "listing_id": "flat", "title": "Flat price", "connection": "github", "scopes": ["repo:read"],
        "unit_price": 50, "start_price": 50, "floor_price": 50, "opens_at": "2000-01-01T00:00:00.000000Z",
        "closes_at": "2100-01-01T00:00:00.000000Z", "supply": 10, "supply_remaining": 10, "status": "open",
        "delivery": "token", "api": [], "methods": ["GET", "HEAD"], "approval": "none",
    }
    assert {k: items["proxied"][k] for k in ("delivery", "api", "methods", "approval")} == {
        "delivery": "proxy", "api": ["http://127.0.0.1:9000/provider/github", "https://api.github.com"],
        "methods": ["GET", "POST"], "approval": "writes",
    }
    assert items["upcoming"]["opens_at"] == "2098-12-31T22:00:00.000000Z"
    assert (items["closed"]["unit_price"], items["closed"]["status"]) == (10, "closed")


def sell(db_path: Path, listing_id: str, units: int) -> None:
    """Sell `units` of a listing to auth0|alice through the Python API."""
    now = datetime(2026, 12, 1, tzinfo=UTC)

    def job(tx: Tx) -> None:
        ledger.credit(tx, "auth0|alice", 10_000, now)
        ledger.buy(tx, "auth0|alice", listing_id, units, 1_000, None, now)

    async def go() -> None:
        db = await Database.open(db_path)
        try:
            await db.write(job)
        finally:
            await db.close()

    asyncio.run(go())


def listings_dump(db_path: Path) -> list[tuple[object, ...]]:
    """Every column of every listing, as stored."""
    with closing(sqlite3.connect(db_path)) as conn:
        return conn.execute("SELECT * FROM listings ORDER BY id").fetchall()


# Each turns MARKET_FILE into one the loader refuses; each also retitles `decaying`, which must not happen.
REFUSED_FILES = {
    "unknown-key": ('id = "flat"\n', 'id = "flat"\ncolour = "blue"\n', "listing flat: colour: unknown key"),
    "title-as-number": ('title = "Flat price"', "title = 5", "listing flat: title: Input should be a valid string"),
    "scopes-as-text": ('scopes = ["repo:read"]', 'scopes = "repo:read"', "listing flat: scopes: Input should be"),
    "datetime-as-text": ("opens_at = 2000-01-01T00:00:00Z\ncloses_at = 2100-01-01T00:00:00Z\n\n[[listing]]\n"
                         'id = "decaying"',
                         'opens_at = "2000-01-01"\ncloses_at = 2100-01-01T00:00:00Z\n\n[[listing]]\n'
                         'id = "decaying"', "listing flat: opens_at: Input should be a valid datetime"),
    "supply-as-bool": ("supply = 10\n", "supply = true\n", "listing flat: supply: Input should be a valid integer"),
    "proxy-without-api": ('api = ["https://API.github.com:443/", "http://127.0.0.1:9000/provider/github/"]\n', "",
                          'listing proxied: api: required when delivery = "proxy"'),
    "bad-api": ('"https://API.github.com:443/"', '"https://user@api.github.com"', "listing proxied: api[0]: "),
    "connection-of-sold": ('id = "flat"\ntitle = "Flat price"\nconnection = "github"',
                           'id = "flat"\ntitle = "Flat price"\nconnection = "gitlab"',
                           'listing flat: connection: cannot change from "github" to "gitlab": 3 units were '
                           "already sold under it; add a listing with a new id instead"),
    "scopes-of-sold": ('scopes = ["repo:read"]', 'scopes = ["repo:read", "repo:write"]',
                       'listing flat: scopes: cannot change from ["repo:read"] to ["repo:read", "repo:write"]: '
                       "3 units were already sold under it; add a listing with a new id instead"),
    "supply-below-sold": ("supply = 10\n", "supply = 2\n", "listing flat: supply 2 is below the 3 units already sold"),
}


def refused_file(tmp_path: Path, name: str) -> Path:
    old, new, _ = REFUSED_FILES[name]
    assert MARKET_FILE.count(old) == 1, name
    text = MARKET_FILE.replace(old, new).replace('title = "Decaying price"', 'title = "Changed"')
    path = tmp_path / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_market_load_refusals_exit_2_with_one_line_and_change_nothing(tmp_path: Path) -> None:
    (tmp_path / "market.toml").write_text(MARKET_FILE, encoding="utf-8")
    assert run(tmp_path, "market", "load", "market.toml").code == 0
    sell(tmp_path / "vault.db", "flat", 3)
    before = listings_dump(tmp_path / "vault.db")
    names = list(REFUSED_FILES)
    done = run_all(tmp_path, *(["market", "load", str(refused_file(tmp_path, name))] for name in names))
    for name, result in zip(names, done, strict=True):
        assert (result.code, result.out) == (2, ""), (name, result)
        (line,) = result.err.strip().splitlines()
        assert line.startswith("token-vault-mcp: "), line
        assert REFUSED_FILES[name][2] in line, (name, line)
        assert "Traceback" not in result.err
    assert listings_dump(tmp_path / "vault.db") == before
    assert ("decaying", "Decaying price") in [row[:2] for row in before]

    # a listing with nothing sold may change its connection and scopes
    changed = MARKET_FILE.replace('connection = "stripe"\nscopes = ["read_only", "charges:write"]',
                                  'connection = "paypal"\nscopes = ["payments"]')
    (tmp_path / "changed.toml").write_text(changed, encoding="utf-8")
    assert run(tmp_path, "market", "load", "changed.toml").code == 0
    row = next(r for r in listings_dump(tmp_path / "vault.db") if r[0] == "decaying")
    assert row[2:4] == ("paypal", '["payments"]')


def test_serve_refuses_to_start_with_a_bad_market_file_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "market.toml").write_text(MARKET_FILE, encoding="utf-8")
    # a good file: the server starts (stdin closed, so the stdio session ends at once) with demo + file listings
    started = run(tmp_path, "serve", env={"TVM_MARKET_FILE": "market.toml"})
    assert started.code == 0, started.err
    assert started.out == ""
    assert len(listings_dump(tmp_path / "vault.db")) == len(DEMO_LISTINGS) + 5
    sell(tmp_path / "vault.db", "flat", 3)
    before = listings_dump(tmp_path / "vault.db")

    names = ["title-as-number", "proxy-without-api", "connection-of-sold", "scopes-of-sold"]
    procs = [start(tmp_path, ["serve"], {"TVM_MARKET_FILE": str(refused_file(tmp_path, name))}, False)
             for name in names]
    for name, result in zip(names, map(finish, procs), strict=True):
        assert (result.code, result.out) == (2, ""), (name, result)
        (line,) = result.err.strip().splitlines()
        assert line.startswith("token-vault-mcp: configuration error: TVM_MARKET_FILE: "), line
        assert REFUSED_FILES[name][2] in line, (name, line)
    assert listings_dump(tmp_path / "vault.db") == before

    elsewhere = tmp_path / "fresh"
    elsewhere.mkdir()
    path = refused_file(elsewhere, "datetime-as-text")
    refused = run(elsewhere, "serve", env={"TVM_MARKET_FILE": str(path)})
    assert (refused.code, refused.out) == (2, "")
    assert "TVM_MARKET_FILE" in refused.err and "opens_at" in refused.err
    assert not (elsewhere / "vault.db").exists()  # a file that cannot be parsed stops the start before anything opens


def test_market_load_of_an_invalid_file_exits_2_naming_the_listing_and_field(tmp_path: Path) -> None:
    bad = MARKET_FILE.replace("floor_price = 10\n", "floor_price = 31\n")
    (tmp_path / "market.toml").write_text(bad, encoding="utf-8")
    done = run(tmp_path, "market", "load", "market.toml")
    assert done.code == 2
    (line,) = done.err.strip().splitlines()
    assert "listing closed" in line and "floor_price" in line
    assert done.out == ""


# ---- wallet ---------------------------------------------------------------------------------------

def test_wallet_credit_shows_the_balance_and_writes_an_audit_event(tmp_path: Path) -> None:
    credited = run(tmp_path, "wallet", "credit", "auth0|alice", "500")
    assert credited.code == 0, credited.err
    assert "balance 500" in credited.out

    shown, as_json, exported, nobody = run_all(
        tmp_path,
        ["wallet", "show", "auth0|alice"],
        ["wallet", "show", "auth0|alice", "--json"],
        ["audit", "export"],
        ["wallet", "show", "nobody"],
    )
    assert shown.code == 0
    assert "auth0|alice: balance 500 credits" in shown.out
    assert as_json.code == 0
    assert json.loads(as_json.out) == {"account": "auth0|alice", "balance": 500, "holdings": []}

    assert exported.code == 0
    (line,) = exported.out.splitlines()
    ev = json.loads(line)
    assert list(ev) == EXPORT_KEYS
    assert RFC3339_UTC.match(ev["ts"])
    assert (ev["id"], ev["account"], ev["agent"], ev["tool"], ev["transport"]) == (
        1, "auth0|alice", "operator", "wallet_credit", "cli"
    )
    assert (ev["outcome"], ev["code"], ev["token_id"]) == ("ok", None, None)
    assert ev["args"] == {"account": "auth0|alice", "amount": 500}
    assert ev["prev_hash"] == "00" * 32
    assert re.fullmatch(r"[0-9a-f]{64}", ev["hash"])

    assert nobody.code == 1
    assert nobody.out == ""
    assert "nobody" in nobody.err


def test_wallet_credit_of_anything_but_a_sane_positive_whole_number_is_bad_usage(tmp_path: Path) -> None:
    amounts = ["-5", "abc", "0", "10000000000001"]
    for amount, done in zip(amounts, run_all(tmp_path, *(["wallet", "credit", "auth0|alice", a] for a in amounts)),
                            strict=True):
        assert done.code == 2, amount
        assert "amount" in done.err, amount
        assert "Traceback" not in done.err, amount
    assert not (tmp_path / "vault.db").exists()


def test_reading_commands_refuse_a_missing_database_instead_of_creating_an_empty_one(tmp_path: Path) -> None:
    commands = [["audit", "verify"], ["audit", "list"], ["wallet", "show", "auth0|alice"], ["market", "list"]]
    for command, done in zip(commands, run_all(tmp_path, *commands), strict=True):
        assert done.code == 2, command
        (line,) = done.err.strip().splitlines()
        assert "TVM_DATABASE" in line and "vault.db" in line
        assert done.out == ""
    assert not (tmp_path / "vault.db").exists()


# ---- audit verify -----------------------------------------------------------------------------------

def test_audit_verify_passes_then_names_the_edited_event(tmp_path: Path) -> None:
    db_path = tmp_path / "vault.db"
    seed(db_path, tool_event(1), tool_event(2), tool_event(3), credit=("auth0|alice", 250))
    verified, with_ledger = run_all(tmp_path, ["audit", "verify"], ["audit", "verify", "--ledger"])
    assert (verified.code, verified.out.strip()) == (0, "audit chain OK: 4 events")
    assert with_ledger.code == 0, with_ledger.out
    assert "ledger invariants OK" in with_ledger.out

    with sqlite3.connect(db_path) as side:
        side.execute("UPDATE audit SET args = '{\"purpose\":\"innocent\"}' WHERE id = 3")
    broken = run(tmp_path, "audit", "verify")
    assert broken.code == 1
    assert "BROKEN at event 3" in broken.out


# ---- audit list ------------------------------------------------------------------------------------

LIST_COLUMNS = ["time", "account", "agent", "tool", "outcome", "code", "purpose / arguments"]


def test_audit_list_filters_by_account_tool_outcome_agent_and_time(tmp_path: Path) -> None:
    seed(
        tmp_path / "vault.db",
        tool_event(1, tool="buy_quota", scope="buy:quota", args={"listing_id": "flat", "units": 2}),
        tool_event(2, account="auth0|bob", agent="cursor", outcome="denied", code="no_quota",
                   args={"connection": "github", "scopes": ["repo:read"], "purpose": "deploy"}),
        tool_event(3, args={"connection": "github", "scopes": ["repo:read"], "purpose": "read issues"}),
        tool_event(4, account=None, agent=None, tool=None, scope=None, transport="http", outcome="denied",
                   code="unauthenticated"),
    )
    alice, tool, denied, window = run_all(
        tmp_path,
        ["audit", "list", "--account", "auth0|alice"],
        ["audit", "list", "--tool", "request_token"],
        ["audit", "list", "--outcome", "denied", "--json"],
        ["audit", "list", "--agent", "claude", "--since", at(2), "--until", at(3), "--json"],
    )
    assert all(d.code == 0 for d in (alice, tool, denied, window))
    assert table(alice.out, LIST_COLUMNS) == [
        ["2026-12-01T12:01:00Z", "auth0|alice", "claude", "buy_quota", "ok", "", "listing_id=flat units=2"],
        ["2026-12-01T12:03:00Z", "auth0|alice", "claude", "request_token", "ok", "", "github [repo:read] read issues"],
    ]
    assert [(row[1], row[4], row[5], row[6]) for row in table(tool.out, LIST_COLUMNS)] == [
        ("auth0|bob", "denied", "no_quota", "github [repo:read] deploy"),
        ("auth0|alice", "ok", "", "github [repo:read] read issues"),
    ]
    lines = [json.loads(line) for line in denied.out.splitlines()]
    assert [(ev["id"], ev["code"]) for ev in lines] == [(2, "no_quota"), (4, "unauthenticated")]
    assert all(list(ev) == EXPORT_KEYS for ev in lines)
    assert [ev["id"] for ev in map(json.loads, window.out.splitlines())] == [3]


def test_audit_list_escapes_control_characters_an_agent_supplied(tmp_path: Path) -> None:
    seed(
        tmp_path / "vault.db",
        tool_event(1, account="auth0|mallory\x9b2J", agent="agent\u202eevil",
                   args={"connection": "github", "scopes": ["repo:read\r"], "purpose": "\x1b[31mEVIL\x07"}),
    )
    shown, as_json = run_all(tmp_path, ["audit", "list"], ["audit", "list", "--json"])
    assert shown.code == 0 and as_json.code == 0
    for raw in (shown.raw, as_json.raw):
        for forbidden in ("\x1b", "\x07", "\x9b", "\u202e", "\r"):
            assert forbidden.encode() not in raw, forbidden
    assert "\\x1b[31mEVIL\\x07" in shown.out
    assert "auth0|mallory\\x9b2J" in shown.out
    assert "agent\\u202eevil" in shown.out
    assert json.loads(as_json.out)["args"]["purpose"] == "\x1b[31mEVIL\x07"  # kept exactly, only escaped


# ---- audit lookup ----------------------------------------------------------------------------------

def test_audit_lookup_finds_a_tokens_events_without_printing_the_token(tmp_path: Path) -> None:
    db_path = tmp_path / "vault.db"
    key = seed(db_path)
    canary = audit.token_fingerprint(key, "tok_canary")
    seed(
        db_path,
        tool_event(1, token_id=canary, args={"purpose": "first use"}),
        tool_event(2, token_id=audit.token_fingerprint(key, "tok_other"), args={"purpose": "someone else"}),
        tool_event(3, token_id=canary, account="auth0|bob", args={"purpose": "second use"}),
    )
    procs = [
        start(tmp_path, ["audit", "lookup", "--token-stdin"], None, True),
        start(tmp_path, ["audit", "lookup", "--token-stdin"], None, True),
        start(tmp_path, ["audit", "lookup", "--token-stdin", "--json"], None, True),
    ]
    unknown, known, as_json = (finish(p, token) for p, token in zip(
        procs, ["tok_unknown\n", "tok_canary\n", "tok_canary\n"], strict=True
    ))
    assert unknown.code == 1
    assert "no events" in unknown.out

    assert known.code == 0, known.err
    assert canary.hex() in known.out
    rows = table(known.out.split("\n", 1)[1], ["id", "time", "account", "agent", "tool", "outcome",
                                                "purpose / arguments"])
    assert [(row[0], row[2], row[6]) for row in rows] == [
        ("1", "auth0|alice", "[] first use"), ("3", "auth0|bob", "[] second use"),
    ]
    assert as_json.code == 0
    assert [ev["id"] for ev in map(json.loads, as_json.out.splitlines())] == [1, 3]
    for done in (unknown, known, as_json):
        assert "tok_canary" not in done.out + done.err
        assert "tok_unknown" not in done.out + done.err


# ---- configuration ---------------------------------------------------------------------------------

def test_a_bad_configuration_value_exits_2_with_one_line_naming_it(tmp_path: Path) -> None:
    bad = [("TVM_LOG_LEVEL", "LOUD"), ("AUTH0_DOMAIN", "http://example.com"), ("AUTH0_DOMAIN", "example.com/path")]
    procs = [start(tmp_path, ["wallet", "show", "auth0|alice"], {name: value}, False) for name, value in bad]
    for (name, value), done in zip(bad, map(finish, procs), strict=True):
        assert done.code == 2, value
        (line,) = done.err.strip().splitlines()
        assert name in line
        assert done.out == ""
    assert not (tmp_path / "vault.db").exists()


def test_a_command_group_without_its_subcommand_prints_its_own_help(tmp_path: Path) -> None:
    done = run_all(tmp_path, ["audit"], ["wallet"], ["market"], [])
    for group, result in zip(["audit", "wallet", "market"], done, strict=False):
        assert result.code == 2 and result.out == ""
        assert f"usage: token-vault-mcp {group} [-h] COMMAND" in result.err
    assert "usage: token-vault-mcp [-h]" in done[3].err and done[3].code == 2


# ---- agents and policy (§9) ------------------------------------------------------------------------

POLICY = """
[[agent]]
id = "*"
calls_per_minute = 120

[[agent]]
id = "ci-bot"
connections = ["github"]
max_spend_per_day = 5000
approval = "always"
"""


def test_policy_load_then_show_as_a_table_and_as_json(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(POLICY, encoding="utf-8")
    empty = run(tmp_path, "policy", "show")
    assert empty.code == 2  # no database yet: nothing to show
    loaded = run(tmp_path, "policy", "load", "policy.toml")
    assert loaded.code == 0, loaded.err
    assert "loaded 2 agent rules" in loaded.out
    shown, as_json = run_all(tmp_path, ["policy", "show"], ["policy", "show", "--json"])
    rows = table(shown.out, ["agent", "connections", "calls/min", "spend/day", "grants/hour", "approval"])
    assert rows == [["*", "all", "120", "", "", "listing"], ["ci-bot", "github", "600", "5000", "", "always"]]
    document = json.loads(as_json.out)
    assert [a["id"] for a in document["agents"]] == ["*", "ci-bot"]
    assert document["default"]["calls_per_minute"] == 600
    [event] = [e for e in map(json.loads, run(tmp_path, "audit", "export").out.splitlines())
               if e["tool"] == "policy_load"]
    assert event["agent"] == "operator" and event["account"].startswith("cli:") and event["args"] == {"rules": 2}


def test_a_bad_policy_file_exits_2_in_one_line_and_keeps_the_policy_in_force(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(POLICY, encoding="utf-8")
    assert run(tmp_path, "policy", "load", "policy.toml").code == 0
    (tmp_path / "bad.toml").write_text('[[agent]]\nid = "x"\ncalls_per_minute = "lots"\n', encoding="utf-8")
    bad = run(tmp_path, "policy", "load", "bad.toml")
    assert bad.code == 2 and bad.out == ""
    assert bad.err.count("\n") == 1 and 'agent "x": calls_per_minute' in bad.err
    assert len(json.loads(run(tmp_path, "policy", "show", "--json").out)["agents"]) == 2


def test_serve_refuses_to_start_with_a_bad_policy_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[[agent]]\nid = "x"\nsurprise = 1\n', encoding="utf-8")
    done = run(tmp_path, "serve", env={"TVM_POLICY_FILE": "bad.toml"})
    assert done.code == 2 and done.out == ""
    assert "TVM_POLICY_FILE" in done.err and 'agent "x": surprise: unknown key' in done.err


def test_agent_block_list_and_unblock_with_exit_codes_and_events(tmp_path: Path) -> None:
    seed(tmp_path / "vault.db", tool_event(1, agent="agent-a", account="auth0|alice"),
         tool_event(2, agent="agent-a", account="auth0|bob"), tool_event(3, agent="agent-b", account="auth0|bob"))
    blocked = run(tmp_path, "agent", "block", "agent-a", "--reason", "looping on buy_quota")
    assert blocked.code == 0 and "blocked agent-a; 0 live grants closed" in blocked.out
    listed, as_json = run_all(tmp_path, ["agent", "list"], ["agent", "list", "--json"])
    rows = table(listed.out, ["agent", "accounts", "calls", "last call", "blocked", "reason"])
    assert [r[0] for r in rows] == ["agent-a", "agent-b", "operator"]
    assert rows[0][1:3] == ["auth0|alice,auth0|bob", "2"] and rows[0][4:] == ["yes", "looping on buy_quota"]
    agents = {a["agent"]: a for a in map(json.loads, as_json.out.splitlines())}
    assert agents["agent-b"]["blocked"] is False and agents["agent-a"]["reason"] == "looping on buy_quota"
    assert run(tmp_path, "agent", "unblock", "agent-a").code == 0
    again = run(tmp_path, "agent", "unblock", "agent-a")
    assert again.code == 1 and "is not blocked" in again.err
    assert run(tmp_path, "agent", "block", "bad\nname").code == 2
    tools = [e["tool"] for e in map(json.loads, run(tmp_path, "audit", "export").out.splitlines())]
    assert tools.count("agent_block") == 1 and tools.count("agent_unblock") == 2


def test_agent_list_escapes_hostile_agent_names(tmp_path: Path) -> None:
    seed(tmp_path / "vault.db", tool_event(1, agent="evil\x1b[2J\u202e", account="auth0|alice"))
    listed = run(tmp_path, "agent", "list")
    assert "\x1b" not in listed.out and "\u202e" not in listed.out and "\\x1b[2J" in listed.out


# ---- operator moves (§11) ------------------------------------------------------------------------

def _funded(database: str, market_file: Path, account: str, credits: int, listing: str, units: int) -> None:
    """The market file loaded, `account` credited and holding `units` of `listing` (through the Python API:
    the CLI's own credit and market load are tested above; each process costs half a second)."""

    async def go() -> None:
        db = await open_database(database)
        try:
            specs = market.read_market_file(market_file)
            await db.write(lambda tx: market.load(tx, specs))
            await Broker(db).credit(account, credits)
            await db.write(lambda tx: ledger.buy(tx, account, listing, units, 10_000, None, datetime.now(UTC)))
        finally:
            await db.close()

    asyncio.run(go())


def _ledger_rows(database: str) -> dict[str, list[tuple[object, ...]]]:
    with side(database) as conn:
        return {t: sorted(conn.execute(f"SELECT * FROM {t}"), key=repr)
                for t in ("accounts", "transfers", "holdings", "purchases", "moves", "listings")}


@pytest.mark.both_backends
def test_wallet_and_quota_transfer_exit_0_1_2_and_wallet_show_sees_the_moves(tmp_path: Path, database: str) -> None:
    env = {"TVM_DATABASE": database}
    (tmp_path / "market.toml").write_text(MARKET_FILE, encoding="utf-8")
    _funded(database, tmp_path / "market.toml", "auth0|alice", 500, "flat", 3)  # 150 credits: alice keeps 350

    pay = ["wallet", "transfer", "auth0|alice", "auth0|bob", "120", "--idempotency-key", "k1"]
    moved = run(tmp_path, *pay, env=env)
    assert (moved.code, moved.err) == (0, "")
    assert moved.out.startswith("moved 120 credits from auth0|alice to auth0|bob; balance auth0|alice 230, "
                                "auth0|bob 120 (move mov_")
    again, units = run_all(tmp_path, pay, ["quota", "transfer", "auth0|alice", "auth0|bob", "flat", "2"], env=env)
    assert again.code == 0 and again.out.startswith("already moved") and moved.out.split("(move ")[1] in again.out
    assert (units.code, units.err) == (0, "")
    assert "moved 2 units of flat from auth0|alice to auth0|bob; units held auth0|alice 1, auth0|bob 2" in units.out

    before = _ledger_rows(database)
    refusals = [
        ([*pay[:4], "121", *pay[5:]], "idempotency_key_reused"),
        (["wallet", "transfer", "auth0|alice", "auth0|bob", "231"], "insufficient_funds"),
        (["wallet", "transfer", "auth0|nobody", "auth0|bob", "1"], "insufficient_funds"),
        (["quota", "transfer", "auth0|alice", "auth0|bob", "flat", "2"], "no_quota"),
        (["quota", "transfer", "auth0|alice", "auth0|bob", "no-such", "1"], "unknown_listing"),
        (["wallet", "transfer", "auth0|alice", "mint", "1"], "invalid_argument"),
    ]
    for (command, code), done in zip(refusals, run_all(tmp_path, *(c for c, _ in refusals), env=env), strict=True):
        assert done.code == 1, command
        (line,) = done.err.splitlines()
        assert line.startswith(f"token-vault-mcp: [{code}] "), (command, line)
        assert done.out == ""
    usage = [["wallet", "transfer", "auth0|alice", "auth0|bob", a] for a in ("0", "-1", "abc", "1.5")]
    usage += [["quota", "transfer", "auth0|alice", "auth0|bob", "flat", u] for u in ("0", "-2", "x")]
    usage += [["wallet", "transfer", "auth0|alice", "auth0|alice", "1"],
              ["quota", "transfer", "auth0|bob", "auth0|bob", "flat", "1"],
              ["wallet", "transfer", "auth0|alice", "bad\nname", "1"],
              ["wallet", "transfer", "auth0|alice", "auth0|bob", "1", "--idempotency-key", "k" * 129]]
    for command, done in zip(usage, run_all(tmp_path, *usage, env=env), strict=True):
        assert done.code == 2, command
        assert "Traceback" not in done.err and done.out == ""
    assert _ledger_rows(database) == before

    bob, alice, verified, exported = run_all(
        tmp_path, ["wallet", "show", "auth0|bob", "--json"], ["wallet", "show", "auth0|alice", "--json"],
        ["audit", "verify", "--ledger"], ["audit", "export"], env=env,
    )
    shown = json.loads(bob.out)
    assert shown["balance"] == 120
    assert [(h["listing_id"], h["units_remaining"]) for h in shown["holdings"]] == [("flat", 2)]
    assert json.loads(alice.out)["balance"] == 230
    assert [(h["listing_id"], h["units_remaining"]) for h in json.loads(alice.out)["holdings"]] == [("flat", 1)]
    assert verified.code == 0 and "ledger invariants OK" in verified.out, verified.out + verified.err
    events = [json.loads(line) for line in exported.out.splitlines()]
    ok_moves = [(e["tool"], e["account"], e["args"]["side"]) for e in events
                if e["tool"] in ("wallet_transfer", "quota_transfer") and e["outcome"] == "ok"]
    assert ok_moves[:2] == [("wallet_transfer", "auth0|alice", "from"), ("wallet_transfer", "auth0|bob", "to")]
    assert sorted(ok_moves[2:]) == [  # the replay and the units move ran side by side
        ("quota_transfer", "auth0|alice", "from"), ("quota_transfer", "auth0|bob", "to"),
        ("wallet_transfer", "auth0|alice", "from"),
    ]
    assert all(e["args"]["operator"].startswith("cli:") for e in events if e["tool"] == "quota_transfer")

    with side(database) as conn:  # a tampered move: bob's two units become three
        conn.execute("UPDATE moves SET amount = 3 WHERE kind = 'units'")
    tampered = run(tmp_path, "audit", "verify", "--ledger", env=env)
    assert tampered.code == 1
    assert "≠ its purchases and moves" in tampered.out + tampered.err
