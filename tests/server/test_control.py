"""Operator control through the SDK client (SPEC §9): policy rules, the kill switch, rate limits, folding."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

import pytest
from mcp import Client

from server import audit
from server.app import Runtime, build_mcp
from server.clock import ManualClock
from server.demo import DEMO_ISSUER
from server.invariants import check_invariants
from server.policy import parse_policy
from server.principal import Principal, SubjectToken
from server.store import AuditFilter
from tests.conftest import held, ok, refused

ACCOUNT = "auth0|demo-user"
ALL = frozenset({"read:market", "read:balance", "buy:quota", "request:token", "call:api"})
TOKEN = {"connection": "github", "scopes": ["repo:read"], "purpose": "policy test"}
CALL = {"connection": "github", "scopes": ["repo:read"], "method": "GET", "purpose": "policy test",
        "url": DEMO_ISSUER + "provider/github/user"}
Clients = Callable[..., AbstractAsyncContextManager[Client]]


@pytest.fixture
def agent_client(runtime: Runtime) -> Clients:
    """A client acting for `account` as `agent` (its own bearer token from the demo tenant)."""
    assert runtime.tenant is not None
    state = runtime.tenant.state

    def make(agent: str, account: str = ACCOUNT) -> AbstractAsyncContextManager[Client]:
        if account not in state.users:
            state.add_user(account)
            state.connect_account(account, "github", ["repo:read", "repo:write"])
        bearer = state.mint_access_token(account, audience=runtime.tenant.audience, scopes=sorted(ALL), azp=agent)
        principal = Principal(account, agent, ALL, SubjectToken(bearer, "access_token"))

        async def principals(_: object) -> Principal:
            return principal

        return held(Client(build_mcp(runtime, principals, "stdio")))

    return make


async def load(runtime: Runtime, text: str) -> None:
    import tomllib

    await runtime.broker.load_policy(parse_policy(tomllib.loads(text)), by="test")


async def books(runtime: Runtime) -> tuple[int | None, list[tuple[str, int]]]:
    def read(tx: Any) -> tuple[int | None, list[tuple[str, int]]]:
        return tx.balance(ACCOUNT), [(h.listing_id, h.units_held) for h in tx.holdings_of(ACCOUNT)]

    return await runtime.db.read(read)


async def events(runtime: Runtime, code: str | None = None, **where: Any) -> list[dict[str, Any]]:
    records = await runtime.db.read(lambda tx: tx.find_audit(AuditFilter(**where)))
    return [audit.export_line(r) for r in records if code is None or r.code == code]


@pytest.fixture
async def bot(agent_client: Clients) -> AsyncIterator[Client]:
    async with agent_client("ci-bot") as c:
        yield c


async def test_a_connection_outside_the_agents_policy_is_refused_with_nothing_spent(
    runtime: Runtime, bot: Client
) -> None:
    await ok(bot, "buy_quota", {"listing_id": "github-repo-read", "units": 2, "max_unit_price": 100})
    await ok(bot, "buy_quota", {"listing_id": "github-repo-read-api", "units": 1, "max_unit_price": 100})
    await load(runtime, '[[agent]]\nid = "ci-bot"\nconnections = ["stripe"]')
    before = await books(runtime)
    for tool, args in (("request_token", TOKEN), ("call_api", CALL),
                       ("buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})):
        text = await refused(bot, tool, args)
        assert text.startswith("[policy_denied] policy rule connections of agent ci-bot does not allow github"), text
    assert await books(runtime) == before
    assert [e["code"] for e in await events(runtime, outcome="denied")] == ["policy_denied"] * 3
    await ok(bot, "buy_quota", {"listing_id": "stripe-read-only", "units": 1, "max_unit_price": 100})
    assert await runtime.db.read(check_invariants) == []


async def test_the_star_rule_applies_to_agents_not_named(runtime: Runtime, agent_client: Clients) -> None:
    await load(runtime, '[[agent]]\nid = "*"\nconnections = ["stripe"]\n[[agent]]\nid = "trusted"')
    async with agent_client("stranger") as stranger, agent_client("trusted") as trusted:
        assert (await refused(stranger, "buy_quota", {"listing_id": "github-repo-read", "units": 1,
                                                      "max_unit_price": 100})).startswith("[policy_denied] ")
        await ok(trusted, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})


async def test_max_spend_per_day_caps_what_buy_quota_spends_per_utc_day(
    runtime: Runtime, bot: Client, clock: ManualClock
) -> None:
    await load(runtime, '[[agent]]\nid = "ci-bot"\nmax_spend_per_day = 30')
    price = (await ok(bot, "list_market", {"connection": "stripe"}))["listings"][0]["unit_price"]
    units = 30 // price
    await ok(bot, "buy_quota", {"listing_id": "stripe-read-only", "units": units, "max_unit_price": 100})
    before = await books(runtime)
    text = await refused(bot, "buy_quota", {"listing_id": "stripe-read-only", "units": 1, "max_unit_price": 100})
    assert text.startswith("[policy_denied] policy rule max_spend_per_day of agent ci-bot is 30 credits: "
                           f"{units * price} spent today (UTC)")
    assert await books(runtime) == before
    clock.set(clock.now().replace(hour=0, minute=0) + timedelta(days=1))  # the next UTC day
    await ok(bot, "buy_quota", {"listing_id": "stripe-read-only", "units": 1, "max_unit_price": 100})


async def test_max_grants_per_hour_counts_tokens_and_new_grants_and_refunds_give_it_back(
    runtime: Runtime, bot: Client, clock: ManualClock
) -> None:
    assert runtime.tenant is not None
    await ok(bot, "buy_quota", {"listing_id": "github-repo-read", "units": 5, "max_unit_price": 100})
    await ok(bot, "buy_quota", {"listing_id": "github-repo-read-api", "units": 5, "max_unit_price": 100})
    await load(runtime, '[[agent]]\nid = "ci-bot"\nmax_grants_per_hour = 2')
    runtime.tenant.state.faults.fail_next(503, count=50)
    assert (await refused(bot, "request_token", {**TOKEN, "login_hint": "a@x"})).startswith("[vault_unavailable]")
    runtime.tenant.state.faults.clear()
    await ok(bot, "request_token", TOKEN)  # the refunded attempt did not count
    await ok(bot, "call_api", CALL)  # a new grant counts
    await ok(bot, "call_api", CALL)  # a call inside it does not
    before = await books(runtime)
    text = await refused(bot, "request_token", {**TOKEN, "login_hint": "b@x"})
    assert text.startswith("[policy_denied] policy rule max_grants_per_hour of agent ci-bot is 2: ")
    assert await books(runtime) == before
    clock.advance(timedelta(hours=1))
    await ok(bot, "request_token", {**TOKEN, "login_hint": "b@x"})
    assert await runtime.db.read(check_invariants) == []


async def test_a_principal_over_its_rate_is_told_an_honest_wait_and_others_are_not_slowed(
    runtime: Runtime, agent_client: Clients, clock: ManualClock
) -> None:
    await load(runtime, '[[agent]]\nid = "*"\ncalls_per_minute = 10')
    async with agent_client("flooder") as flooder, agent_client("calm") as calm:
        answers = [await flooder.call_tool("check_balance", {}) for _ in range(30)]  # 3× its calls_per_minute
        texts = [a.content[0].text for a in answers if a.is_error]  # type: ignore[union-attr]
        assert sum(not a.is_error for a in answers) == 10 and len(texts) == 20
        assert all(t.startswith("[rate_limited] ") for t in texts)
        wait = int(texts[-1].rsplit("retry in ", 1)[1].split(" ")[0])
        assert 1 <= wait <= 6
        await ok(calm, "check_balance", {})  # another agent of the same account has its own bucket
        clock.advance(timedelta(seconds=wait - 1))
        assert (await flooder.call_tool("check_balance", {})).is_error or wait == 1
        clock.advance(timedelta(seconds=1))
        await ok(flooder, "check_balance", {})  # the wait was honest
    await runtime.broker.flush_refusals(everything=True)  # what a serving process does once a second
    limited = await events(runtime, code="rate_limited")
    assert 2 <= len(limited) <= 4  # folded: at most one event a second per principal, then its count
    refusals = 20 + (wait > 1)
    assert sum(e["args"]["suppressed"] for e in limited) + len(limited) == refusals


async def test_a_blocked_agent_is_refused_everything_with_the_reason_and_its_grants_close(
    runtime: Runtime, bot: Client, agent_client: Clients
) -> None:
    await ok(bot, "buy_quota", {"listing_id": "github-repo-read-api", "units": 2, "max_unit_price": 100})
    opened = await ok(bot, "call_api", CALL)
    closed = await runtime.broker.block_agent("ci-bot", "ran away with the budget", by="cli:ops")
    assert closed == 1 and len(runtime.broker.grant_tokens) == 0
    before = await books(runtime)
    for tool, args in (("list_market", {}), ("check_balance", {}), ("call_api", CALL), ("request_token", TOKEN),
                       ("buy_quota", {"listing_id": "x", "units": 1, "max_unit_price": 1}), ("buy_quota", {})):
        text = await refused(bot, tool, args)
        assert text == "[agent_blocked] the operator blocked agent ci-bot: ran away with the budget", text
    assert await books(runtime) == before
    async with agent_client("other-agent") as other:
        await ok(other, "check_balance", {})
    assert await runtime.broker.unblock_agent("ci-bot", by="cli:ops")
    assert not await runtime.broker.unblock_agent("ci-bot", by="cli:ops")
    after = await ok(bot, "call_api", CALL)
    assert after["grant_id"] != opened["grant_id"]  # the closed grant stays closed: a new unit, a new grant
    [block] = await events(runtime, tool="agent_block")
    assert (block["account"], block["agent"], block["args"]) == (
        "cli:ops", "operator", {"agent": "ci-bot", "reason": "ran away with the budget", "grants_closed": 1}
    )
    assert [e["outcome"] for e in await events(runtime, tool="agent_unblock")] == ["ok", "denied"]
    assert await runtime.db.read(check_invariants) == []


async def test_a_hostile_agent_name_and_reason_are_escaped_in_the_refusal(
    runtime: Runtime, agent_client: Clients
) -> None:
    name = "evil\x1b[31m\u202e"
    await runtime.broker.block_agent(name, "stop\x1b[2J", by="cli:ops")
    async with agent_client(name) as evil:
        text = await refused(evil, "check_balance", {})
    assert "\x1b" not in text and "\u202e" not in text and "\\x1b[2J" in text


async def test_block_events_are_folded_per_principal(runtime: Runtime, bot: Client) -> None:
    await runtime.broker.block_agent("ci-bot", "no", by="cli:ops")
    for _ in range(50):
        await refused(bot, "check_balance", {})
    await runtime.broker.flush_refusals(everything=True)
    blocked = await events(runtime, code="agent_blocked")
    assert 1 <= len(blocked) <= 3 and sum(e["args"]["suppressed"] for e in blocked) + len(blocked) == 50
    assert json.dumps(blocked).count("ci-bot") >= 1
