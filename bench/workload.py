"""What the bench asks for: the market of 100 listings, the calls, and the product's preparation."""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import DEMO_ACCOUNT, Server, product_env, run_cli, structured

LISTINGS = 100
TOKEN_LISTING = "bench-000"  # github, exactly [repo:read]: what request_token spends
BUY_LISTING = "bench-001"  # what buy_quota buys, one unit a call
MAX_BUY = 10_000  # buy_quota's largest order
FUNDS = 10**12

_SCOPES = {
    "github": [["repo:read"], ["repo:read", "repo:write"], ["read:user"], ["repo:read", "read:user"]],
    "stripe": [["read_only"], ["read_only", "read_write"]],
    "google-oauth2": [
        ["https://www.googleapis.com/auth/calendar.readonly"],
        ["https://www.googleapis.com/auth/gmail.readonly"],
    ],
}
_CONNECTIONS = ["github", "stripe", "google-oauth2"]


def market_toml(count: int = LISTINGS) -> str:
    """`count` open listings (ids bench-000…), on the demo tenant's connected accounts, with ample supply."""
    tables = []
    for n in range(count):
        connection = _CONNECTIONS[n % 3]
        choices = _SCOPES[connection]
        scopes = choices[(n // 3) % len(choices)] if n != 0 else ["repo:read"]
        tables.append(
            "[[listing]]\n"
            f'id = "bench-{n:03d}"\n'
            f'title = "Bench listing {n}: {connection} {" ".join(scopes)}"\n'
            f'connection = "{connection}"\n'
            f"scopes = {json.dumps(scopes)}\n"
            "supply = 1000000000\n"
            f"start_price = {100 + n}\n"
            f"floor_price = {10 + n % 7}\n"
            "opens_at = 2026-01-01T00:00:00Z\n"
            "closes_at = 2030-01-01T00:00:00Z\n"
        )
    return "\n".join(tables)


@dataclass(frozen=True)
class Case:
    """One kind of call: a row of the latency table."""

    label: str
    tool: str
    args: Callable[[int], dict[str, Any]]


_hints = itertools.count()
_RUN = secrets.token_hex(4)


def _fresh_hint(_: int) -> str:
    # A login_hint never asked before: the reuse cache (account, connection, scopes, login_hint) misses,
    # so every call is a real Token Vault exchange with the in-process emulator.
    return f"bench-{_RUN}-{next(_hints)}@example.com"


TOKEN_ARGS = {"connection": "github", "scopes": ["repo:read"], "purpose": "bench: sequential and concurrent calls"}
CASES: dict[str, Case] = {
    "list_market": Case("list_market (100 listings)", "list_market", lambda i: {"limit": LISTINGS}),
    "check_balance": Case("check_balance", "check_balance", lambda i: {}),
    "buy_quota": Case(
        "buy_quota", "buy_quota", lambda i: {"listing_id": BUY_LISTING, "units": 1, "max_unit_price": 1000}
    ),
    "request_token": Case("request_token, steady state (reused answer)", "request_token", lambda i: TOKEN_ARGS),
    "request_token_fresh": Case(
        "request_token, fresh exchange", "request_token", lambda i: {**TOKEN_ARGS, "login_hint": _fresh_hint(i)}
    ),
}


def write_market(workdir: Path) -> Path:
    path = workdir / "market.toml"
    path.write_text(market_toml(), encoding="utf-8")
    return path


def fund(workdir: Path, database: Path, market_file: Path) -> None:
    """Fund the demo account through the operator's command (`wallet credit`, audited like any credit)."""
    run_cli(workdir, product_env(workdir, database, market_file), "wallet", "credit", DEMO_ACCOUNT, str(FUNDS))


async def stock_up(server: Server, token_units: int) -> None:
    """Buy enough request_token units (and one unit of the buy listing) through the product's own tools."""
    async with server.client() as client:
        remaining = token_units
        while remaining > 0:
            units = min(MAX_BUY, remaining)
            args = {"listing_id": TOKEN_LISTING, "units": units, "max_unit_price": 1000}
            structured(await client.call_tool("buy_quota", args), "buy_quota")
            remaining -= units
        buy = CASES["buy_quota"]
        structured(await client.call_tool(buy.tool, buy.args(0)), buy.tool)


async def capture(server: Server, workdir: Path) -> tuple[Path, Path]:
    """The product's real answers and its tools/list, for the floor to serve."""
    async with server.client() as client:
        listed = await client.list_tools()
        answers = {}
        for key in ("list_market", "check_balance", "buy_quota", "request_token"):
            case = CASES[key]
            answers[case.tool] = structured(await client.call_tool(case.tool, case.args(0)), case.tool)
    tools = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in listed.tools]
    answers_path, tools_path = workdir / "answers.json", workdir / "tools.json"
    answers_path.write_text(json.dumps(answers, indent=1), encoding="utf-8")
    tools_path.write_text(json.dumps(tools, indent=1), encoding="utf-8")
    return answers_path, tools_path
