"""The connect flow (SPEC §10): each client kind's answer, the pages end to end against the emulator, refusals."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import ElicitRequestURLParams, ElicitResult, InputRequiredResult

from server import audit
from server.app import Runtime, build_mcp
from server.clock import ManualClock
from server.demo import DEMO_ISSUER
from server.emulator.demo import DEMO_ACCOUNT
from tests.conftest import demo_runtime, held, ok, refused, text_of
from tests.server.web.connect_harness import (
    ASK,
    CONNECTION,
    PUBLIC_URL,
    Browser,
    add_listing,
    browser_for,
    link_in,
    serve_pages,
)

LINK_TEXT = re.compile(
    r"^\[account_not_connected\] connect your slack account at http://127\.0\.0\.1:8787/connect/[A-Za-z0-9_-]{22}, "
    r"then call again$"
)


@pytest.fixture
async def rt(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Runtime]:
    async with demo_runtime(tmp_path / "vault.db", clock) as runtime:
        assert runtime.tenant is not None
        runtime.tenant.state.auto_login_sub = DEMO_ACCOUNT  # the emulator signs the demo user in at once
        await add_listing(runtime)
        yield runtime


@pytest.fixture
async def pages(rt: Runtime) -> Any:
    return serve_pages(rt)


@pytest.fixture
async def scripted(rt: Runtime, pages: Any) -> AsyncIterator[Browser]:
    async with browser_for(rt, pages) as b:
        yield b


def sdk_client(rt: Runtime, mode: str, **kw: Any) -> Any:
    return held(Client(build_mcp(rt, rt.identity.for_request, "stdio"), mode=mode, **kw))  # type: ignore[arg-type]


async def connect_events(rt: Runtime) -> list[dict[str, Any]]:
    def read(tx: Any) -> list[dict[str, Any]]:
        return [audit.export_line(r) for r in tx.iter_audit() if r.tool == "connect"]

    return await rt.db.read(read)


async def units_left(client: Client) -> int:
    balance = await ok(client, "check_balance", {})
    return next(h["units_remaining"] for h in balance["holdings"] if h["listing_id"] == "slack-read")


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_client_without_url_elicitation_gets_the_link_as_text_and_spends_nothing(
    rt: Runtime, pages: Any, mode: str
) -> None:
    async with sdk_client(rt, mode) as client:
        text = await refused(client, "request_token", ASK)
        assert LINK_TEXT.match(text), text
        assert await units_left(client) == 3
    events = await connect_events(rt)
    assert [(e["outcome"], e["args"]["step"], e["args"]["for_tool"]) for e in events] == [
        ("ok", "start", "request_token")
    ]
    link_id = link_in(text).rsplit("/", 1)[1]
    assert link_id not in json.dumps(events)  # the log holds the link's fingerprint, not the id


async def test_the_scripted_browser_connects_and_the_next_request_token_spends_one_unit(
    rt: Runtime, scripted: Browser
) -> None:
    async with sdk_client(rt, "legacy") as client:
        url = link_in(await refused(client, "request_token", ASK))
        page = await scripted.connect(url)
        assert page.status_code == 200 and "Connected" in page.text and "go back to your agent" in page.text.lower()
        token = await ok(client, "request_token", ASK)
        assert token["connection"] == CONNECTION and token["units_remaining"] == 2  # 3 bought, only this one spent
    steps = [(e["outcome"], e["args"]["step"]) for e in await connect_events(rt)]
    assert steps == [("ok", "start"), ("ok", "complete")]
    # no token of any kind rode in a URL: the My Account token and the verifiers stayed in the sealed cookie
    assert not any("eyJ" in u or "access_token" in u or "code_verifier" in u for u in scripted.visited)


async def test_call_api_answers_with_a_link_too_and_works_once_connected(rt: Runtime, scripted: Browser) -> None:
    await add_listing(rt, id="slack-api", delivery="proxy", api=[DEMO_ISSUER + "provider/slack"])
    call = {**ASK, "method": "GET", "url": DEMO_ISSUER + "provider/slack/channels"}
    async with sdk_client(rt, "legacy") as client:
        text = await refused(client, "call_api", call)
        assert LINK_TEXT.match(text), text
        assert (await scripted.connect(link_in(text))).status_code == 200
        answer = await ok(client, "call_api", call)
        assert answer["status"] == 200 and answer["units_remaining"] == 2
    assert [e["args"]["for_tool"] for e in await connect_events(rt) if e["args"]["step"] == "start"] == ["call_api"]


async def test_the_connect_url_names_only_an_opaque_single_use_id(rt: Runtime, pages: Any) -> None:
    async with sdk_client(rt, "legacy") as client:
        url = link_in(await refused(client, "request_token", ASK))
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == PUBLIC_URL and not parts.query and not parts.fragment
    assert re.fullmatch(r"/connect/[A-Za-z0-9_-]{22}", parts.path)  # 128 random bits, nothing else
    assert rt.tenant is not None
    for secret in (rt.tenant.client_secret, rt.tenant.refresh_token, DEMO_ACCOUNT, "auth0%7C"):
        assert secret not in url


async def test_a_legacy_client_with_url_elicitation_gets_32042_then_elicitation_complete(
    rt: Runtime, scripted: Browser
) -> None:
    seen: list[Any] = []

    async def elicit(ctx: Any, params: Any) -> ElicitResult:  # pragma: no cover - a legacy server raises instead
        return ElicitResult(action="accept")

    async def messages(message: Any) -> None:
        seen.append(message)

    async with sdk_client(rt, "legacy", elicitation_callback=elicit, message_handler=messages) as client:
        with pytest.raises(MCPError) as raised:
            await client.call_tool("request_token", ASK)
        error = raised.value.error
        assert error.code == -32042
        assert LINK_TEXT.match(error.message)
        elicitations = error.data["elicitations"]
        assert len(elicitations) == 1 and elicitations[0]["mode"] == "url"
        url, elicitation_id = elicitations[0]["url"], elicitations[0]["elicitationId"]
        assert url == link_in(error.message) and elicitation_id
        assert await units_left(client) == 3
        assert (await scripted.connect(url)).status_code == 200
        deadline = time.monotonic() + 10
        while not any(_completes(m, elicitation_id) for m in seen):
            assert time.monotonic() < deadline, f"no notifications/elicitation/complete: {seen}"
            await asyncio.sleep(0.02)
        assert (await ok(client, "request_token", ASK))["units_remaining"] == 2


def _completes(message: Any, elicitation_id: str) -> bool:
    root = getattr(message, "root", message)
    params = getattr(root, "params", None)
    return getattr(root, "method", "") == "notifications/elicitation/complete" and getattr(
        params, "elicitation_id", None
    ) == elicitation_id


async def test_a_2026_client_with_url_elicitation_connects_and_its_retry_succeeds(
    rt: Runtime, scripted: Browser
) -> None:
    asked: list[ElicitRequestURLParams] = []

    async def elicit(ctx: Any, params: Any) -> ElicitResult:
        asked.append(params)
        page = await scripted.connect(params.url)  # the user follows the link, then the client retries
        assert page.status_code == 200
        return ElicitResult(action="accept")

    async with sdk_client(rt, "2026-07-28", elicitation_callback=elicit) as client:
        assert client.protocol_version == "2026-07-28"
        result = await client.call_tool("request_token", ASK)
        assert not result.is_error, text_of(result)
        assert result.structured_content is not None and result.structured_content["units_remaining"] == 2
    assert len(asked) == 1 and asked[0].mode == "url"  # (2026-07-28 has no elicitationId: no complete notice)
    assert LINK_TEXT.match(f"[account_not_connected] connect your slack account at {asked[0].url}, then call again")


async def test_a_2026_round_carries_a_sealed_request_state_and_a_forged_one_is_refused(rt: Runtime, pages: Any) -> None:
    async def elicit(ctx: Any, params: Any) -> ElicitResult:  # pragma: no cover - the loop is driven by hand
        return ElicitResult(action="accept")

    async with sdk_client(rt, "2026-07-28", elicitation_callback=elicit) as client:
        first = await client.session.call_tool("request_token", ASK, allow_input_required=True)
        assert isinstance(first, InputRequiredResult)
        assert first.input_requests is not None and list(first.input_requests) == ["connect"]
        url = first.input_requests["connect"].params.url  # type: ignore[union-attr]
        link_id = url.rsplit("/", 1)[1]
        assert first.request_state and link_id not in first.request_state  # encrypted, not just signed
        forged = first.request_state[:-4] + ("AAAA" if not first.request_state.endswith("AAAA") else "BBBB")
        with pytest.raises(MCPError) as raised:
            await client.session.call_tool("request_token", ASK, allow_input_required=True, request_state=forged)
        assert raised.value.error.code == -32602


async def test_another_user_finishing_the_flow_is_refused_and_audited(rt: Runtime, scripted: Browser) -> None:
    assert rt.tenant is not None
    rt.tenant.state.add_user("auth0|mallory", name="Mallory")
    rt.tenant.state.auto_login_sub = "auth0|mallory"
    async with sdk_client(rt, "legacy") as client:
        url = link_in(await refused(client, "request_token", ASK))
        page = await scripted.connect(url)
        assert page.status_code == 403 and "Signed in as someone else" in page.text
        assert "auth0|mallory" not in page.text  # the page does not name accounts
        assert LINK_TEXT.match(await refused(client, "request_token", ASK))  # still not connected: a new link
    refusal = [e for e in await connect_events(rt) if e["outcome"] == "denied"]
    assert len(refusal) == 1
    assert refusal[0]["account"] == DEMO_ACCOUNT and refusal[0]["args"]["signed_in_as"] == "auth0|mallory"
    assert refusal[0]["code"] == "unauthenticated" and refusal[0]["args"]["step"] == "sign-in"
    assert CONNECTION not in {a.connection for a in rt.tenant.state.accounts.get("auth0|mallory", {}).values()}


async def test_a_reused_link_is_refused(rt: Runtime, scripted: Browser) -> None:
    async with sdk_client(rt, "legacy") as client:
        url = link_in(await refused(client, "request_token", ASK))
    assert (await scripted.connect(url)).status_code == 200
    again = await scripted.http.get(url)
    assert again.status_code == 410 and "already used" in again.text


async def test_an_expired_link_is_refused(rt: Runtime, scripted: Browser, clock: ManualClock) -> None:
    async with sdk_client(rt, "legacy") as client:
        url = link_in(await refused(client, "request_token", ASK))
    clock.advance(timedelta(minutes=10, seconds=1))
    page = await scripted.http.get(url)
    assert page.status_code == 410 and "expired" in page.text
    events = await connect_events(rt)
    assert events[-1]["outcome"] == "denied" and events[-1]["args"]["reason"] == "link expired"


@pytest.mark.parametrize("link_id", ["A" * 22, secrets.token_urlsafe(16), "..%2F..%2Fetc", "<script>x</script>"])
async def test_a_forged_link_id_is_refused(scripted: Browser, link_id: str) -> None:
    page = await scripted.http.get(f"{PUBLIC_URL}/connect/{link_id}")
    assert page.status_code in (404, 410)
    assert "<script>" not in page.text


async def test_a_tampered_state_is_refused_and_nothing_is_connected(rt: Runtime, scripted: Browser) -> None:
    async with sdk_client(rt, "legacy") as client:
        url = link_in(await refused(client, "request_token", ASK))
        to_auth0 = await scripted.http.get(url, follow_redirects=False)
        assert to_auth0.status_code == 303
        signed_in = await scripted.http.get(to_auth0.headers["location"], follow_redirects=False)
        back = urlsplit(signed_in.headers["location"])
        query = parse_qs(back.query)
        state = query["state"][0]
        query["state"] = [state[:20] + ("x" if state[20] != "x" else "y") + state[21:]]
        tampered = back._replace(query=urlencode({k: v[0] for k, v in query.items()})).geturl()
        page = await scripted.http.get(tampered)
        assert page.status_code == 400 and "cannot be trusted" in page.text
        assert LINK_TEXT.match(await refused(client, "request_token", ASK))
        untampered = await scripted.http.get(signed_in.headers["location"])  # the flow ended with the refusal
        assert untampered.status_code == 410
    refusal = [e for e in await connect_events(rt) if e["outcome"] == "denied"]
    assert [(e["code"], e["args"]["reason"]) for e in refusal] == [
        ("invalid_argument", "a state that is not ours came back")
    ]


async def test_a_state_from_another_browser_is_refused(rt: Runtime, pages: Any) -> None:
    async with sdk_client(rt, "legacy") as client:
        url = link_in(await refused(client, "request_token", ASK))
    async with browser_for(rt, pages) as mine, browser_for(rt, pages) as theirs:
        to_auth0 = await mine.http.get(url, follow_redirects=False)
        signed_in = await mine.http.get(to_auth0.headers["location"], follow_redirects=False)
        page = await theirs.http.get(signed_in.headers["location"])  # no cookie of this flow
        assert page.status_code == 400 and "cannot be trusted" in page.text


async def test_the_provider_refusing_ends_the_flow_with_a_page_and_an_event(rt: Runtime, scripted: Browser) -> None:
    async with sdk_client(rt, "legacy") as client:
        url = link_in(await refused(client, "request_token", ASK))
        page = await scripted.connect(url, approve=False)
        assert page.status_code == 403 and "did not grant access" in page.text and "call the tool again" in page.text
    refusal = (await connect_events(rt))[-1]
    assert refusal["code"] == "vault_denied" and refusal["args"]["step"] == "consent"


async def test_an_auth0_error_ends_the_flow_with_a_page_naming_it(rt: Runtime, scripted: Browser) -> None:
    assert rt.tenant is not None
    async with sdk_client(rt, "legacy") as client:
        url = link_in(await refused(client, "request_token", ASK))
        del rt.tenant.state.connections[CONNECTION]  # the tenant no longer offers it for Connected Accounts
        page = await scripted.connect(url)
        assert page.status_code == 400 and "Auth0 refused the connect step" in page.text
    assert (await connect_events(rt))[-1]["code"] == "vault_denied"


async def test_the_pages_carry_a_strict_csp_and_escape_what_they_show(scripted: Browser) -> None:
    page = await scripted.http.get(f"{PUBLIC_URL}/connect/callback?state=%3Cscript%3E&code=x")
    assert page.status_code == 400
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "unsafe-inline" not in csp
    assert page.headers["referrer-policy"] == "no-referrer" and "<script" not in page.text.lower()


async def test_without_served_pages_the_answer_is_the_plain_refusal(tmp_path: Path, clock: ManualClock) -> None:
    async with demo_runtime(tmp_path / "plain.db", clock) as runtime:
        await add_listing(runtime)
        async with sdk_client(runtime, "legacy") as client:
            text = await refused(client, "request_token", ASK)
    assert text.startswith("[account_not_connected] ") and "/connect/" not in text


async def test_links_expired_a_day_ago_are_forgotten(rt: Runtime, pages: Any, clock: ManualClock) -> None:
    async with sdk_client(rt, "legacy") as client:
        link_id = link_in(await refused(client, "request_token", ASK)).rsplit("/", 1)[1]
    assert rt.connects is not None
    clock.advance(timedelta(hours=23))
    assert await rt.connects.forget_expired() == 0
    clock.advance(timedelta(hours=2))
    assert await rt.connects.forget_expired() == 1 and await rt.connects.get(link_id) is None


async def test_a_connected_account_makes_no_link(rt: Runtime) -> None:
    assert rt.tenant is not None
    rt.tenant.state.connect_account(DEMO_ACCOUNT, CONNECTION, ["channels:read"])
    async with sdk_client(rt, "legacy") as client:
        assert (await ok(client, "request_token", ASK))["units_remaining"] == 2
    assert await connect_events(rt) == []


async def test_the_pages_stylesheet_is_served_from_the_package(scripted: Browser) -> None:
    page = await scripted.http.get(f"{PUBLIC_URL}/connect/static/connect.css")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/css") and "main" in page.text


async def test_remote_mode_serves_the_pages_beside_mcp_without_a_bearer_but_with_host_checks(
    tmp_path: Path, clock: ManualClock
) -> None:
    from tests.server.remote_harness import remote_server

    async with remote_server(tmp_path, "http", clock) as remote, httpx.AsyncClient() as http:
        page = await http.get(remote.base_url + "/connect/" + "A" * 22)
        assert page.status_code == 410 and "not one this broker made" in page.text  # no 401: no bearer needed
        assert (await http.post(remote.base_url + "/mcp", json={})).status_code == 401  # /mcp still wants one
        rebound = await http.get(remote.base_url + "/connect/" + "A" * 22, headers={"Host": "evil.example"})
        assert rebound.status_code == 421


async def test_a_2026_retry_before_the_flow_ended_asks_again_with_state_only_and_a_decline_gets_the_text(
    rt: Runtime, pages: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tools.connect_answer as connect_answer

    monkeypatch.setattr(connect_answer, "RESUME_WAIT", 0.1)

    async def elicit(ctx: Any, params: Any) -> ElicitResult:  # pragma: no cover - the loop is driven by hand
        return ElicitResult(action="accept")

    async with sdk_client(rt, "2026-07-28", elicitation_callback=elicit) as client:
        first = await client.session.call_tool("request_token", ASK, allow_input_required=True)
        assert isinstance(first, InputRequiredResult) and first.request_state
        url = first.input_requests["connect"].params.url  # type: ignore[index, union-attr]
        accepted = {"connect": ElicitResult(action="accept")}
        again = await client.session.call_tool(
            "request_token", ASK, allow_input_required=True, request_state=first.request_state,
            input_responses=accepted,
        )
        assert isinstance(again, InputRequiredResult) and not again.input_requests and again.request_state
        declined = await client.session.call_tool(
            "request_token", ASK, allow_input_required=True, request_state=again.request_state,
            input_responses={"connect": ElicitResult(action="decline")},
        )
        assert not isinstance(declined, InputRequiredResult) and declined.is_error
        assert text_of(declined) == f"[account_not_connected] connect your slack account at {url}, then call again"
        assert await units_left(client) == 3
