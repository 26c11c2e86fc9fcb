"""`token-vault-mcp serve` over a real stdio subprocess: the SDK client end to end, a clean stdout, no leaks."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mcp import Client, StdioServerParameters

from tests.conftest import held, ok
from tests.server.provider_harness import provider_api

ROOT = Path(__file__).resolve().parents[2]


def server_env(tmp_path: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "SYSTEMROOT")}
    return {**keep, "TVM_DATABASE": str(tmp_path / "vault.db"), "PYTHONUNBUFFERED": "1"}


async def test_all_four_tools_over_a_real_stdio_subprocess(tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "server", "serve"], env=server_env(tmp_path), cwd=str(tmp_path)
    )
    async with held(Client(params)) as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == {"list_market", "check_balance", "buy_quota", "request_token", "call_api"}
        market = await ok(client, "list_market", {"connection": "github"})
        listing = market["listings"][0]
        wallet = await ok(client, "check_balance", {})
        assert wallet["balance"] == 10_000
        receipt = await ok(
            client, "buy_quota", {"listing_id": listing["listing_id"], "units": 2, "max_unit_price": 1000}
        )
        assert receipt["units_held"] == 2
        token = await ok(
            client, "request_token", {"connection": "github", "scopes": listing["scopes"], "purpose": "stdio e2e"}
        )
        assert token["units_remaining"] == 1
        assert (await ok(client, "check_balance", {}))["holdings"][0]["units_remaining"] == 1


def rpc(id_: int | None, method: str, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if id_ is not None:
        message["id"] = id_
    if params is not None:
        message["params"] = params
    return (json.dumps(message) + "\n").encode()


def test_stdout_is_only_json_rpc_and_the_token_leaks_nowhere(tmp_path: Path) -> None:
    init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}
    script = b"".join(
        [
            rpc(1, "initialize", init),
            rpc(None, "notifications/initialized"),
            rpc(2, "tools/list"),
            rpc(3, "tools/call", {"name": "buy_quota",
                                  "arguments": {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100}}),
            rpc(4, "tools/call", {"name": "request_token",
                                  "arguments": {"connection": "github", "scopes": ["repo:read"], "purpose": "canary"}}),
            rpc(5, "tools/call", {"name": "buy_quota", "arguments": {"units": "lots"}}),
        ]
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**server_env(tmp_path), "TVM_LOG_LEVEL": "DEBUG"}, cwd=tmp_path,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(script)
    proc.stdin.flush()
    answers: dict[int, Any] = {}
    lines: list[bytes] = []
    while len(answers) < 5:
        line = proc.stdout.readline()
        assert line, f"server closed stdout early; stderr: {proc.stderr.read().decode() if proc.stderr else ''}"
        lines.append(line)
        message = json.loads(line)
        assert message["jsonrpc"] == "2.0"
        if "id" in message:
            answers[message["id"]] = message
    rest, stderr = proc.communicate(timeout=30)  # closes stdin: the server exits
    for line in rest.splitlines():
        assert json.loads(line)["jsonrpc"] == "2.0"
    assert proc.returncode == 0
    token_result = answers[4]["result"]
    assert not token_result.get("isError"), token_result
    token = token_result["structuredContent"]["access_token"]
    assert answers[5]["result"]["isError"] is True
    assert answers[5]["result"]["content"][0]["text"].startswith("[invalid_argument] ")
    text = stderr.decode()
    assert "DEMO MODE" in text
    assert token not in text
    for file in tmp_path.iterdir():
        assert token.encode() not in file.read_bytes(), f"token found in {file.name}"


PROXY_MARKET = """
[[listing]]
id = "github-api"
title = "GitHub API, brokered"
connection = "github"
scopes = ["repo:read"]
supply = 10
start_price = 10
floor_price = 2
opens_at = 2026-01-01T00:00:00Z
closes_at = 2030-01-01T00:00:00Z
delivery = "proxy"
api = ["{base}"]
"""


async def test_call_api_over_real_stdio_keeps_the_token_out_of_results_stderr_and_the_database(
    tmp_path: Path,
) -> None:
    async with provider_api() as provider:
        (tmp_path / "market.toml").write_text(PROXY_MARKET.format(base=provider.base_url), encoding="utf-8")
        errors = tmp_path / "stderr.txt"
        env = {**server_env(tmp_path), "TVM_MARKET_FILE": str(tmp_path / "market.toml"), "TVM_LOG_LEVEL": "DEBUG"}
        params = StdioServerParameters(  # the shell only sends the server's stderr (DEBUG logs) to a file
            command="sh", args=["-c", f'exec "{sys.executable}" -m server serve 2>"{errors}"'], env=env,
            cwd=str(tmp_path),
        )
        results: list[str] = []
        async with held(Client(params)) as client:
            await ok(client, "buy_quota", {"listing_id": "github-api", "units": 2, "max_unit_price": 100})
            for path in ("/echo/repos/a?page=2", "/token-in-body", "/token-in-header"):
                args = {"connection": "github", "scopes": ["repo:read"], "method": "GET", "purpose": "stdio",
                        "url": provider.base_url + path}
                result = await client.call_tool("call_api", args)
                assert not result.is_error, result
                results.append(result.model_dump_json())
            balance = await ok(client, "check_balance", {})
        assert balance["holdings"][0]["units_remaining"] == 1  # three calls, one grant, one unit
        assert len(balance["grants"]) == 1
    tokens = {t for t in provider.tokens if t}
    assert len(tokens) == 1 and len(provider.seen) == 3
    [token] = tokens
    assert token.startswith("gho_")  # the emulator's Token Vault issued it for github
    assert token not in "".join(results)
    assert "[redacted]" in "".join(results)
    text = errors.read_text()
    assert "DEMO MODE" in text and token not in text
    for file in tmp_path.iterdir():
        assert token.encode() not in file.read_bytes(), f"token found in {file.name}"


async def test_a_block_from_the_cli_stops_a_running_stdio_server_within_a_second_and_unblock_restores_it(
    tmp_path: Path,
) -> None:
    env = server_env(tmp_path)
    params = StdioServerParameters(command=sys.executable, args=["-m", "server", "serve"], env=env, cwd=str(tmp_path))

    async def cli(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", *args, env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait()

    async with held(Client(params)) as client:
        await ok(client, "check_balance", {})
        assert await cli("agent", "block", "token-vault-mcp-demo", "--reason", "incident 42") == 0
        blocked_at = time.monotonic()
        while not (refusal := await client.call_tool("check_balance", {})).is_error:
            assert time.monotonic() - blocked_at < 1.0, "the block was not in force within a second"
        assert time.monotonic() - blocked_at < 1.0
        assert refusal.content[0].text == (  # type: ignore[union-attr]
            "[agent_blocked] the operator blocked agent token-vault-mcp-demo: incident 42"
        )
        assert await cli("agent", "unblock", "token-vault-mcp-demo") == 0
        unblocked_at = time.monotonic()  # in force everywhere within a second too (a process's copy lasts 0.25 s)
        while (await client.call_tool("check_balance", {})).is_error:
            assert time.monotonic() - unblocked_at < 1.0, "the unblock was not in force within a second"
        await ok(client, "check_balance", {})
