"""request_token through the SDK client against the emulated tenant: reserve, exchange, commit or refund."""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client

from server import audit
from server.app import Runtime
from server.auth0.client import TOKEN_VAULT_GRANT
from server.invariants import check_invariants
from server.store import AuditFilter
from tests.conftest import ok, refused, side

pytestmark = pytest.mark.both_backends

ASK = {"connection": "github", "scopes": ["repo:read"], "purpose": "list open pull requests"}


def tenant(runtime: Runtime) -> Any:
    assert runtime.tenant is not None
    return runtime.tenant


async def units(client: Client) -> dict[str, int]:
    holdings = (await ok(client, "check_balance", {}))["holdings"]
    return {h["listing_id"]: h["units_remaining"] for h in holdings}


async def events(runtime: Runtime, **where: Any) -> list[dict[str, Any]]:
    records = await runtime.db.read(lambda tx: tx.find_audit(AuditFilter(**where)))
    return [audit.export_line(r) for r in records]


def exchanges(runtime: Runtime) -> list[Any]:
    return [r for r in tenant(runtime).state.requests if r.grant_type == TOKEN_VAULT_GRANT]


async def test_token_is_issued_for_covered_scopes_and_one_unit_is_spent(client: Client, runtime: Runtime) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 2, "max_unit_price": 100})
    token = await ok(client, "request_token", ASK)
    assert token["access_token"]
    assert token["token_type"] == "Bearer"
    assert token["connection"] == "github"
    assert token["scopes"] == ["repo:read"]
    assert 0 < token["expires_in"] <= 3600
    assert token["units_remaining"] == 1
    assert token["token_id"] == audit.token_fingerprint(runtime.db.hmac_key, token["access_token"]).hex()
    assert await units(client) == {"github-repo-read": 1}
    [sent] = exchanges(runtime)
    assert sent.fields["scope"] == "repo:read"
    assert sent.fields["connection"] == "github"
    assert sent.fields["subject_token_type"] == "urn:ietf:params:oauth:token-type:refresh_token"
    assert sent.fields["requested_token_type"] == "http://auth0.com/oauth/token-type/federated-connection-access-token"
    [event] = await events(runtime, tool="request_token")
    assert event["outcome"] == "ok" and event["code"] is None
    assert event["token_id"] == token["token_id"]
    assert event["args"]["purpose"] == "list open pull requests"
    assert event["scope"] == "request:token"
    assert await runtime.db.read(check_invariants) == []


async def test_least_privileged_holding_is_spent_first(client: Client) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-write", "units": 1, "max_unit_price": 100})
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
    await ok(client, "request_token", ASK)
    assert await units(client) == {"github-repo-write": 1, "github-repo-read": 0}
    await ok(client, "request_token", ASK)  # only the broader holding covers it now
    assert await units(client) == {"github-repo-write": 0, "github-repo-read": 0}
    assert (await refused(client, "request_token", ASK)).startswith("[no_quota] ")


async def test_no_quota_and_scope_not_covered(client: Client, runtime: Runtime) -> None:
    assert (await refused(client, "request_token", ASK)).startswith("[no_quota] ")
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
    text = await refused(client, "request_token", {**ASK, "scopes": ["repo:read", "admin:org"]})
    assert text.startswith("[scope_not_covered] ")
    assert "admin:org" in text
    assert exchanges(runtime) == []
    assert await units(client) == {"github-repo-read": 1}


async def refund_case(client: Client, runtime: Runtime, code: str, args: dict[str, Any] = ASK) -> str:
    before = await units(client)
    text = await refused(client, "request_token", args)
    assert text.startswith(f"[{code}] "), text
    assert await units(client) == before
    failed = [e for e in await events(runtime, tool="request_token") if e["code"] == code]
    assert failed and failed[-1]["outcome"] in ("denied", "error") and failed[-1]["token_id"] is None
    assert await runtime.db.read(check_invariants) == []
    return text


async def test_revoked_connection_is_account_not_connected_and_refunded(client: Client, runtime: Runtime) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
    tenant(runtime).state.revoke_connection(tenant(runtime).account, "github")
    text = await refund_case(client, runtime, "account_not_connected")
    assert "reconnect github" in text


async def test_provider_refusing_the_scopes_is_vault_denied_and_refunded(client: Client, runtime: Runtime) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-write", "units": 1, "max_unit_price": 100})
    tenant(runtime).state.connect_account(tenant(runtime).account, "github", ["repo:read"])
    await refund_case(client, runtime, "vault_denied", {**ASK, "scopes": ["repo:write"]})


async def test_auth0_outage_is_vault_unavailable_and_refunded(client: Client, runtime: Runtime) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
    tenant(runtime).state.faults.fail_next(503, count=20)
    await refund_case(client, runtime, "vault_unavailable")
    tenant(runtime).state.faults.clear()
    assert (await ok(client, "request_token", ASK))["units_remaining"] == 0


async def test_auth0_rate_limit_says_how_long_to_wait_and_refunds(client: Client, runtime: Runtime) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
    tenant(runtime).state.faults.rate_limit_next(count=20, retry_after=7, reset_in=7)
    text = await refund_case(client, runtime, "rate_limited")
    assert "7 seconds" in text


