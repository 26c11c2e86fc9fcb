"""A stateful property test: random tool calls against a simple model, invariants after every step.

The machine drives the five tools (through `ToolSpec.call`, the same path MCP uses) for two
accounts, with the clock moving (prices fall, listings open and close, grants end),
idempotency keys reused, and Token Vault failing now and then. call_api reaches the demo's
provider API. The operator blocks and unblocks the agent and changes its policy, and the
account's owner approves, denies or ignores the approvals a gated listing asks for. After
every step the books must balance (`check_invariants`) and the tools must agree with the
model. `TVM_SLOW=1` runs it longer.

It runs on SQLite (a temporary file per example) and on PostgreSQL (TestBrokerMachineOnPostgresql: a
database of its own per example, dropped after it; fewer examples by default, as each costs more).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from mcp.types import CallToolResult

from server import market
from server.app import Runtime, open_runtime
from server.clock import ManualClock
from server.config import DEFAULT_GRANT_TTL, load_config
from server.demo import DEMO_ISSUER
from server.errors import ApprovalDenied, ApprovalTimeout
from server.invariants import check_invariants
from server.policy import parse_policy
from server.principal import Principal, SubjectToken
from server.store import SqliteDatabase
from tests.conftest import PgDatabases, pg_url
from tools import buy_quota, call_api, check_balance, request_token

SLOW = os.environ.get("TVM_SLOW") == "1"
T0 = datetime(2027, 3, 1, tzinfo=UTC)
ACCOUNTS = ("auth0|alice", "auth0|bob")
SCOPES = ("read:market", "read:balance", "buy:quota", "request:token", "call:api")
API = DEMO_ISSUER + "provider/github"
LISTINGS: list[dict[str, Any]] = [
    {"id": "gh-read", "title": "r", "connection": "github", "scopes": ["repo:read"], "supply": 8,
     "start_price": 10, "floor_price": 2, "opens_at": T0, "closes_at": T0 + timedelta(days=10)},
    {"id": "gh-rw", "title": "rw", "connection": "github", "scopes": ["repo:read", "repo:write"], "supply": 5,
     "start_price": 30, "floor_price": 10, "opens_at": T0 + timedelta(days=1), "closes_at": T0 + timedelta(days=20)},
    {"id": "st-ro", "title": "s", "connection": "stripe", "scopes": ["read_only"], "supply": 6, "approval": "grant",
     "start_price": 5, "floor_price": 5, "opens_at": T0 - timedelta(days=1), "closes_at": T0 + timedelta(days=5)},
    {"id": "gh-api", "title": "a", "connection": "github", "scopes": ["repo:read"], "supply": 6, "start_price": 4,
     "floor_price": 1, "opens_at": T0, "closes_at": T0 + timedelta(days=10), "delivery": "proxy", "api": [API]},
]
CALL_ASKS = [["repo:read"], ["repo:read", "repo:write"]]
POLICIES = {"none": "", "github-only": '[[agent]]\nid = "agent"\nconnections = ["github"]',
            "no-approval": '[[agent]]\nid = "agent"\napproval = "never"'}
ASKS = [("github", ["repo:read"]), ("github", ["repo:write"]), ("github", ["repo:read", "repo:write"]),
        ("stripe", ["read_only"]), ("stripe", ["read_write"]), ("google-oauth2", ["x"])]


def model_price(item: dict[str, Any], now: datetime) -> int:
    """The SPEC formula, computed independently with exact fractions."""
    window = Fraction((item["closes_at"] - item["opens_at"]) / timedelta(microseconds=1))
    elapsed = Fraction((now - item["opens_at"]) / timedelta(microseconds=1))
    elapsed = min(max(elapsed, Fraction(0)), window)
    drop = (item["start_price"] - item["floor_price"]) * elapsed / window
    return int(item["start_price"] - (drop.numerator // drop.denominator))


@dataclass
class Model:
    balances: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACCOUNTS, 0))
    sold: dict[str, int] = field(default_factory=lambda: {i["id"]: 0 for i in LISTINGS})
    # account -> listing -> [units_held, order created]
    holdings: dict[str, dict[str, list[int]]] = field(default_factory=lambda: {a: {} for a in ACCOUNTS})
    receipts: dict[tuple[str, str], tuple[tuple[str, int, int], dict[str, Any]]] = field(default_factory=dict)
    created: int = 0
    # (account, scopes, login_hint) -> (grant id, when it ends)
    grants: dict[tuple[str, tuple[str, ...], str | None], tuple[str, datetime]] = field(default_factory=dict)
    blocked: bool = False
    policy: str = "none"
    answer: str = "approve"  # how the account's owner answers an approval


class BrokerMachine(RuleBasedStateMachine):
    backend = "sqlite"

    def open_store(self) -> str:
        """TVM_DATABASE for this example's store, new and empty."""
        self.dir = tempfile.mkdtemp(prefix="tvm-state-")
        return str(Path(self.dir) / "v.db")

    def close_store(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock(T0 + timedelta(days=1))  # all three listings open at the start
        config = load_config({"TVM_DATABASE": self.open_store()}, dotenv=False)
        try:
            self.runtime: Runtime = self.loop.run_until_complete(open_runtime(config, clock=self.clock))
        except BaseException:
            self.loop.close()
            self.close_store()
            raise
        assert isinstance(self.runtime.db, SqliteDatabase) == (self.backend == "sqlite")
        tenant = self.runtime.tenant
        assert tenant is not None
        self.tenant = tenant
        specs = market.parse_listings({"listing": LISTINGS})
        self.loop.run_until_complete(self.runtime.db.write(lambda tx: market.load(tx, specs)))
        self.model = Model()
        self.principals: dict[str, Principal] = {}
        for account in ACCOUNTS:
            tenant.state.add_user(account)
            tenant.state.connect_account(account, "github", ["repo:read", "repo:write"])
            tenant.state.connect_account(account, "stripe", ["read_only"])
            bearer = tenant.state.mint_access_token(account, audience=tenant.audience, scopes=list(SCOPES))
            self.principals[account] = Principal(
                account, "agent", frozenset(SCOPES), SubjectToken(bearer, "access_token")
            )
            self.run(self.runtime.broker.credit(account, 150))
            self.model.balances[account] += 150
        self.hint = 0
        self.runtime.broker.approver = self.owner_answers  # the owner's side of CIBA, as the model says

    async def owner_answers(self, **ask: Any) -> None:
        if self.model.answer == "deny":
            raise ApprovalDenied("the owner said no; your unit was refunded")
        if self.model.answer == "ignore":
            raise ApprovalTimeout("no answer in time; your unit was refunded")

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def call_tool(self, spec: Any, account: str, args: dict[str, Any]) -> Any:
        async def principals(_: object) -> Principal:
            return self.principals[account]

        return self.run(spec.call(self.runtime.broker, principals, "stdio", args))

    def teardown(self) -> None:
        try:
            self.run(self.runtime.aclose())
        finally:
            self.loop.close()
            self.close_store()

    # ---- rules ------------------------------------------------------------------------------
    @initialize(account=st.sampled_from(ACCOUNTS), indexes=st.sets(st.integers(0, len(LISTINGS) - 1)))
    def start_with_holdings(self, account: str, indexes: set[int]) -> None:
        """Often start with overlapping holdings, so least-privilege spending is exercised early."""
        for index in sorted(indexes):
            self.buy(account, index, 1, "plenty", None)

    @rule(delta=st.sampled_from([timedelta(0), timedelta(hours=1), timedelta(days=1), timedelta(days=4)]))
    def advance_clock(self, delta: timedelta) -> None:
        self.clock.advance(delta)

    @rule()
    def block(self) -> None:
        self.run(self.runtime.broker.block_agent("agent", "property test", by="operator"))
        self.model.blocked = True
        self.model.grants.clear()  # its live grants close

    @rule()
    def unblock(self) -> None:
        assert self.run(self.runtime.broker.unblock_agent("agent", by="operator")) == self.model.blocked
        self.model.blocked = False

    @rule(name=st.sampled_from(sorted(POLICIES)))
    def set_policy(self, name: str) -> None:
        import tomllib

        self.run(self.runtime.broker.load_policy(parse_policy(tomllib.loads(POLICIES[name])), by="operator"))
        self.model.policy = name

    @rule(answer=st.sampled_from(["approve", "approve", "deny", "ignore"]))
    def owner_will(self, answer: str) -> None:
        self.model.answer = answer

    def refused_by_operator(self, result: Any) -> bool:
        """The kill switch answers first, whatever the call."""
        if not self.model.blocked:
            return False
        assert isinstance(result, CallToolResult) and result.content[0].text.startswith("[agent_blocked] ")
        return True

    @rule(account=st.sampled_from(ACCOUNTS), amount=st.integers(1, 100))
    def credit(self, account: str, amount: int) -> None:
        self.run(self.runtime.broker.credit(account, amount))
        self.model.balances[account] += amount

    @rule(
        account=st.sampled_from(ACCOUNTS),
        index=st.integers(0, len(LISTINGS) - 1),
        units=st.integers(1, 4),
        limit=st.sampled_from(["exact", "below", "plenty"]),
        key=st.sampled_from([None, "k1", "k2", "k3"]),
    )
    def buy(self, account: str, index: int, units: int, limit: str, key: str | None) -> None:
        item = LISTINGS[index]
        now = self.clock.now()
        price = model_price(item, now)
        max_price = {"exact": price, "below": price - 1, "plenty": 1000}[limit]
        if max_price < 0:
            max_price = 0
        args = {"listing_id": item["id"], "units": units, "max_unit_price": max_price}
        if key is not None:
            args["idempotency_key"] = key
        result = self.call_tool(buy_quota.SPEC, account, args)
        if self.refused_by_operator(result):
            return
        expected = self.expect_buy(account, item, units, max_price, price, key, now)
        if expected is None and self.model.policy == "github-only" and item["connection"] != "github":
            expected = "policy_denied"
        if isinstance(expected, str):
            assert isinstance(result, CallToolResult) and result.is_error, (expected, result)
            assert result.content[0].text.startswith(f"[{expected}] "), (expected, result.content[0].text)
            return
        assert not isinstance(result, CallToolResult), result.content[0].text
        receipt = result.model_dump()
        if expected is not None:  # a replay
            assert receipt == expected
            return
        assert receipt["unit_price"] == price and receipt["total"] == price * units
        assert receipt["balance_after"] == self.model.balances[account] - price * units
        self.model.balances[account] -= price * units
        self.model.sold[item["id"]] += units
        holding = self.model.holdings[account].setdefault(item["id"], [0, self.model.created])
        self.model.created += 1
        holding[0] += units
        assert receipt["units_held"] == holding[0]
        if key is not None:
            self.model.receipts[(account, key)] = ((item["id"], units, max_price), receipt)

    def expect_buy(
        self, account: str, item: dict[str, Any], units: int, max_price: int, price: int, key: str | None,
        now: datetime,
    ) -> str | dict[str, Any] | None:
        if key is not None and (account, key) in self.model.receipts:
            request, receipt = self.model.receipts[(account, key)]
            return receipt if request == (item["id"], units, max_price) else "idempotency_key_reused"
        if self.model.blocked:  # pragma: no cover - answered before (refused_by_operator)
            return "agent_blocked"
        if not item["opens_at"] <= now <= item["closes_at"]:
            return "listing_closed"
        if price > max_price:
            return "price_above_limit"
        if item["supply"] - self.model.sold[item["id"]] < units:
            return "sold_out"
        if self.model.balances[account] < price * units:
            return "insufficient_funds"
        return None

    @rule(account=st.sampled_from(ACCOUNTS), ask=st.sampled_from(ASKS),
          fault=st.sampled_from([None, None, None, "outage", "revoked", "rate"]))
    def request(self, account: str, ask: tuple[str, list[str]], fault: str | None) -> None:
        connection, scopes = ask
        args: dict[str, Any] = {"connection": connection, "scopes": scopes, "purpose": "property test"}
        if fault is not None:  # a fresh ask, so the reuse cache cannot hide the failure
            self.hint += 1
            args["login_hint"] = f"u{self.hint}@example.com"
        state = self.tenant.state
        if fault == "outage":
            state.faults.fail_next(503, count=50)
        elif fault == "rate":
            state.faults.rate_limit_next(count=50, retry_after=120, reset_in=120)
        elif fault == "revoked" and connection in ("github", "stripe"):
            state.revoke_connection(account, connection)
        try:
            result = self.call_tool(request_token.SPEC, account, args)
        finally:
            state.faults.clear()
            if fault == "revoked" and connection in ("github", "stripe"):
                granted = ["repo:read", "repo:write"] if connection == "github" else ["read_only"]
                state.connect_account(account, connection, granted)
        if self.refused_by_operator(result):
            return
        if self.model.policy == "github-only" and connection != "github":
            assert isinstance(result, CallToolResult) and result.content[0].text.startswith("[policy_denied] ")
            return
        refusal, chosen = self.expect_holding(account, connection, scopes, tokens=True)
        if refusal is not None:
            assert isinstance(result, CallToolResult) and result.content[0].text.startswith(f"[{refusal}] ")
            return
        gated = _listing(chosen).get("approval", "none") != "none" and self.model.policy != "no-approval"
        if gated and self.model.answer != "approve":
            code = {"deny": "approval_denied", "ignore": "approval_timeout"}[self.model.answer]
            assert isinstance(result, CallToolResult) and result.content[0].text.startswith(f"[{code}] ")
            self.balance_matches_the_model(account)  # refunded
            return
        if fault is not None or (connection == "stripe" and "read_write" in scopes):
            assert isinstance(result, CallToolResult) and result.is_error, result
            codes = {"outage": "vault_unavailable", "rate": "rate_limited", "revoked": "account_not_connected"}
            code = codes.get(fault or "", "vault_denied")
            assert result.content[0].text.startswith(f"[{code}] "), result.content[0].text
            return  # refunded: the model does not change
        assert not isinstance(result, CallToolResult), result.content[0].text
        self.model.holdings[account][chosen][0] -= 1
        assert result.units_remaining == self.model.holdings[account][chosen][0]
        self.balance_matches_the_model(account)  # the right holding paid

    def expect_holding(
        self, account: str, connection: str, scopes: list[str], *, tokens: bool = False, api: bool = False
    ) -> tuple[str | None, str]:
        """(the refusal code, or None and the listing whose holding pays)."""
        held = [(lid, h) for lid, h in self.model.holdings[account].items()
                if _listing(lid)["connection"] == connection]
        if not held:
            return "no_quota", ""
        covering = [(lid, h) for lid, h in held if set(scopes) <= set(_listing(lid)["scopes"])]
        if not covering:
            return "scope_not_covered", ""
        if tokens:
            covering = [(lid, h) for lid, h in covering if _listing(lid).get("delivery", "token") == "token"]
            if not covering:
                return "proxy_only", ""
        if api:
            covering = [(lid, h) for lid, h in covering if _listing(lid).get("api")]
            if not covering:
                return "api_not_allowed", ""
        usable = [(lid, h) for lid, h in covering if h[0] > 0]
        if not usable:
            return "no_quota", ""
        return None, min(usable, key=lambda item: (len(_listing(item[0])["scopes"]), item[1][1]))[0]

    @rule(account=st.sampled_from(ACCOUNTS), scopes=st.sampled_from(CALL_ASKS),
          fault=st.sampled_from([None, None, None, "outage", "revoked"]))
    def call(self, account: str, scopes: list[str], fault: str | None) -> None:
        now = self.clock.now()
        hint = None
        if fault is not None:  # a fresh ask (a grant of its own), so neither a grant nor reuse hides the failure
            self.hint += 1
            hint = f"u{self.hint}@example.com"
        key = (account, tuple(scopes), hint)
        live = self.model.grants.get(key)
        live = live if live is not None and live[1] > now else None
        state = self.tenant.state
        if fault == "outage":
            state.faults.fail_next(503, count=50)
        elif fault == "revoked":
            state.revoke_connection(account, "github")
        args = {"connection": "github", "scopes": scopes, "method": "GET", "url": API + "/repos/acme/x",
                "purpose": "property test", **({"login_hint": hint} if hint else {})}
        try:
            result = self.call_tool(call_api.SPEC, account, args)
        finally:
            state.faults.clear()
            if fault == "revoked":
                state.connect_account(account, "github", ["repo:read", "repo:write"])
        if self.refused_by_operator(result):
            return
        if live is not None:  # inside the grant: its token is in memory, nothing is spent, no fault matters
            assert not isinstance(result, CallToolResult), result.content[0].text
            assert result.grant_id == live[0] and result.status == 200
            self.balance_matches_the_model(account)
            return
        refusal, chosen = self.expect_holding(account, "github", scopes, api=True)
        if refusal is not None:
            assert isinstance(result, CallToolResult) and result.content[0].text.startswith(f"[{refusal}] "), (
                refusal, result.content[0].text)
            return
        if fault is not None:
            code = {"outage": "vault_unavailable", "revoked": "account_not_connected"}[fault]
            assert isinstance(result, CallToolResult) and result.content[0].text.startswith(f"[{code}] ")
            self.balance_matches_the_model(account)  # refunded
            return
        assert not isinstance(result, CallToolResult), result.content[0].text
        assert result.status == 200
        self.model.holdings[account][chosen][0] -= 1
        assert result.units_remaining == self.model.holdings[account][chosen][0]
        self.model.grants[key] = (result.grant_id, now + timedelta(seconds=DEFAULT_GRANT_TTL))
        self.balance_matches_the_model(account)

    @precondition(lambda self: True)
    @rule(account=st.sampled_from(ACCOUNTS))
    def balance_matches_the_model(self, account: str) -> None:
        result = self.call_tool(check_balance.SPEC, account, {})
        if self.refused_by_operator(result):
            return self.stored_books_match_the_model(account)
        assert not isinstance(result, CallToolResult)
        assert result.balance == self.model.balances[account]
        assert {h.listing_id: h.units_remaining for h in result.holdings} == {
            lid: h[0] for lid, h in self.model.holdings[account].items()
        }
        now = self.clock.now()
        assert sorted(g.grant_id for g in result.grants) == sorted(
            gid for (owner, _, _), (gid, ends) in self.model.grants.items() if owner == account and ends > now
        )

    def stored_books_match_the_model(self, account: str) -> None:
        def read(tx: Any) -> tuple[int | None, dict[str, int]]:
            return tx.balance(account), {h.listing_id: h.units_held for h in tx.holdings_of(account)}

        balance, held = self.run(self.runtime.db.read(read))
        assert (balance or 0) == self.model.balances[account]
        assert held == {lid: h[0] for lid, h in self.model.holdings[account].items()}

    @invariant()
    def books_balance(self) -> None:
        assert self.run(self.runtime.db.read(check_invariants)) == []


def _listing(listing_id: str) -> dict[str, Any]:
    return next(item for item in LISTINGS if item["id"] == listing_id)


BrokerMachine.TestCase.settings = settings(
    max_examples=200 if SLOW else 25,
    stateful_step_count=60 if SLOW else 25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBrokerMachine = BrokerMachine.TestCase


class PgBrokerMachine(BrokerMachine):
    """The same machine on PostgreSQL: each example on a database of its own, a copy of the session's schema
    template (conftest's pg_databases makes the next ones while examples run), dropped after the example."""

    backend = "postgresql"
    databases: ClassVar[PgDatabases | None] = None  # set by TestBrokerMachineOnPostgresql

    def open_store(self) -> str:
        assert self.databases is not None, "run PgBrokerMachine through TestBrokerMachineOnPostgresql"
        self.name = self.databases.take()
        return pg_url(self.name)

    def close_store(self) -> None:
        assert self.databases is not None
        self.databases.give_back(self.name)


class TestBrokerMachineOnPostgresql(PgBrokerMachine.TestCase):  # type: ignore[misc,valid-type]
    settings = settings(
        max_examples=100 if SLOW else 10,
        stateful_step_count=60 if SLOW else 25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )

    @pytest.fixture(autouse=True)
    def _databases(self, pg_databases: PgDatabases) -> Iterator[None]:
        PgBrokerMachine.databases = pg_databases
        yield
        PgBrokerMachine.databases = None
