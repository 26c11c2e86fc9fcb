"""Human approval through the tools (SPEC §9): request_token and call_api wait for the account's owner."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from mcp import Client

from server import audit, market
from server.app import Runtime
from server.clock import ManualClock
from server.demo import DEMO_ISSUER
from server.invariants import check_invariants
from server.policy import parse_policy
from server.store import AuditFilter
from tests.conftest import demo_client, demo_runtime, ok, refused

pytestmark = pytest.mark.both_backends

API = DEMO_ISSUER + "provider/github"
WINDOW = {"opens_at": datetime(2026, 1, 1, tzinfo=UTC), "closes_at": datetime(2030, 1, 1, tzinfo=UTC)}
TOKEN = {"connection": "github", "scopes": ["repo:read"], "purpose": "read the repo"}
CALL = {"connection": "github", "scopes": ["repo:read"], "method": "GET", "purpose": "read the repo",
        "url": API + "/repos/acme/x"}


@pytest.fixture
async def approving(database: str, clock: ManualClock) -> AsyncIterator[Runtime]:
    """The demo runtime with listings that need approval; the demo user answers every second."""
    async with demo_runtime(database, clock, TVM_APPROVAL_TIMEOUT="3") as runtime:
        yield await gated(runtime)


async def gated(runtime: Runtime) -> Runtime:
    base = {"connection": "github", "scopes": ["repo:read"], "supply": 10, "start_price": 5, "floor_price": 1,
            **WINDOW}
    specs = market.parse_listings({"listing": [
        {"id": "gated-token", "title": "t", "approval": "grant", **base},
        {"id": "gated-api", "title": "a", "delivery": "proxy", "api": [API], "approval": "grant", **base},
        {"id": "gated-writes", "title": "w", "delivery": "proxy", "api": [API], "approval": "writes",
         "methods": ["GET", "POST"], **{**base, "scopes": ["repo:read", "repo:write"]}},
    ]})
    await runtime.db.write(lambda tx: market.load(tx, specs))
    assert runtime.tenant is not None
    runtime.tenant.state.ciba_interval = 1
    runtime.tenant.state.ciba_approve_after = None
    return runtime


@pytest.fixture
async def client(approving: Runtime) -> AsyncIterator[Client]:
    async with demo_client(approving) as c:
        yield c


def ciba(runtime: Runtime) -> Any:
    assert runtime.tenant is not None
    return runtime.tenant.state


def asked(runtime: Runtime) -> list[Any]:
    return [r for r in ciba(runtime).requests if r.path == "/bc-authorize"]


async def units(runtime: Runtime) -> dict[str, int]:
    holdings = await runtime.db.read(lambda tx: tx.holdings_of("auth0|demo-user"))
    return {h.listing_id: h.units_held for h in holdings}


async def events(runtime: Runtime, tool: str) -> list[dict[str, Any]]:
    records = await runtime.db.read(lambda tx: tx.find_audit(AuditFilter(tool=tool)))
    return [audit.export_line(r) for r in records]


async def test_an_approved_request_token_gets_its_token_after_the_owner_says_yes(
    approving: Runtime, client: Client
) -> None:
    await ok(client, "buy_quota", {"listing_id": "gated-token", "units": 2, "max_unit_price": 10})
    progress: list[tuple[float, float | None, str | None]] = []

    async def seen(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    started = time.monotonic()
    result = await client.call_tool("request_token", TOKEN, progress_callback=seen)
    assert not result.is_error, result.content
    assert time.monotonic() - started >= 0.9  # it waited for the owner (one poll interval)
    assert result.structured_content is not None and result.structured_content["units_remaining"] == 1
    assert progress and all(total == 3 for _, total, _ in progress)  # TVM_APPROVAL_TIMEOUT
    [sent] = asked(approving)
    assert sent.fields["scope"] == "openid" and sent.fields["requested_expiry"] == "3"
    assert json.loads(sent.fields["login_hint"]) == {
        "format": "iss_sub", "iss": DEMO_ISSUER, "sub": "auth0|demo-user"
    }
    assert sent.fields["binding_message"] == "Approve token-vault-mcp-demo: github"
    [detail] = json.loads(sent.fields["authorization_details"])
    assert detail == {"type": "token_vault_grant", "connection": "github", "scopes": ["repo:read"],
                      "agent": "token-vault-mcp-demo", "purpose": "read the repo"}
    assert sent.client_id == ciba(approving).clients[sent.client_id].client_id == "token-vault-mcp-demo"
    assert await units(approving) == {"gated-token": 1}
    assert await approving.db.read(check_invariants) == []


async def test_a_denial_is_approval_denied_and_refunds_the_unit(approving: Runtime, client: Client) -> None:
    await ok(client, "buy_quota", {"listing_id": "gated-token", "units": 1, "max_unit_price": 10})
    ciba(approving).ciba_mode = "deny"
    text = await refused(client, "request_token", TOKEN)
    assert text.startswith("[approval_denied] ") and "refunded" in text
    assert await units(approving) == {"gated-token": 1}
    assert ciba(approving).vault_issues == []  # no exchange without approval
    [event] = await events(approving, "request_token")
    assert (event["outcome"], event["code"]) == ("denied", "approval_denied")
    assert await approving.db.read(check_invariants) == []


async def test_no_answer_in_time_is_approval_timeout_and_refunds_the_unit(approving: Runtime, client: Client) -> None:
    await ok(client, "buy_quota", {"listing_id": "gated-api", "units": 1, "max_unit_price": 10})
    ciba(approving).ciba_mode = "manual"  # the owner never answers
    started = time.monotonic()
    text = await refused(client, "call_api", CALL)
    assert text.startswith("[approval_timeout] ") and 2.5 <= time.monotonic() - started < 6
    assert await units(approving) == {"gated-api": 1}
    [event] = await events(approving, "call_api")
    assert event["code"] == "approval_timeout" and event["args"]["reservation_id"].startswith("res_")
    assert await approving.db.read(check_invariants) == []


async def test_a_grant_is_approved_once_and_its_calls_need_no_more(approving: Runtime, client: Client) -> None:
    await ok(client, "buy_quota", {"listing_id": "gated-api", "units": 1, "max_unit_price": 10})
    first = await ok(client, "call_api", CALL)
    second = await ok(client, "call_api", CALL)
    assert first["grant_id"] == second["grant_id"] and len(asked(approving)) == 1
    [detail] = json.loads(asked(approving)[0].fields["authorization_details"])
    assert (detail["method"], detail["url"]) == ("GET", API + "/repos/acme/x")


async def test_under_writes_every_write_needs_its_own_approval_bound_to_method_and_url(
    approving: Runtime, client: Client
) -> None:
    await ok(client, "buy_quota", {"listing_id": "gated-writes", "units": 1, "max_unit_price": 10})
    write = {**CALL, "scopes": ["repo:read", "repo:write"]}
    await ok(client, "call_api", write)  # the grant: approved once
    await ok(client, "call_api", write)  # a read inside it: nothing more to approve
    assert len(asked(approving)) == 1
    posted = await ok(client, "call_api", {**write, "method": "POST", "url": API + "/repos/acme/x/issues?x=1",
                                           "json": {"title": "t"}})
    assert posted["status"] == 200 and len(asked(approving)) == 2
    [detail] = json.loads(asked(approving)[1].fields["authorization_details"])
    assert (detail["method"], detail["url"]) == ("POST", API + "/repos/acme/x/issues?x=")
    ciba(approving).ciba_mode = "deny"
    text = await refused(client, "call_api", {**write, "method": "POST", "url": API + "/repos/acme/x/issues"})
    assert text.startswith("[approval_denied] ") and "nothing was spent" in text and "refunded" not in text
    assert await units(approving) == {"gated-writes": 0}  # the grant's one unit; a denied write costs nothing
    assert [e["code"] for e in await events(approving, "call_api")] == [None, None, None, "approval_denied"]
    assert await approving.db.read(check_invariants) == []


async def test_the_policy_can_demand_or_waive_approval(approving: Runtime, client: Client) -> None:
    import tomllib

    await ok(client, "buy_quota", {"listing_id": "gated-token", "units": 3, "max_unit_price": 10})
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 3, "max_unit_price": 100})
    policy = parse_policy(tomllib.loads('[[agent]]\nid = "token-vault-mcp-demo"\napproval = "never"'))
    await approving.broker.load_policy(policy, by="test")
    await ok(client, "request_token", {**TOKEN, "login_hint": "a@x"})
    assert asked(approving) == []
    policy = parse_policy(tomllib.loads('[[agent]]\nid = "token-vault-mcp-demo"\napproval = "always"'))
    await approving.broker.load_policy(policy, by="test")
    await ok(client, "request_token", {**TOKEN, "login_hint": "b@x"})  # github-repo-read needs no approval itself
    assert len(asked(approving)) == 1


async def test_a_reused_answer_still_waits_for_approval(approving: Runtime, client: Client) -> None:
    await ok(client, "buy_quota", {"listing_id": "gated-token", "units": 2, "max_unit_price": 10})
    await ok(client, "request_token", TOKEN)
    await ok(client, "request_token", TOKEN)  # Token Vault's answer is reused, the owner is asked again
    assert len(asked(approving)) == 2 and len(ciba(approving).vault_issues) == 1
    assert await units(approving) == {"gated-token": 0}
