"""The operator console (SPEC §11) in a real headless Chromium against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from server.clock import ManualClock
from server.emulator.demo import DEMO_SCOPES
from server.store import AuditFilter
from server.web.console import local_operator
from tests.conftest import DEMO_NOW, demo_client, held, ok, refused
from tests.server.test_cli import run
from tests.server.web.console.harness import Console, auth0_console, canary, demo_console

PAGES = ("market", "wallets", "agents", "audit", "approvals")
OPERATOR = local_operator()


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    async with held(demo_console(tmp_path / "vault.db", ManualClock(DEMO_NOW))) as c:
        yield c


async def signed_in(browser: Any, console: Console) -> Any:
    """A fresh browser context signed in with a one-time link; its page is on the Market page."""
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(console.link())
    await page.wait_for_url("**/console/market")
    return page


def remote_client(console: Console, token: str) -> Client:
    return Client(streamable_http_client(
        console.endpoint, http_client=create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    ))


def agent_token(console: Console, agent: str) -> str:
    assert console.tenant is not None
    return console.tenant.state.mint_access_token(
        console.tenant.account, audience=console.tenant.audience, scopes=list(DEMO_SCOPES), azp=agent
    )


async def eventually(check: Any, seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


# ---- sign-in ----------------------------------------------------------------------------------

async def test_without_a_session_every_page_redirects_to_sign_in(console: Console) -> None:
    async with httpx.AsyncClient(base_url=console.base_url) as http:
        for name in (*PAGES, "audit/export", "audit/status"):
            answer = await http.get(f"/console/{name}")
            assert answer.status_code == 303, name
            assert answer.headers["location"] == "/console/signin"
        assert (await http.get("/console/signin")).status_code == 401  # no token: told where the link is
        forged = await http.post("/console/agents/block", data={"agent": "x", "csrf": "x"})
        assert forged.status_code == 403
        script = await http.get("/console/static/console.js")  # the one script: public, and never sniffed
        assert script.status_code == 200 and script.headers["x-content-type-options"] == "nosniff"
        assert "javascript" in script.headers["content-type"]


async def test_the_one_time_link_signs_in_once_with_a_strict_httponly_cookie(browser: Any, console: Console) -> None:
    link = console.link()
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(link)
    await page.wait_for_url("**/console/market")
    assert await page.inner_text("#operator") == OPERATOR
    [cookie] = [c for c in await context.cookies() if c["name"] == "tvm_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["expires"] > time.time()
    assert link in console.printed.getvalue()
    other = await (await browser.new_context()).new_page()
    answer = await other.goto(link)  # used: another browser gets nothing
    assert answer is not None and answer.status == 401
    assert "/console/signin?token=" in console.printed.getvalue().split(link, 1)[1]  # a fresh one was printed
    for name in PAGES:
        answer = await page.goto(f"{console.base_url}/console/{name}")
        assert answer is not None and answer.status == 200, name
        csp = answer.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    await page.click("form.logout button")
    await page.wait_for_selector("text=Signed out")
    answer = await page.goto(f"{console.base_url}/console/market")
    assert answer is not None and page.url.endswith("/console/signin") and answer.status == 401  # session gone


# ---- pages show what the CLI shows --------------------------------------------------------------

async def test_every_page_shows_what_the_cli_shows_and_todays_point_is_list_markets_price(
    browser: Any, console: Console, tmp_path: Path
) -> None:
    async with demo_client(console.runtime) as client:
        await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 3, "max_unit_price": 100})
        priced = await ok(client, "list_market", {"limit": 100, "include_closed": True})
    await console.runtime.broker.block_agent("rogue-agent", "testing", "cli:test")
    page = await signed_in(browser, console)

    for item in priced["listings"]:  # today's point on each V(t) line is the tool's unit_price
        card = page.locator(f"#listing-{item['listing_id']}")
        assert int(await card.locator("circle.today").get_attribute("data-price")) == item["unit_price"]
        assert int(await card.locator("[data-field=unit_price]").inner_text()) == item["unit_price"]
        points = (await card.locator("polyline.vline").get_attribute("points")).split()
        assert len(points) > 10

    market = [json.loads(line) for line in run(tmp_path, "market", "list", "--json").out.splitlines()]
    for row in market:
        card = page.locator(f"#listing-{row['listing_id']}")
        assert int(await card.locator("[data-field=supply_remaining]").inner_text()) == row["supply_remaining"]
        assert await card.locator("[data-field=delivery]").inner_text() == row["delivery"]
        assert await card.locator("[data-field=approval]").inner_text() == row["approval"]

    account = console.runtime.tenant.account  # type: ignore[union-attr]
    wallet = json.loads(run(tmp_path, "wallet", "show", account, "--json").out)
    await page.goto(f"{console.base_url}/console/wallets")
    row = page.locator(f"tr[data-account='{account}'][data-listing='github-repo-read']")
    assert int(await row.locator(".balance").get_attribute("data-balance")) == wallet["balance"]
    assert int(await row.locator(".units").inner_text()) == wallet["holdings"][0]["units_remaining"]

    agents = [json.loads(line) for line in run(tmp_path, "agent", "list", "--json").out.splitlines()]
    await page.goto(f"{console.base_url}/console/agents")
    shown = await page.locator("#agent-table tbody tr").evaluate_all(
        "rows => rows.map(r => [r.dataset.agent, r.querySelector('.calls').textContent,"
        " r.querySelector('.blocked').textContent, r.querySelector('.reason').textContent])"
    )
    assert shown == [[a["agent"], str(a["calls"]), "yes" if a["blocked"] else "", a["reason"] or ""] for a in agents]

    events = [json.loads(line) for line in run(tmp_path, "audit", "list", "--json").out.splitlines()]
    await page.goto(f"{console.base_url}/console/audit")
    ids = await page.locator("#event-table tbody tr").evaluate_all("rows => rows.map(r => +r.dataset.id)")
    assert ids == [e["id"] for e in reversed(events)]
    await page.wait_for_selector("#chain-line")
    assert await page.inner_text("#chain-line") == run(tmp_path, "audit", "verify").out.strip()
    assert await page.inner_text("#books-line") == "ledger invariants OK"

    await page.goto(f"{console.base_url}/console/audit?tool=buy_quota")
    ids = await page.locator("#event-table tbody tr").evaluate_all("rows => rows.map(r => +r.dataset.id)")
    cli = [json.loads(line)["id"] for line in run(tmp_path, "audit", "list", "--tool", "buy_quota", "--json")
           .out.splitlines()]
    assert ids == list(reversed(cli)) and ids
    async with page.expect_download() as download:
        await page.click("#export")
    exported = Path(await (await download.value).path()).read_text().splitlines()
    assert exported == run(tmp_path, "audit", "export", "--tool", "buy_quota").out.splitlines()

    answer = await page.goto(f"{console.base_url}/console/approvals")
    assert answer is not None and answer.status == 200
    assert await page.locator("#pending-table").count() == 1


async def test_the_audit_page_pages_through_a_large_log_by_event_id(browser: Any, console: Console) -> None:
    for n in range(120):
        await console.runtime.broker.credit(f"auth0|paged-{n}", 1)
    page = await signed_in(browser, console)
    await page.goto(f"{console.base_url}/console/audit?tool=wallet_credit")
    seen: list[int] = []
    while True:
        seen += await page.locator("#event-table tbody tr").evaluate_all("rows => rows.map(r => +r.dataset.id)")
        older = page.locator("#older")
        if await older.count() == 0:
            break
        await older.click()
    records = await console.runtime.db.read(lambda tx: tx.find_audit(AuditFilter(tool="wallet_credit")))
    assert seen == [r.id for r in reversed(records)] and len(seen) == 121  # the demo's own credit too


# ---- actions -------------------------------------------------------------------------------------

async def test_credit_transfer_and_block_from_the_browser_take_effect_and_are_audited(
    browser: Any, console: Console
) -> None:
    account = console.runtime.tenant.account  # type: ignore[union-attr]
    async with demo_client(console.runtime) as client:
        await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 5, "max_unit_price": 100})
        agent = (await console.runtime.db.read(lambda tx: tx.find_audit(AuditFilter(tool="buy_quota"))))[0].agent
        page = await signed_in(browser, console)

        await page.goto(f"{console.base_url}/console/wallets")
        await page.fill("#credit-form input[name=account]", "auth0|bob")
        await page.fill("#credit-form input[name=amount]", "250")
        await page.click("#credit-form button")
        await page.wait_for_selector("#notice")
        assert await console.runtime.db.read(lambda tx: tx.balance("auth0|bob")) == 250

        before = await console.runtime.db.read(lambda tx: tx.balance(account))
        await page.fill("#transfer-credits-form input[name=from_account]", account)
        await page.fill("#transfer-credits-form input[name=to_account]", "auth0|bob")
        await page.fill("#transfer-credits-form input[name=amount]", "40")
        await page.click("#transfer-credits-form button")
        await page.wait_for_selector("#notice")
        assert await console.runtime.db.read(lambda tx: tx.balance("auth0|bob")) == 290
        assert await console.runtime.db.read(lambda tx: tx.balance(account)) == before - 40

        await page.fill("#transfer-units-form input[name=from_account]", account)
        await page.fill("#transfer-units-form input[name=to_account]", "auth0|bob")
        await page.select_option("#transfer-units-form select[name=listing]", "github-repo-read")
        await page.fill("#transfer-units-form input[name=units]", "2")
        await page.click("#transfer-units-form button")
        await page.wait_for_selector("#notice")
        bob = await console.runtime.db.read(lambda tx: tx.holdings_of("auth0|bob"))
        assert [(h.listing_id, h.units_held) for h in bob] == [("github-repo-read", 2)]
        assert int(await page.locator("tr[data-account='auth0|bob'] .units").inner_text()) == 2

        await page.goto(f"{console.base_url}/console/agents")
        row = page.locator(f"tr[data-agent='{agent}']")
        await row.locator("input[name=reason]").fill("stop now")
        await row.locator("button.block").click()
        await page.wait_for_selector("#notice")
        assert "[agent_blocked]" in await refused(client, "check_balance", {})
        assert await page.locator(f"tr[data-agent='{agent}'] .reason").inner_text() == "stop now"

    def events(tool: str) -> Any:
        return console.runtime.db.read(lambda tx: tx.find_audit(AuditFilter(tool=tool)))

    [credit] = [e for e in await events("wallet_credit") if e.transport == "console"]
    assert json.loads(credit.args)["operator"] == OPERATOR and credit.account == "auth0|bob"
    moved = await events("wallet_transfer") + await events("quota_transfer")
    assert len(moved) == 4 and all(json.loads(e.args)["operator"] == OPERATOR for e in moved)
    [block] = await events("agent_block")
    assert block.account == OPERATOR and block.agent == "operator" and block.transport == "console"


async def test_a_cross_site_post_without_the_csrf_token_is_refused(browser: Any, console: Console) -> None:
    page = await signed_in(browser, console)
    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    async with httpx.AsyncClient(base_url=console.base_url, cookies=cookies) as http:
        same_site = {"origin": console.base_url}
        no_token = await http.post("/console/wallets/credit", data={"account": "auth0|eve", "amount": "5"},
                                   headers=same_site)
        assert no_token.status_code == 403
        wrong = await http.post("/console/wallets/credit", data={"account": "auth0|eve", "amount": "5",
                                                                 "csrf": "guess"}, headers=same_site)
        assert wrong.status_code == 403
        foreign = await http.post("/console/wallets/credit", data={"account": "auth0|eve", "amount": "5"},
                                  headers={"origin": "http://evil.example"})
        assert foreign.status_code == 403
    async with canary() as site:  # a real cross-site page that auto-submits a form at the console
        site.page = (f"<form id=f method=post action='{console.base_url}/console/wallets/credit'>"
                     "<input name=account value='auth0|eve'><input name=amount value=5></form>"
                     "<script>document.getElementById('f').submit()</script>")
        attacker = await page.context.new_page()
        answers: list[int] = []
        attacker.on("response", lambda r: answers.append(r.status) if "/console/wallets/credit" in r.url else None)
        await attacker.goto(site.url + "/attack")
        await eventually(lambda: _true(bool(answers)))
        assert answers == [403]
    assert await console.runtime.db.read(lambda tx: tx.balance("auth0|eve")) is None


async def _true(value: bool) -> bool:
    return value


# ---- hostile agent text --------------------------------------------------------------------------

async def test_hostile_agent_text_runs_nothing_in_the_operators_browser(browser: Any, console: Console) -> None:
    async with canary() as bird:
        call_home = f"{bird.url}/x"
        payload = (f"<script>fetch('{call_home}')</script><img src='{call_home}' onerror='alert(1)'>"
                   f"<a href='javascript:alert(2)'>x</a></textarea><svg onload='alert(3)'>\"'><b>bold</b>")
        agent = f"<script>alert('a')</script><img src={call_home}>javascript:alert(4)</textarea>"
        key = f"</textarea><img src={call_home} onerror=alert(5)>"[:128]
        async with held(remote_client(console, agent_token(console, agent))) as client:
            await ok(client, "buy_quota", {"listing_id": "github-repo-read", "units": 2, "max_unit_price": 100,
                                           "idempotency_key": key})
            await ok(client, "request_token", {"connection": "github", "scopes": ["repo:read"], "purpose": payload})
            await ok(client, "check_balance", {})
        page = await signed_in(browser, console)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        requests: list[str] = []
        page.context.on("request", lambda r: requests.append(r.url))
        for name in PAGES:
            await page.goto(f"{console.base_url}/console/{name}")
            if name == "audit":  # the chain-and-books verdict arrives after the page
                await page.wait_for_selector("#chain-line")
            start = await page.evaluate("document.querySelectorAll('*').length")
            # one live refresh swapped the regions in (a locator: the page's CSP refuses Playwright's eval)
            await page.locator("#live", has_text="live: updated").wait_for(timeout=10_000)
            counts = await page.evaluate(
                "[document.querySelectorAll('img, iframe, object, embed, svg:not(.chart)').length,"
                " document.querySelectorAll('script:not([src])').length,"
                " document.querySelectorAll('a[href^=\"javascript\" i], [onerror], [onload], b').length,"
                " document.querySelectorAll('*').length]"
            )
            assert counts[:3] == [0, 0, 0], (name, counts)
            assert counts[3] == start, name  # no element appeared or went: the swap replaced like with like
        await page.goto(f"{console.base_url}/console/audit")
        text = await page.inner_text("#event-table")
        assert payload[:60] in text and agent in text  # shown as text, escaped
        titles = await page.locator("#event-table td.summary").evaluate_all("cells => cells.map(c => c.title)")
        assert any(key in t for t in titles)
        await page.goto(f"{console.base_url}/console/agents")
        assert agent in await page.inner_text("#agent-table")
        assert dialogs == []
        assert bird.hits == []
        assert not [u for u in requests if u.startswith(bird.url)]


# ---- Auth0 sign-in (the emulator as the tenant) ----------------------------------------------------

async def test_auth0_sign_in_needs_manage_broker(browser: Any, tmp_path: Path) -> None:
    async with held(auth0_console(tmp_path / "vault.db", ManualClock(DEMO_NOW))) as console:
        assert console.tenant is not None
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(f"{console.base_url}/console/market")  # → /console/login → /authorize → back
        await page.wait_for_url("**/console/market")
        assert await page.inner_text("#operator") == console.tenant.account

        state = console.tenant.state
        state.add_user("auth0|no-manage")
        state.set_permissions("auth0|no-manage", console.tenant.audience, list(DEMO_SCOPES))
        state.auto_login_sub = "auth0|no-manage"
        other = await (await browser.new_context()).new_page()
        answers: list[int] = []
        other.on("response", lambda r: answers.append(r.status) if "/console/callback" in r.url else None)
        await other.goto(f"{console.base_url}/console/agents")
        await other.wait_for_selector("#message")
        assert answers == [403]
        assert "manage:broker" in await other.inner_text("#message")
        assert not [c for c in await other.context.cookies() if c["name"] == "tvm_console"]  # no session


# ---- live figures, approvals, a broken chain, PostgreSQL ----------------------------------------------

async def test_figures_update_live_while_a_page_is_open(browser: Any, console: Console) -> None:
    page = await signed_in(browser, console)
    await page.goto(f"{console.base_url}/console/wallets")
    assert await page.locator("tr[data-account='auth0|live']").count() == 0
    await console.runtime.broker.credit("auth0|live", 7)  # from elsewhere: the CLI, another operator
    await page.locator("tr[data-account='auth0|live'] .balance", has_text="7").wait_for(timeout=10_000)
    assert page.url.endswith("/console/wallets")  # no reload: the live refresh swapped the table in


async def test_a_call_waiting_for_approval_is_pending_then_recent_once_refused(browser: Any, console: Console) -> None:
    tenant = console.runtime.tenant
    assert tenant is not None
    tenant.state.ciba_mode = "manual"  # the owner has not answered yet
    page = await signed_in(browser, console)
    async with demo_client(console.runtime) as client:
        await ok(client, "buy_quota", {"listing_id": "github-repo-write-api", "units": 1, "max_unit_price": 100})
        call = asyncio.create_task(client.call_tool("call_api", {
            "connection": "github", "scopes": ["repo:read", "repo:write"], "method": "POST",
            "url": "https://demo-tenant.token-vault-mcp.invalid/provider/github/repos/acme/x", "json": {},
            "purpose": "an approved write"}))
        await page.goto(f"{console.base_url}/console/approvals")
        await page.locator("#pending-table td", has_text="approval").wait_for(timeout=10_000)
        assert "github-repo-write-api" in await page.inner_text("#pending-table")
        pending = await eventually(lambda: _pending_ciba(console))
        tenant.state.deny_ciba(pending[0].auth_req_id)
        result = await call
        assert result.is_error and "[approval_denied]" in result.content[0].text  # type: ignore[union-attr]
    await page.locator("#recent-table td", has_text="approval_denied").wait_for(timeout=10_000)
    assert await page.locator("#pending-table td", has_text="Nothing pending.").count() == 1


async def _pending_ciba(console: Console) -> list[Any]:
    return console.runtime.tenant.state.pending_ciba()  # type: ignore[union-attr]


async def test_an_edited_event_shows_the_chain_broken_as_audit_verify_says(
    browser: Any, console: Console, tmp_path: Path
) -> None:
    import sqlite3

    with sqlite3.connect(tmp_path / "vault.db") as conn:
        conn.execute("UPDATE audit SET args = '{\"amount\":1}' WHERE id = 1")
    page = await signed_in(browser, console)
    await page.goto(f"{console.base_url}/console/audit")
    await page.wait_for_selector("#chain-line")
    verdict = run(tmp_path, "audit", "verify")
    assert verdict.code == 1 and await page.inner_text("#chain-line") == verdict.out.strip()
    assert "BROKEN at event 1" in verdict.out


@pytest.mark.both_backends
async def test_every_page_renders_and_exports_on_either_store(database: str) -> None:
    async with held(demo_console(database, ManualClock(DEMO_NOW))) as console:
        async with demo_client(console.runtime) as client:
            await ok(client, "buy_quota", {"listing_id": "github-repo-read-api", "units": 2, "max_unit_price": 100})
            await ok(client, "call_api", {"connection": "github", "scopes": ["repo:read"], "method": "GET",
                                          "url": "https://demo-tenant.token-vault-mcp.invalid/provider/github/user",
                                          "purpose": "a grant to show"})
        async with httpx.AsyncClient(base_url=console.base_url) as http:
            http.cookies = (await http.get(console.link().removeprefix(console.base_url))).cookies
            for name in (*PAGES, "audit/status"):
                answer = await http.get(f"/console/{name}")
                assert answer.status_code == 200, (name, answer.text[-500:])
            wallets = (await http.get("/console/wallets")).text
            assert "github-repo-read-api" in wallets and "No live grants." not in wallets
            exported = (await http.get("/console/audit/export")).text.splitlines()
            count = await console.runtime.db.read(lambda tx: tx.audit_count())
            assert len(exported) == count and json.loads(exported[-1])["tool"] == "call_api"
