"""TVM_METRICS_PORT: Prometheus text at /metrics on loopback, counting exactly what happened, never who."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import Runtime, open_runtime
from server.clock import ManualClock
from server.config import load_config
from server.demo import DEMO_ISSUER
from server.emulator.demo import DEMO_ACCOUNT
from server.errors import AuditUnavailable, ConfigError, PolicyDenied, RateLimited, Unauthenticated
from server.metrics import Metrics
from server.web.remote import build_remote_app, remote_settings
from tests.conftest import demo_client, demo_runtime, ok, refused
from tests.server.test_serve_stdio import rpc, server_env

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
TOKEN_ASK = {"connection": "github", "scopes": ["repo:read"], "purpose": "metrics"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def scrape(port: int) -> str:
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return answer.text


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every series that changed, by how much (timestamps of `_created` series left out)."""
    keys = set(before) | set(after)
    return {
        k: after.get(k, 0.0) - before.get(k, 0.0)
        for k in keys
        if not k[0].endswith("_created") and after.get(k, 0.0) != before.get(k, 0.0)
    }


def label_values(text: str) -> Iterator[str]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield from s.labels.values()


@pytest.fixture
async def metered(db_path: Path, clock: ManualClock) -> AsyncIterator[Runtime]:
    async with demo_runtime(db_path, clock, TVM_METRICS_PORT=str(free_port())) as rt:
        yield rt


async def test_tool_calls_refusals_auth0_requests_reuse_and_commits_are_counted_exactly(
    metered: Runtime, batch_sizes: list[int]
) -> None:
    rt, port = metered, metered.config.metrics_port
    assert port is not None and rt.tenant is not None and rt.metrics is not None and rt.metrics.port == port
    async with demo_client(rt) as client:
        before, batches = samples(await scrape(port)), len(batch_sizes)
        await ok(client, "list_market", {})
        await ok(client, "check_balance", {})
        await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 2, "max_unit_price": 1000})
        first = await ok(client, "request_token", TOKEN_ASK)
        again = await ok(client, "request_token", TOKEN_ASK)  # the same ask within a minute: reused
        assert again["access_token"] == first["access_token"]
        assert (await refused(client, "buy_quota", {"listing_id": "nope", "units": 1, "max_unit_price": 1})
                ).startswith("[unknown_listing]")
        assert (await refused(client, "buy_quota", {"units": "lots"})).startswith("[invalid_argument]")
        agent = (await rt.identity.principal()).agent
        assert agent
        await rt.broker.block_agent(agent, "metrics test", by="cli:ops")
        assert (await refused(client, "check_balance", {})).startswith("[agent_blocked]")
        text = await scrape(port)
    after, jobs = samples(text), batch_sizes[batches:]

    calls = {k: v for k, v in moved(before, after).items() if k[0] == "tvm_tool_calls_total"}
    assert calls == {
        ("tvm_tool_calls_total", frozenset({"tool": t, "outcome": o, "code": c}.items())): n
        for t, o, c, n in (
            ("list_market", "ok", "", 1), ("check_balance", "ok", "", 1), ("buy_quota", "ok", "", 1),
            ("request_token", "ok", "", 2), ("buy_quota", "denied", "unknown_listing", 1),
            ("buy_quota", "denied", "invalid_argument", 1), ("check_balance", "denied", "agent_blocked", 1),
        )
    }
    for tool, n in (("list_market", 1), ("check_balance", 2), ("buy_quota", 3), ("request_token", 2)):
        assert value(after, "tvm_tool_call_seconds_count", tool=tool) - value(
            before, "tvm_tool_call_seconds_count", tool=tool) == n
    refusals = {dict(k[1])["kind"]: v for k, v in moved(before, after).items() if k[0] == "tvm_refusals_total"}
    assert refusals == {"unknown_listing": 1, "invalid_argument": 1, "agent_blocked": 1}
    assert value(after, "tvm_vault_reuse_total", result="miss") - value(before, "tvm_vault_reuse_total",
                                                                        result="miss") == 1
    assert value(after, "tvm_vault_reuse_total", result="hit") - value(before, "tvm_vault_reuse_total",
                                                                       result="hit") == 1
    # Auth0: the stdio login's refresh, its access token's keys, one Token Vault exchange
    exchanges = rt.tenant.state.vault_issues
    assert len(exchanges) == 1
    assert value(after, "tvm_auth0_requests_total", endpoint="/oauth/token", grant_type="token_vault",
                 status="200") == 1
    assert value(after, "tvm_auth0_requests_total", endpoint="/oauth/token", grant_type="refresh_token",
                 status="200") >= 1
    assert value(after, "tvm_auth0_requests_total", endpoint="/.well-known/jwks.json", grant_type="",
                 status="200") >= 1
    assert value(after, "tvm_auth0_request_seconds_count", endpoint="/oauth/token", grant_type="token_vault") == 1
    # every transaction the store ran between the scrapes, with its number of jobs
    assert jobs and value(after, "tvm_commit_batch_size_count") - value(before, "tvm_commit_batch_size_count") == len(
        jobs)
    assert value(after, "tvm_commit_batch_size_sum") - value(before, "tvm_commit_batch_size_sum") == sum(jobs)
    assert value(after, "tvm_pending_approvals") == 0 and value(after, "tvm_grant_tokens") == 0

    # never who: no account, agent, token or secret anywhere in the scrape, labels first of all
    secrets = [i.access_token for i in exchanges] + [rt.tenant.refresh_token, rt.tenant.client_secret]
    for label in label_values(text):
        assert DEMO_ACCOUNT not in label and agent not in label
    for secret in [DEMO_ACCOUNT, agent, *secrets]:
        assert secret not in text