async def test_grant_broader_than_asked_is_returned_and_flagged(client: Client, runtime: Runtime) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 2, "max_unit_price": 100})
    tenant(runtime).state.overgrant = True
    token = await ok(client, "request_token", ASK)
    assert set(token["scopes"]) > {"repo:read"}
    [event] = await events(runtime, tool="request_token")
    assert event["args"]["flags"] == ["scope_overgrant"]


async def test_answer_without_scope_is_taken_as_requested_and_flagged(client: Client, runtime: Runtime) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
    tenant(runtime).state.omit_scope_in_exchange = True
    token = await ok(client, "request_token", ASK)
    assert token["scopes"] == ["repo:read"]
    [event] = await events(runtime, tool="request_token")
    assert event["args"]["flags"] == ["scope_unconfirmed"]


async def test_fresh_answer_is_reused_but_every_call_spends_and_is_audited(client: Client, runtime: Runtime) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 3, "max_unit_price": 100})
    first = await ok(client, "request_token", ASK)
    second = await ok(client, "request_token", {**ASK, "scopes": '["repo:read"]'})  # JSON-string list form
    assert second["access_token"] == first["access_token"]
    assert second["units_remaining"] == 1
    assert len(exchanges(runtime)) == 1
    assert [e["token_id"] for e in await events(runtime, tool="request_token")] == [first["token_id"]] * 2
    await ok(client, "request_token", {**ASK, "login_hint": "octocat@example.com"})  # another ask: new exchange
    assert len(exchanges(runtime)) == 2


async def test_bad_arguments_are_invalid_argument(client: Client) -> None:
    for args in (
        {**ASK, "scopes": []},
        {**ASK, "scopes": [f"s{i}" for i in range(21)]},
        {**ASK, "scopes": ["has space"]},
        {**ASK, "purpose": ""},
        {**ASK, "purpose": "x" * 501},
        {"connection": "github", "scopes": ["repo:read"]},
        {**ASK, "connection": ""},
        {**ASK, "subject_token": "smuggled"},
    ):
        assert (await refused(client, "request_token", args)).startswith("[invalid_argument] "), args


def audit_down(database: str) -> None:
    """Make every audit insert fail, behind the broker's back (the disk is full, say)."""
    with side(database) as other:
        if other.postgres:
            other.execute("CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$BEGIN RAISE EXCEPTION 'disk full'; END$$")
            other.execute("CREATE TRIGGER audit_down BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION disk_full()")
        else:
            other.execute("CREATE TRIGGER audit_down BEFORE INSERT ON audit "
                          "BEGIN SELECT RAISE(ABORT, 'disk full'); END")


def audit_up(database: str) -> None:
    with side(database) as other:
        other.execute("DROP TRIGGER audit_down" + (" ON audit" if other.postgres else ""))
        if other.postgres:
            other.execute("DROP FUNCTION disk_full()")


async def test_fail_closed_when_the_audit_log_cannot_be_written(
    client: Client, runtime: Runtime, database: str
) -> None:
    receipt = await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
    before_events = len(await events(runtime))
    audit_down(database)
    result = await client.call_tool("request_token", ASK)
    assert result.is_error
    assert "".join(getattr(b, "text", "") for b in result.content).startswith("[audit_unavailable] ")
    assert result.structured_content is None
    assert len(exchanges(runtime)) == 1  # the exchange happened, but its token was withheld
    bought = await client.call_tool("buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
    assert bought.is_error  # no debit without its event either
    audit_up(database)
    assert len(await events(runtime)) == before_events
    assert await units(client) == {"github-repo-read": 1}
    assert (await ok(client, "check_balance", {}))["balance"] == receipt["balance_after"]
    assert await runtime.db.read(check_invariants) == []


async def test_a_reused_answer_spends_its_unit_in_one_transaction(client: Client, runtime: Runtime) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 2, "max_unit_price": 100})
    first = await ok(client, "request_token", ASK)
    writes: list[object] = []
    real_write = runtime.db.write

    async def counted(job: Any) -> Any:
        writes.append(job)
        return await real_write(job)

    runtime.db.write = counted  # type: ignore[method-assign]
    try:
        second = await ok(client, "request_token", ASK)
    finally:
        runtime.db.write = real_write  # type: ignore[method-assign]
    assert second["access_token"] == first["access_token"] and second["units_remaining"] == 0
    assert len(writes) == 1  # reserve and commit together: one durable commit, not two
    [_, reused] = await events(runtime, tool="request_token")
    assert reused["outcome"] == "ok" and reused["token_id"] == second["token_id"]
    assert reused["args"]["reservation_id"].startswith("res_")
    assert await runtime.db.read(lambda tx: tx.pending_reservations()) == []
    assert await runtime.db.read(check_invariants) == []
    # with the holding empty, the reusable answer is still not handed out
    assert (await refused(client, "request_token", ASK)).startswith("[no_quota] ")
    assert len(exchanges(runtime)) == 1
    assert await runtime.db.read(check_invariants) == []


async def test_a_reused_answer_is_withheld_when_its_event_cannot_be_written(
    client: Client, runtime: Runtime, database: str
) -> None:
    await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 2, "max_unit_price": 100})
    await ok(client, "request_token", ASK)
    audit_down(database)
    result = await client.call_tool("request_token", ASK)
    assert result.is_error and result.structured_content is None
    assert "".join(getattr(b, "text", "") for b in result.content).startswith("[audit_unavailable] ")
    audit_up(database)
    assert await units(client) == {"github-repo-read": 1}  # the unit was not spent
    assert await runtime.db.read(check_invariants) == []
