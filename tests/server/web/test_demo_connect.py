"""The demo's connect flow in a real browser with no tenant (SPEC §10, README): the demo tenant's sign-in and
consent pages are served on the broker's own origin under /demo-tenant/, so headless Chromium walks the
whole flow against a real `serve --transport http` process and a real `connect slack` command in demo mode
(no AUTH0_DOMAIN), by clicking on the pages as a person would (no auto-login)."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from server.demo import DEMO_ISSUER
from server.emulator.demo import DEMO_ACCOUNT_NAME
from tests.conftest import held, ok, refused
from tests.server.test_serve_remote import free_port
from tests.server.test_serve_stdio import server_env
from tests.server.web.connect_harness import link_in

ASK = {"connection": "slack", "scopes": ["chat:write"], "purpose": "post the standup summary"}
DEADLINE = 20.0


async def wait_for(path: Path, pattern: str, process: asyncio.subprocess.Process) -> re.Match[str]:
    """The first match of `pattern` in the file a process writes to, once it is there."""
    deadline = time.monotonic() + DEADLINE
    while True:
        found = re.search(pattern, path.read_text())
        if found is not None:
            return found
        assert process.returncode is None, f"the process exited: {path.read_text()}"
        assert time.monotonic() < deadline, f"{pattern!r} never came: {path.read_text()}"
        await asyncio.sleep(0.05)


async def healthy(base: str, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + DEADLINE
    async with httpx.AsyncClient() as http:
        while True:
            try:
                if (await http.get(base + "/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert process.returncode is None and time.monotonic() < deadline, "the server did not start"
            await asyncio.sleep(0.05)


async def click_through(browser: Any, url: str) -> list[str]:
    """Open `url` in a fresh context, sign in as the demo user, allow; the URLs the browser asked for."""
    context = await browser.new_context()
    asked: list[str] = []
    try:
        page = await context.new_page()
        page.set_default_timeout(DEADLINE * 1000)
        page.on("request", lambda request: asked.append(request.url))
        await page.goto(url)  # → the demo sign-in page, on the broker's origin
        assert await page.inner_text("h1") == "Sign in"
        await page.get_by_role("button", name=re.compile(f"Continue as {DEMO_ACCOUNT_NAME}")).click()
        await page.wait_for_load_state()
        assert await page.inner_text("h1") == "Connect slack", await page.content()
        await page.get_by_role("button", name="Allow").click()  # the provider's consent page
        await page.wait_for_selector("main.ok h1")
        assert await page.inner_text("h1") == "Connected"
        assert "go back to your agent" in (await page.inner_text("#message")).lower()
    finally:
        await context.close()
    return asked


def on_origin_only(asked: list[str], origin: str) -> None:
    """Every page the browser reached was the broker's (the demo tenant's name is unreachable)."""
    assert asked and all(url.startswith(origin + "/") for url in asked), asked
    assert any(url.startswith(origin + "/demo-tenant/authorize?") for url in asked), asked
    assert any(url.startswith(origin + "/demo-tenant/connect?ticket=") for url in asked), asked
    assert urlsplit(DEMO_ISSUER).hostname not in {urlsplit(url).hostname for url in asked}


async def test_chromium_connects_slack_through_a_demo_http_server_with_no_tenant(
    tmp_path: Path, browser: Any
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "serve", "--transport", "http", "--port", str(port),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
            env=server_env(tmp_path), cwd=tmp_path,
        )
    try:
        token = (await wait_for(log, r"Authorization: Bearer (\S+)", process)).group(1)
        await healthy(base, process)
        transport = streamable_http_client(
            base + "/mcp", http_client=create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        )
        async with held(Client(transport)) as client:
            await ok(client, "buy_quota", {"listing_id": "slack-chat-write", "units": 2, "max_unit_price": 100})
            before = (await ok(client, "check_balance", {}))["balance"]
            url = link_in(await refused(client, "request_token", ASK))
            assert url.startswith(base + "/connect/")
            on_origin_only(await click_through(browser, url), base)
            answer = await ok(client, "request_token", ASK)
            assert answer["units_remaining"] == 1  # two bought; the refused call spent none
            assert (await ok(client, "check_balance", {}))["balance"] == before
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=20)


async def test_the_demo_connect_command_prints_a_link_a_browser_completes(tmp_path: Path, browser: Any) -> None:
    out = tmp_path / "stdout.log"
    with out.open("wb") as stdout:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "server", "connect", "slack", "--scopes", "chat:write",
            stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=asyncio.subprocess.DEVNULL,
            env=server_env(tmp_path), cwd=tmp_path,
        )
    try:
        url = link_in((await wait_for(out, r"https?://\S+/connect/\S+", process)).group(0))
        origin = url.split("/connect/")[0]
        assert origin.startswith("http://127.0.0.1:")
        on_origin_only(await click_through(browser, url), origin)
        assert await asyncio.wait_for(process.wait(), timeout=DEADLINE) == 0
        assert out.read_text().rstrip().endswith("connected")
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