async def test_a_grant_token_held_and_a_remote_authentication_refusal_are_counted(metered: Runtime) -> None:
    rt, port = metered, metered.config.metrics_port
    assert port is not None
    async with demo_client(rt) as client:
        await ok(client, "buy_quota", {"listing_id": "github-repo-read-api", "units": 1, "max_unit_price": 1000})
        before = samples(await scrape(port))
        await ok(client, "call_api", {**TOKEN_ASK, "method": "GET", "url": DEMO_ISSUER + "provider/github/user"})
        after = samples(await scrape(port))
    assert value(after, "tvm_grant_tokens") == 1
    assert value(after, "tvm_tool_calls_total", tool="call_api", outcome="ok", code="") == 1
    assert value(after, "tvm_vault_reuse_total", result="miss") - value(before, "tvm_vault_reuse_total",
                                                                        result="miss") == 1

    app = build_remote_app(rt, remote_settings(rt.config, "http", "127.0.0.1", 8000))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as http:
        for _ in range(2):  # two refusals: both counted, though their audit events are folded into one
            assert (await http.post("/mcp", json={})).status_code == 401
    assert value(samples(await scrape(port)), "tvm_refusals_total", kind="unauthenticated") == 2


async def test_pending_approvals_rise_while_an_owner_is_asked_and_fall_when_answered() -> None:
    metrics = Metrics(["request_token"])
    metrics.serve(free_port())
    port = metrics.port
    assert port is not None
    asked, answer = asyncio.Event(), asyncio.Event()

    async def approver(**_: object) -> None:
        asked.set()
        await answer.wait()

    try:
        waiting = asyncio.create_task(metrics.approvals(approver)(account="a", agent="b"))
        await asked.wait()
        assert value(samples(await scrape(port)), "tvm_pending_approvals") == 1
        answer.set()
        await waiting
        assert value(samples(await scrape(port)), "tvm_pending_approvals") == 0
    finally:
        await metrics.aclose()


