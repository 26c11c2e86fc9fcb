"""Every tool fed generated garbage answers a documented `[code]`: never `internal`, never a traceback,
and the books do not move. `TVM_SLOW=1` generates many more inputs. On SQLite and on PostgreSQL
(`both_backends`), whose TEXT cannot hold a NUL character where SQLite's can: free text that reaches the
store (an idempotency key, a purpose, a login hint) is tried with NUL in it by a caller who can pay."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from server.app import Runtime, build_mcp
from server.audit import verify_log
from server.demo import DEMO_ISSUER
from server.invariants import check_invariants
from server.principal import Principal
from server.store import Tx
from tests.conftest import held, ok, text_of

SLOW = os.environ.get("TVM_SLOW") == "1"
DOCUMENTED = {
    "unauthenticated", "insufficient_scope", "invalid_argument", "unknown_listing", "listing_closed", "sold_out",
    "insufficient_funds", "price_above_limit", "idempotency_key_reused", "no_quota", "scope_not_covered",
    "account_not_connected", "vault_denied", "vault_unavailable", "rate_limited", "audit_unavailable",
    "api_not_allowed", "proxy_only",
}
FIELDS = ["connection", "include_closed", "limit", "cursor", "listing_id", "units", "max_unit_price",
          "idempotency_key", "scopes", "purpose", "login_hint", "account", "method", "url", "headers", "json_body",
          "body", "__proto__", ""]
NASTY = [
    "'; DROP TABLE audit; --", '{"units": 1}', "\x1b[31mred\x1b[0m", "\x00", "\u202e", "💥" * 50, "github",
    "github-repo-read", "x" * 100_000, " ", "../../etc/passwd", "null", "[\"repo:read\"]", "%s%s%n",
]
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 10_001, 2**63, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40), st.sampled_from(NASTY),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
    st.text(max_size=8), inner, max_size=4), max_leaves=12)
arguments = st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=12)), values, max_size=6)
TOOLS = ["list_market", "check_balance", "buy_quota", "request_token", "call_api"]

pytestmark = pytest.mark.both_backends


@pytest.fixture
async def broke_client(runtime: Runtime) -> AsyncIterator[Client]:
    """A caller with every scope but no money and no quota, so no generated call can move the books."""
    principal = Principal("auth0|hostile", "fuzzer", frozenset(
        {"read:market", "read:balance", "buy:quota", "request:token", "call:api"}))

    async def principals(_: object) -> Principal:
        return principal

    async with held(Client(build_mcp(runtime, principals, "stdio"))) as client:
        yield client


def books(tx: Tx) -> str:
    listings = tx.page_listings(after=None, connection=None, open_at=None, limit=1000)
    holdings = tx.holdings_of("auth0|hostile")
    totals = tx.ledger_totals()
    return json.dumps([[(x.id, x.sold) for x in listings], [h.units_bought for h in holdings],
                       tx.balance("auth0|hostile"), tx.balance("market"), tx.balance("mint"), totals.balance_sum])


@settings(max_examples=600 if SLOW else 120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tool=st.sampled_from(TOOLS), args=arguments)
async def test_garbage_gets_a_documented_code_and_changes_nothing(
    broke_client: Client, runtime: Runtime, tool: str, args: dict[str, Any]
) -> None:
    before = await runtime.db.read(books)
    result = await broke_client.call_tool(tool, args)
    text = text_of(result)
    assert "Traceback" not in text and "File \"" not in text
    if result.is_error:
        assert text.startswith("["), text
        code = text[1:].split("]", 1)[0]
        assert code in DOCUMENTED, text
    else:  # reads may legitimately succeed on garbage that happens to be valid
        assert tool in ("list_market", "check_balance"), (tool, args)
    assert await runtime.db.read(books) == before


async def test_books_and_chain_hold_after_the_barrage(broke_client: Client, runtime: Runtime, backend: str) -> None:
    for nasty in NASTY:
        for tool in TOOLS:
            await broke_client.call_tool(tool, {"listing_id": nasty, "connection": nasty, "purpose": nasty,
                                                "scopes": [nasty], "units": 1, "max_unit_price": 1,
                                                "method": "GET", "url": nasty})
            await broke_client.call_tool(tool, {"connection": "github", "scopes": ["repo:read"], "purpose": nasty,
                                                "method": "GET", "url": DEMO_ISSUER + "provider/github/" + nasty})
    assert await runtime.db.read(check_invariants) == []
    assert (await runtime.db.read(verify_log)).ok


BUY = {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 99}
TOKEN = {"connection": "github", "scopes": ["repo:read"], "purpose": "nul test"}
CALL = {"connection": "github", "scopes": ["repo:read"], "method": "GET",
        "url": DEMO_ISSUER + "provider/github/repos/acme/x", "purpose": "nul test"}
NUL_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "buy idempotency_key": ("buy_quota", {**BUY, "idempotency_key": "k\x00"}),
    "request_token purpose": ("request_token", {**TOKEN, "purpose": "p\x00"}),
    "request_token login_hint": ("request_token", {**TOKEN, "login_hint": "a\x00@example.com"}),
    "call_api purpose": ("call_api", {**CALL, "purpose": "p\x00"}),
    "call_api login_hint": ("call_api", {**CALL, "login_hint": "a\x00@example.com"}),
    "call_api refused, purpose": ("call_api", {**CALL, "url": "https://elsewhere.example/x", "purpose": "p\x00"}),
}
@pytest.mark.parametrize("case", sorted(NUL_CASES))
async def test_nul_in_stored_text_is_kept_or_refused_cleanly(
    client: Client, runtime: Runtime, backend: str, case: str, request: pytest.FixtureRequest
) -> None:
    for listing in ("github-repo-read", "github-repo-read-api"):
        await ok(client, "buy_quota", {**BUY, "listing_id": listing, "units": 3})
    tool, args = NUL_CASES[case]
    result = await client.call_tool(tool, args)
    text = text_of(result)
    if result.is_error:
        assert text.startswith("[") and text[1:].split("]", 1)[0] in DOCUMENTED - {"audit_unavailable"}, text
    assert await runtime.db.read(check_invariants) == []
    assert (await runtime.db.read(verify_log)).ok
    again = await client.call_tool(tool, args)  # a retry answers as the first call did
    assert again.is_error == result.is_error, text_of(again)
    assert await runtime.db.read(check_invariants) == []


@pytest.mark.parametrize("who", [("auth0|al\x00ice", "agent"), ("auth0|alice", "agent\x00x")], ids=["sub", "azp"])
async def test_nul_in_the_callers_names_is_kept_or_refused_cleanly(
    runtime: Runtime, backend: str, who: tuple[str, str], request: pytest.FixtureRequest
) -> None:
    """A token's `sub` or `azp` with NUL in it (the issuer signs what it likes): as for any other name."""
    principal = Principal(*who, frozenset({"read:market", "read:balance", "buy:quota", "request:token"}))

    async def principals(_: object) -> Principal:
        return principal

    async with held(Client(build_mcp(runtime, principals, "stdio"))) as client:
        for tool, args in (("check_balance", {}), ("buy_quota", BUY), ("request_token", TOKEN)):
            result = await client.call_tool(tool, args)
            text = text_of(result)
            if result.is_error:
                assert text.startswith("[") and text[1:].split("]", 1)[0] in DOCUMENTED - {"audit_unavailable"}, text
    assert await runtime.db.read(check_invariants) == []
    assert (await runtime.db.read(verify_log)).ok
