"""`token-vault-mcp serve --transport http|sse` as a real process: demo bearer token, loopback only."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from server.demo import DEMO_ISSUER
from tests.conftest import held, ok
from tests.server.emulator_process import clean_env, emulator_process
from tests.server.test_serve_stdio import server_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("transport", ["http", "sse"])
async def test_demo_server_serves_the_tools_to_a_bearer_from_its_banner(tmp_path: Path, transport: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--transport", transport, "--port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server_env(tmp_path),
        cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        token = None
        seen = []
        while token is None:
            line = proc.stderr.readline().decode()
            assert line, "server exited: " + "".join(seen)
            seen.append(line)
            match = re.search(r"Authorization: Bearer (\S+)", line)
            token = match.group(1) if match else None
        url = f"http://127.0.0.1:{port}" + ("/mcp" if transport == "http" else "/sse")
        headers = {"Authorization": f"Bearer {token}"}
        connect = (
            streamable_http_client(url, http_client=create_mcp_http_client(headers=headers))
            if transport == "http"
            else sse_client(url, headers=headers)
        )
        async with held(Client(connect)) as client:
            wallet = await ok(client, "check_balance", {})
            assert wallet["account"] == "auth0|demo-user"
            assert (await ok(client, "list_market", {"limit": 1}))["listings"]
            # the demo's proxy listing: call_api on the emulator's provider API, the token kept in the broker
            await ok(client, "buy_quota", {"listing_id": "github-repo-read-api", "units": 1, "max_unit_price": 100})
            answer = await ok(client, "call_api", {
                "connection": "github", "scopes": ["repo:read"], "method": "GET", "purpose": "demo",
                "url": DEMO_ISSUER + "provider/github/user"})
            assert answer["status"] == 200 and json.loads(answer["body"])["account"] == "auth0|demo-user"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.stdout is not None and proc.stdout.read() == b""


def test_demo_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--transport", "http", "--host", "0.0.0.0"],
        capture_output=True, env=server_env(tmp_path), cwd=tmp_path, timeout=60,
    )
    assert done.returncode == 2
    assert b"loopback" in done.stderr


EMULATOR_MARKET = """
[[listing]]
id = "github-api"
title = "GitHub API on the emulator"
connection = "github"
scopes = ["repo:read"]
supply = 5
start_price = 10
floor_price = 2
opens_at = 2026-01-01T00:00:00Z
closes_at = 2030-01-01T00:00:00Z
delivery = "proxy"
api = ["{base}/provider/github"]
"""


async def test_call_api_against_a_standalone_emulator_and_its_provider_api(tmp_path: Path) -> None:
    async with emulator_process(tmp_path) as emulator:
        assert "provider API for call_api" in emulator.banner
        (tmp_path / "market.toml").write_text(EMULATOR_MARKET.format(base=emulator.url), encoding="utf-8")
        env = {**clean_env(), **emulator.env, "TVM_DATABASE": str(tmp_path / "v.db"),
               "TVM_MARKET_FILE": str(tmp_path / "market.toml")}
        credit = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "wallet", "credit", "auth0|demo-user", "100", env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert await credit.wait() == 0
        params = StdioServerParameters(command=sys.executable, args=["-m", "server", "serve"], env=env,
                                       cwd=str(tmp_path))
        async with held(Client(params)) as client:
            await ok(client, "buy_quota", {"listing_id": "github-api", "units": 1, "max_unit_price": 100})
            call = {"connection": "github", "scopes": ["repo:read"], "method": "GET", "purpose": "emulator",
                    "url": emulator.url + "/provider/github/repos/acme/x?per_page=1"}
            first = await ok(client, "call_api", call)
            second = await ok(client, "call_api", call)
    seen = json.loads(first["body"])
    assert (seen["connection"], seen["scopes"], seen["path"], seen["query"]) == (
        "github", ["repo:read"], "/repos/acme/x", "per_page=1"
    )
    assert seen["account"] == "auth0|demo-user"
    assert second["grant_id"] == first["grant_id"] and second["units_remaining"] == 0
