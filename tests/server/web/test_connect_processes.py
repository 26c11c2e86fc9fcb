"""The connect flow across real processes (SPEC §10): a stdio server's on-demand loopback listener, the
`connect` command, and two HTTP replicas sharing TVM_STATE_KEYS and one database (one starts, the other
finishes). The tenant is `token-vault-mcp emulator --auto-login` on loopback; the browser is httpx."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from server.broker import Broker
from server.emulator.demo import DEMO_ACCOUNT
from server.store import open_database
from tests.conftest import ok, refused
from tests.server.emulator_process import Emulator, clean_env, emulator_process
from tests.server.web.connect_harness import ASK, LISTING, link_in

MARKET = """[[listing]]
id = "{id}"
title = "{title}"
connection = "{connection}"
scopes = ["{scope}"]
supply = 100
start_price = 10
floor_price = 5
opens_at = 2026-01-01T00:00:00Z
closes_at = 2030-01-01T00:00:00Z
""".format(scope=LISTING["scopes"][0], **LISTING)  # type: ignore[index]
KEYS = ",".join(base64.b64encode(os.urandom(32)).decode() for _ in range(2))
_TICKET = re.compile(r'name="ticket" value="([^"]+)"')


@pytest.fixture
async def tenant(tmp_path: Path) -> AsyncIterator[Emulator]:
    async with emulator_process(tmp_path, "--auto-login", DEMO_ACCOUNT) as emulator:
        yield emulator


def broker_env(tenant: Emulator, tmp_path: Path, **extra: str) -> dict[str, str]:
    (tmp_path / "market.toml").write_text(MARKET)
    return {
        **clean_env(), **tenant.env, "TVM_DATABASE": str(tmp_path / "vault.db"),
        "TVM_MARKET_FILE": str(tmp_path / "market.toml"), "TVM_STATE_KEYS": KEYS, **extra,
    }


async def fund(database: Path) -> None:
    db = await open_database(str(database))
    try:
        await Broker(db).credit(DEMO_ACCOUNT, 100)
    finally:
        await db.close()


async def walk(url: str, **kw: Any) -> httpx.Response:
    """A browser through the whole flow, over real sockets: the broker's pages and the emulator's."""
    async with httpx.AsyncClient(follow_redirects=True, timeout=10, **kw) as browser:
        page = await browser.get(url)
        found = _TICKET.search(page.text)
        assert found is not None, page.text
        return await browser.post(str(page.url.copy_with(query=None)), data={"ticket": found.group(1),
                                                                           "decision": "approve"})


def refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_a_stdio_server_opens_a_loopback_listener_for_the_flow_and_closes_it_after(
    tenant: Emulator, tmp_path: Path
) -> None:
    env = broker_env(tenant, tmp_path)
    params = StdioServerParameters(command=sys.executable, args=["-m", "server", "serve"], env=env, cwd=str(tmp_path))
    async with Client(params) as client:
        await fund(tmp_path / "vault.db")
        await ok(client, "buy_quota", {"listing_id": "slack-read", "units": 2, "max_unit_price": 10})
        text = await refused(client, "request_token", ASK)
        url = link_in(text)
        port = int(url.split(":")[2].split("/")[0])
        assert url.startswith("http://127.0.0.1:") and not refuses_connections(port)
        page = await walk(url)
        assert page.status_code == 200 and "Connected" in page.text
        deadline = time.monotonic() + 10
        while not refuses_connections(port):
            assert time.monotonic() < deadline, "the loopback listener stayed open after the flow"
            await asyncio.sleep(0.05)
        token = await ok(client, "request_token", ASK)
        assert token["units_remaining"] == 1  # two bought; the refused call spent nothing


async def test_the_connect_command_prints_the_link_and_exits_0_once_connected(
    tenant: Emulator, tmp_path: Path
) -> None:
    env = broker_env(tenant, tmp_path)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "connect", "slack", "--scopes", "channels:read",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )
    assert process.stdout is not None
    printed = ""
    while "/connect/" not in printed:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        assert line, f"connect exited early: {printed}"
        printed += line.decode()
    page = await walk(link_in(printed))
    assert page.status_code == 200 and "Connected" in page.text
    assert await asyncio.wait_for(process.wait(), timeout=20) == 0
    rest = (await process.stdout.read()).decode()
    assert "connected" in rest


async def start_http(env: dict[str, str], cwd: Path, port: int) -> asyncio.subprocess.Process:
    """`serve --transport http` on `port`, once it answers /healthz."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "serve", "--transport", "http", "--port", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env, cwd=cwd,
    )
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient() as http:
        while True:
            try:
                if (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return process
            except httpx.TransportError:
                pass
            assert process.returncode is None and time.monotonic() < deadline, "the replica did not start"
            await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_two_replicas_sharing_keys_and_a_database_one_starts_the_flow_the_other_finishes_it(
    tenant: Emulator, tmp_path: Path
) -> None:
    async with httpx.AsyncClient() as admin:
        minted = await admin.post(tenant.url + "/emulator/tokens", json={
            "sub": DEMO_ACCOUNT, "scopes": ["read:balance", "buy:quota", "request:token"], "azp": "agent-1",
        })
        token = minted.json()["access_token"]
    port_a, port_b = _free_port(), _free_port()
    base_a = f"http://127.0.0.1:{port_a}"
    env = broker_env(tenant, tmp_path, TVM_PUBLIC_URL=f"http://127.0.0.1:{port_b}")  # the "load balancer": B
    await fund(tmp_path / "vault.db")
    a = await start_http(env, tmp_path, port_a)
    b: asyncio.subprocess.Process | None = None
    try:
        b = await start_http(env, tmp_path, port_b)
        headers = {"Authorization": f"Bearer {token}"}
        transport = streamable_http_client(base_a + "/mcp", http_client=create_mcp_http_client(headers=headers))
        async with Client(transport) as client:
            await ok(client, "buy_quota", {"listing_id": "slack-read", "units": 2, "max_unit_price": 10})
            url = link_in(await refused(client, "request_token", ASK))
            assert url.startswith(f"http://127.0.0.1:{port_b}/connect/")
            on_a = url.replace(f"127.0.0.1:{port_b}", base_a.removeprefix("http://"))  # A opens the link …
            seen: list[str] = []

            async def note(request: httpx.Request) -> None:
                seen.append(f"{request.url.host}:{request.url.port}{request.url.path}")

            page = await walk(on_a, event_hooks={"request": [note]})
            assert page.status_code == 200 and "Connected" in page.text
            assert f"127.0.0.1:{port_a}/connect/{url.rsplit('/', 1)[1]}" in seen
            assert f"127.0.0.1:{port_b}/connect/callback" in seen and f"127.0.0.1:{port_b}/connect/complete" in seen
            assert (await ok(client, "request_token", ASK))["units_remaining"] == 1  # … B finished it
    finally:
        for process in (a, b):
            if process is not None and process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), timeout=10)


async def test_headless_chromium_walks_the_flow_and_the_next_request_token_succeeds(
    tenant: Emulator, tmp_path: Path, browser: Any
) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "server", "serve"], env=broker_env(tenant, tmp_path), cwd=str(tmp_path)
    )
    async with Client(params) as client:
        await fund(tmp_path / "vault.db")
        await ok(client, "buy_quota", {"listing_id": "slack-read", "units": 2, "max_unit_price": 10})
        url = link_in(await refused(client, "request_token", ASK))
        context = await browser.new_context()
        try:
            page = await context.new_page()
            await page.goto(url)  # → Auth0 sign-in (auto) → callback → the provider's consent page
            await page.get_by_role("button", name="Allow").click()
            await page.wait_for_selector("main.ok h1")
            assert await page.inner_text("h1") == "Connected"
            assert "go back to your agent" in (await page.inner_text("#message")).lower()
        finally:
            await context.close()
        assert (await ok(client, "request_token", ASK))["units_remaining"] == 1
