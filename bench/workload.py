"""What the bench asks for: the market of 100 listings, the calls, and the product's preparation."""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import DEMO_ACCOUNT, BenchError, Server, run_cli, structured
from server.policy import MAX_RATE

LISTINGS = 100
TOKEN_LISTING = "bench-000"  # github, exactly [repo:read]: what request_token spends
BUY_LISTING = "bench-001"  # what buy_quota buys, one unit a call
PROXY_LISTING = f"bench-{LISTINGS - 1:03d}"  # github, exactly [read:user], delivery "proxy": what call_api spends
PROXY_SCOPES = ["read:user"]  # no other holding of the bench covers them, so call_api spends only PROXY_LISTING
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


def market_toml(api_base: str, count: int = LISTINGS) -> str:
    """`count` open listings (ids bench-000…), on the demo tenant's connected accounts, with ample supply.

    The last one is the proxy listing call_api spends: its `api` is the bench's loopback provider at
    `api_base` (plain http on loopback is allowed because this market file names it, SPEC §8).
    """
    tables = []
    for n in range(count):
        proxy = n == count - 1
        connection = "github" if proxy else _CONNECTIONS[n % 3]
        choices = _SCOPES[connection]
        scopes = PROXY_SCOPES if proxy else ["repo:read"] if n == 0 else choices[(n // 3) % len(choices)]
        tables.append(
            "[[listing]]\n"
            f'id = "bench-{n:03d}"\n'
            f'title = "Bench listing {n}: {connection} {" ".join(scopes)}"\n'
            f'connection = "{connection}"\n'
            f"scopes = {json.dumps(scopes)}\n"
            + (f'delivery = "proxy"\napi = [{json.dumps(api_base)}]\n' if proxy else "")
            + "supply = 1000000000\n"
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
    status: int | None = None  # the provider's status a call_api answer must carry (the provider got its token)

    def answer(self, result: Any) -> dict[str, Any]:
        """The structured answer of a successful call. Raises BenchError for an error result or a wrong status."""
        answer = structured(result, self.tool)
        if self.status is not None and answer.get("status") != self.status:
            raise BenchError(f"{self.tool}: the provider answered {answer.get('status')}, not {self.status}")
        return answer


_hints = itertools.count()
_RUN = secrets.token_hex(4)


def _fresh_hint(_: int) -> str:
    # A login_hint never asked before: the reuse cache (account, connection, scopes, login_hint) misses,
    # so every call is a real Token Vault exchange with the in-process emulator.
    return f"bench-{_RUN}-{next(_hints)}@example.com"


@dataclass
class _Provider:
    base: str = "http://127.0.0.1:9"  # replaced by use_provider() before any call_api is made


_provider = _Provider()


def use_provider(base: str) -> None:
    """Point the call_api cases at the loopback provider API running at `base`."""
    _provider.base = base


def _api_args(login_hint: str | None) -> dict[str, Any]:
    return {
        **API_ARGS, "url": f"{_provider.base}/repos/acme/widgets", **({"login_hint": login_hint} if login_hint else {})
    }


TOKEN_ARGS = {"connection": "github", "scopes": ["repo:read"], "purpose": "bench: sequential and concurrent calls"}
API_ARGS = {
    "connection": "github", "scopes": PROXY_SCOPES, "method": "GET", "headers": {"Accept": "application/json"},
    "purpose": "bench: brokered calls",
}
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
    # The same terms every call: the first opens a grant (TVM_GRANT_TTL outlasts the run), the rest spend nothing.
    "call_api": Case("call_api, inside a live grant", "call_api", lambda i: _api_args(None), status=200),
    # A new login_hint every call is a new grant key: a unit spent, a fresh Token Vault exchange, a grant opened.
    "call_api_fresh": Case(
        "call_api, opening a grant", "call_api", lambda i: _api_args(_fresh_hint(i)), status=200
    ),
}
# Cases that leave a live grant behind per call. check_balance lists the caller's live grants, so these run
# after every other case and the throughput phase, on every transport (HTTP and SSE share one agent).
LEAVES_GRANTS = frozenset({"call_api_fresh"})


def write_market(workdir: Path, api_base: str) -> Path:
    path = workdir / "market.toml"
    path.write_text(market_toml(api_base), encoding="utf-8")
    return path


# The bench times each call, not the operator's caps: every agent may call as fast as the policy allows
# (the default, 600 calls a minute per agent and account, would refuse most of a run's calls).
POLICY_TOML = f'[[agent]]\nid = "*"\ncalls_per_minute = {MAX_RATE}\n'


def write_policy(workdir: Path) -> Path:
    path = workdir / "policy.toml"
    path.write_text(POLICY_TOML, encoding="utf-8")
    return path


def fund(workdir: Path, env: dict[str, str]) -> None:
    """Fund the demo account through the operator's command (`wallet credit`, audited like any credit)."""
    run_cli(workdir, env, "wallet", "credit", DEMO_ACCOUNT, str(FUNDS))


async def stock_up(server: Server, token_units: int, proxy_units: int) -> None:
    """Buy enough request_token and call_api units (and one unit of the buy listing) through the product's tools."""
    async with server.client() as client:
        for listing, units in ((TOKEN_LISTING, token_units), (PROXY_LISTING, proxy_units)):
            remaining = units
            while remaining > 0:
                order = min(MAX_BUY, remaining)
                args = {"listing_id": listing, "units": order, "max_unit_price": 1000}
                structured(await client.call_tool("buy_quota", args), "buy_quota")
                remaining -= order
        buy = CASES["buy_quota"]
        structured(await client.call_tool(buy.tool, buy.args(0)), buy.tool)


async def capture(server: Server, workdir: Path) -> tuple[Path, Path]:
    """The product's real answers and its tools/list, for the floor to serve."""
    async with server.client() as client:
        listed = await client.list_tools()
        answers = {}
        # call_api first: it opens the stdio agent's grant, which check_balance then shows, as it will when timed
        for key in ("call_api", "list_market", "check_balance", "buy_quota", "request_token"):
            case = CASES[key]
            answers[case.tool] = case.answer(await client.call_tool(case.tool, case.args(0)))
    tools = [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in listed.tools]
    answers_path, tools_path = workdir / "answers.json", workdir / "tools.json"
    answers_path.write_text(json.dumps(answers, indent=1), encoding="utf-8")
    tools_path.write_text(json.dumps(tools, indent=1), encoding="utf-8")
    return answers_path, tools_path