async def test_only_metrics_on_loopback_with_a_loopback_host() -> None:
    metrics = Metrics(["list_market"])
    metrics.serve(free_port())
    port = metrics.port
    assert port is not None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/metrics", headers={"Host": f"localhost:{port}"})).status_code == 200
            assert (await http.get("/")).status_code == 404
            assert (await http.get("/metrics", headers={"Host": f"evil.example:{port}"})).status_code == 421
        assert metrics._server is not None and metrics._server.server_address[0] == "127.0.0.1"
        metrics.refused(RateLimited("slow down", 1))
        metrics.refused(PolicyDenied("no"))
        metrics.call_done("list_market", Unauthenticated("who?"), 0.001)  # a tool's refusal is one too
        metrics.call_done("list_market", AuditUnavailable("down"), 0.001)  # a failure is not
        metrics.call_done("not_a_tool", None, 0.001)  # outside the vocabulary: "other", never the value
        found = samples(await scrape(port))
        assert {dict(k[1])["kind"]: v for k, v in found.items() if k[0] == "tvm_refusals_total"} == {
            "rate_limited": 1, "policy_denied": 1, "unauthenticated": 1,
        }
        assert value(found, "tvm_tool_calls_total", tool="list_market", outcome="error", code="audit_unavailable") == 1
        assert value(found, "tvm_tool_calls_total", tool="other", outcome="ok", code="") == 1
    finally:
        await metrics.aclose()
    with pytest.raises(httpx.ConnectError):
        await scrape(port)


async def test_a_taken_port_stops_the_start_with_one_line_naming_the_variable(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config({"TVM_DATABASE": str(tmp_path / "v.db"), "TVM_METRICS_PORT": str(port)}, dotenv=False)
        with pytest.raises(ConfigError) as stopped:
            await open_runtime(config)
    assert "TVM_METRICS_PORT" in str(stopped.value) and "\n" not in str(stopped.value)


def test_stdio_keeps_stdout_pure_json_rpc_while_metrics_answer(tmp_path: Path) -> None:
    port = free_port()
    init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**server_env(tmp_path), "TVM_METRICS_PORT": str(port), "TVM_LOG_LEVEL": "DEBUG"},
        cwd=tmp_path,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(rpc(1, "initialize", init) + rpc(None, "notifications/initialized") + rpc(
            2, "tools/call", {"name": "buy_quota",
                              "arguments": {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100}}))
        proc.stdin.flush()
        answers = {}
        while len(answers) < 2:
            line = proc.stdout.readline()
            assert line, "the server closed stdout early"
            message = json.loads(line)
            assert message["jsonrpc"] == "2.0"
            if "id" in message:
                answers[message["id"]] = message
        assert not answers[2]["result"].get("isError"), answers[2]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text  # the server is still up: it answered
        assert value(samples(text), "tvm_tool_calls_total", tool="buy_quota", outcome="ok", code="") == 1
        rest, _ = proc.communicate(timeout=30)  # closes stdin: the server exits
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    for line in rest.splitlines():
        assert json.loads(line)["jsonrpc"] == "2.0"
    assert DEMO_ACCOUNT not in "".join(label_values(text))


async def test_remote_mode_refuses_a_metrics_port_equal_to_its_own(tmp_path: Path) -> None:
    from server.serve import serve_remote

    config = load_config({"TVM_DATABASE": str(tmp_path / "v.db"), "TVM_METRICS_PORT": "8000"}, dotenv=False)
    with pytest.raises(ConfigError, match="TVM_METRICS_PORT"):
        await serve_remote(config, "http", "127.0.0.1", 8000)
    assert not (tmp_path / "v.db").exists()  # refused before anything opened


@pytest.mark.both_backends
async def test_round_trips_to_the_database_are_counted_and_sqlite_makes_none(
    database: str, backend: str, clock: ManualClock
) -> None:
    async with demo_runtime(database, clock, TVM_METRICS_PORT=str(free_port())) as rt, demo_client(rt) as client:
        assert rt.metrics is not None and rt.metrics.port is not None
        await ok(client, "check_balance", {})  # (its audit names are written by the first call)
        before = samples(await scrape(rt.metrics.port))
        for _ in range(3):
            await ok(client, "check_balance", {})
        after = samples(await scrape(rt.metrics.port))
    trips = value(after, "tvm_db_round_trips_total") - value(before, "tvm_db_round_trips_total")
    if backend == "sqlite":
        assert trips == 0
    else:  # two a call (tests/server/store/test_postgres.py counts them exactly), and what housekeeping made
        assert 6 <= trips < 30
