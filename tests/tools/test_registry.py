"""What every tool shares: authentication, the scope check, error rendering, and an event per call."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from server import audit
from server.app import build_mcp, open_runtime
from server.clock import ManualClock
from server.config import load_config
from server.principal import Principal
from server.store import AuditFilter
from tests.conftest import DEMO_NOW, demo_client, held, refused
from tools import ALL_TOOLS

pytestmark = pytest.mark.both_backends

ARGS: dict[str, dict[str, Any]] = {
    "list_market": {},
    "check_balance": {},
    "buy_quota": {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100},
    "request_token": {"connection": "github", "scopes": ["repo:read"], "purpose": "p"},
    "call_api": {"connection": "github", "scopes": ["repo:read"], "method": "GET", "purpose": "p",
                 "url": "https://demo-tenant.token-vault-mcp.invalid/provider/github/user"},
}


def test_every_tool_declares_scope_annotations_and_schemas() -> None:
    assert {t.name: t.scope for t in ALL_TOOLS} == {
        "list_market": "read:market",
        "check_balance": "read:balance",
        "buy_quota": "buy:quota",
        "request_token": "request:token",
        "call_api": "call:api",
    }
    for spec in ALL_TOOLS:
        schema = spec.input_model.model_json_schema()
        for name, field in schema.get("properties", {}).items():
            assert field.get("description"), f"{spec.name}.{name} has no description"
        for name, field in spec.output_model.model_fields.items():
            assert field.description, f"{spec.name} output {name} has no description"


async def test_tools_list_publishes_output_schemas_and_annotations(client: Client) -> None:
    listed = {t.name: t for t in (await client.list_tools()).tools}
    assert set(listed) == set(ARGS)
    for tool in listed.values():
        assert tool.output_schema and tool.output_schema["type"] == "object"
        assert tool.input_schema["type"] == "object"
        assert tool.annotations is not None and tool.annotations.open_world_hint is not None
    assert listed["list_market"].annotations.read_only_hint is True
    assert listed["buy_quota"].annotations.idempotent_hint is True
    assert listed["request_token"].annotations.open_world_hint is True
    assert listed["request_token"].annotations.destructive_hint is False
    call_api = listed["call_api"].annotations
    assert (call_api.read_only_hint, call_api.destructive_hint, call_api.open_world_hint) == (False, True, True)


async def test_missing_scope_is_refused_naming_it_and_audited(runtime: Any) -> None:
    narrow = Principal(account="auth0|narrow", agent="agent-x", scopes=frozenset({"read:market", "read:balance"}))

    async def principals(_: object) -> Principal:
        return narrow

    async with held(Client(build_mcp(runtime, principals, "stdio"))) as client:
        text = await refused(client, "buy_quota", ARGS["buy_quota"])
        assert text == (
            "[insufficient_scope] buy_quota needs scope buy:quota; the token grants read:balance read:market"
        )
        assert (await refused(client, "request_token", ARGS["request_token"])).startswith("[insufficient_scope] ")
    records = await runtime.db.read(lambda tx: tx.find_audit(AuditFilter(account="auth0|narrow")))
    assert [(r.tool, r.outcome, r.code, r.agent, r.scope) for r in records] == [
        ("buy_quota", "denied", "insufficient_scope", "agent-x", "buy:quota"),
        ("request_token", "denied", "insufficient_scope", "agent-x", "request:token"),
    ]


async def test_a_refused_login_is_unauthenticated_for_every_tool(tmp_path: Path) -> None:
    config = load_config(
        {"TVM_DATABASE": str(tmp_path / "v.db"), "TVM_REFRESH_TOKEN": "not-a-real-refresh-token"}, dotenv=False
    )
    runtime = await open_runtime(config, clock=ManualClock(DEMO_NOW))
    try:
        async with demo_client(runtime) as client:
            for tool, args in ARGS.items():
                text = await refused(client, tool, args)
                assert text.startswith("[unauthenticated] "), text
                assert "not-a-real-refresh-token" not in text
        records = await runtime.db.read(lambda tx: tx.find_audit(AuditFilter(outcome="denied")))
        assert {(r.tool, r.code, r.account) for r in records} == {
            (tool, "unauthenticated", None) for tool in ARGS
        }
    finally:
        await runtime.aclose()


async def test_unexpected_failure_is_internal_without_details(
    client: Client, runtime: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret-detail-do-not-leak /etc/passwd")

    monkeypatch.setattr(runtime.broker, "check_balance", explode)
    text = await refused(client, "check_balance", {})
    assert text.startswith("[internal] ")
    assert "secret-detail" not in text and "Traceback" not in text
    logged = [r for r in caplog.records if "unexpectedly" in r.getMessage()]
    assert logged and "RuntimeError at test_registry.py:" in logged[0].getMessage()
    assert all(r.exc_info is None and "secret-detail" not in r.getMessage() for r in caplog.records)


async def test_every_call_is_chained_into_the_audit_log(client: Client, runtime: Any) -> None:
    for tool, args in ARGS.items():
        await client.call_tool(tool, args)
    records = await runtime.db.read(lambda tx: list(tx.iter_audit()))
    assert [r.tool for r in records][-len(ARGS):] == list(ARGS)
    assert (await runtime.db.read(audit.verify_log)).ok
    for rec in records[-len(ARGS):]:
        assert rec.latency_ms is not None and rec.latency_ms >= 0
        assert rec.transport == "stdio"


@pytest.mark.sqlite_only  # SQLite's writer runs a lone call inline, on the loop
async def test_one_call_at_a_time_commits_inline_and_concurrent_calls_share_commits(
    client: Client, runtime: Any, batch_sizes: list[int]
) -> None:
    runtime.db._writer = None
    for _ in range(3):
        assert not (await client.call_tool("check_balance", {})).is_error
    assert batch_sizes == [1, 1, 1] and runtime.db._writer is None  # inline: no writer task was needed
    batch_sizes.clear()
    results = await asyncio.gather(*(client.call_tool("check_balance", {}) for _ in range(12)))
    assert not any(r.is_error for r in results)
    assert sum(batch_sizes) == 12 and max(batch_sizes) > 1  # calls arriving together still share a group commit
    events = await runtime.db.read(lambda tx: tx.find_audit(AuditFilter(tool="check_balance"), limit=100))
    assert len(events) == 15
