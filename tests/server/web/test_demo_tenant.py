"""Demo mode serves the demo tenant's sign-in and consent pages on the broker's own origin (/demo-tenant/…):
the remote app and the stdio/CLI loopback listener, behind the same Host and Origin checks; with a real
tenant nothing is mounted and the browser goes to the tenant itself."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from server.app import Runtime
from server.broker import Call
from server.clock import ManualClock
from server.emulator.demo import DEMO_ACCOUNT
from server.principal import Principal
from server.web.remote import build_remote_app, remote_settings
from tests.conftest import demo_runtime
from tests.server.emulator.helpers import hidden_value

BASE = "http://127.0.0.1:8787"


@pytest.fixture
async def rt(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Runtime]:
    async with demo_runtime(tmp_path / "vault.db", clock) as runtime:
        yield runtime


async def new_link(runtime: Runtime) -> str:
    assert runtime.connects is not None
    principal = Principal(DEMO_ACCOUNT, "agent-1", frozenset({"request:token"}))
    needed = await runtime.connects.start(Call("request_token", "request:token", "test"), principal, "slack",
                                          ["chat:write"])
    return needed.url


def remote_client(runtime: Runtime) -> httpx.AsyncClient:
    app = build_remote_app(runtime, remote_settings(runtime.config, "http", "127.0.0.1", 8787))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


async def test_the_remote_demo_sends_the_browser_to_sign_in_on_its_own_origin(rt: Runtime) -> None:
    async with remote_client(rt) as browser:
        link = await new_link(rt)
        assert link.startswith(BASE + "/connect/")
        start = await browser.get(link)
        assert start.status_code == 303
        target = start.headers["location"]
        assert target.startswith(BASE + "/demo-tenant/authorize?")
        query = parse_qs(urlsplit(target).query)
        assert query["audience"] == [rt.auth0.base_url + "/me/"]  # the back channel's identity is unchanged
        page = await browser.get(target)
        assert page.status_code == 200 and 'action="/demo-tenant/authorize/login"' in page.text
        assert "Continue as Demo User" in page.text  # a person picks the demo user: no auto-login
        policy = page.headers["content-security-policy"]
        assert "form-action 'self' " + BASE in policy and "script" not in page.text.lower()

        txn = hidden_value(page.text, "txn")
        foreign = await browser.post("/demo-tenant/authorize/login", data={"txn": txn, "sub": DEMO_ACCOUNT},
                                     headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403  # another site cannot post the sign-in
        rebound = await browser.get(target, headers={"Host": "evil.example"})
        assert rebound.status_code == 421
        signed = await browser.post("/demo-tenant/authorize/login", data={"txn": txn, "sub": DEMO_ACCOUNT},
                                    headers={"Origin": BASE})
        assert signed.status_code == 302 and signed.headers["location"].startswith(BASE + "/connect/callback?")


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/demo-tenant/oauth/token"), ("POST", "/demo-tenant/me/v1/connected-accounts/connect"),
    ("GET", "/demo-tenant/.well-known/jwks.json"), ("POST", "/demo-tenant/emulator/tokens"),
])
async def test_the_demo_serves_no_back_channel_of_its_tenant(rt: Runtime, method: str, path: str) -> None:
    async with remote_client(rt) as browser:
        assert (await browser.request(method, path)).status_code in (404, 405)


async def test_with_a_real_tenant_nothing_is_mounted_and_the_browser_goes_to_the_tenant(rt: Runtime) -> None:
    real = dataclasses.replace(rt, tenant=None)  # what differs for a runtime on AUTH0_DOMAIN
    async with remote_client(real) as browser:
        assert (await browser.get("/demo-tenant/authorize")).status_code == 404
        start = await browser.get(await new_link(real))
        assert start.headers["location"].startswith(rt.auth0.base_url + "/authorize?")


async def test_the_loopback_listener_serves_the_demo_pages_behind_the_host_check(rt: Runtime) -> None:
    listener = rt.serve_connect_on_loopback()
    link = await new_link(rt)  # opens the listener
    origin = listener.url
    assert origin is not None and link.startswith(origin + "/connect/")
    assert rt.auth0.browser_url == origin + "/demo-tenant"
    async with httpx.AsyncClient(timeout=10) as browser:
        start = await browser.get(link)
        assert start.status_code == 303 and start.headers["location"].startswith(origin + "/demo-tenant/authorize?")
        page = await browser.get(start.headers["location"])
        assert page.status_code == 200 and 'action="/demo-tenant/authorize/login"' in page.text
        assert (await browser.get(start.headers["location"], headers={"Host": "evil.example"})).status_code == 421
        login = await browser.post(origin + "/demo-tenant/authorize/login", headers={"Origin": "https://evil.example"},
                                   data={"txn": hidden_value(page.text, "txn"), "sub": DEMO_ACCOUNT})
        assert login.status_code == 403
