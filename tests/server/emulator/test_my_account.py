"""The My Account API's Connected Accounts endpoints, the provider consent page, and Token Vault answering
401 until the account is connected (and again after DELETE or expiry), through a redirect-following client."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from server.emulator import EmulatorState
from server.emulator.vault import ACCESS_TOKEN_TYPE, FEDERATED_TOKEN_TYPE, TOKEN_VAULT_GRANT
from tests.server.emulator.helpers import (
    API,
    CALLBACK,
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    NATIVE_ID,
    USER,
    Callbacks,
    FakeClock,
    error_of,
    hidden_value,
    pkce_pair,
)
from tests.server.emulator.test_authorize import authorize_params, redeem

ME = ISSUER + "me/"
PREFIX = "/me/v1/connected-accounts"
CONNECT_SCOPES = ["channels:read", "chat:write"]
ALL = "create:me:connected_accounts read:me:connected_accounts delete:me:connected_accounts"


@pytest.fixture
def slack(tenant: EmulatorState) -> EmulatorState:
    tenant.add_connection("slack", CONNECT_SCOPES)
    return tenant


async def my_account_token(browser: httpx.AsyncClient, callbacks: Callbacks, scope: str = ALL) -> str:
    """A My Account API token of USER, through /authorize (auto-login) and the code exchange."""
    verifier, challenge = pkce_pair()
    await browser.post("/emulator/login", json={"sub": USER})
    await browser.get("/authorize", params=authorize_params(challenge, scope="openid " + scope))
    body = (await redeem(browser, callbacks.seen[-1]["code"], verifier)).json()
    return str(body["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def problem(response: httpx.Response) -> tuple[int, str]:
    """Status and title of a My Account error, after checking Auth0's shape and content type."""
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    shape = {"type", "status", "title", "detail"}
    assert shape <= set(body) <= shape | {"validation_errors"}
    assert body["status"] == response.status_code and body["type"].startswith("https://auth0.com/api-errors/")
    return response.status_code, body["title"]


def connect_body(challenge: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "connection": "slack",
        "redirect_uri": CALLBACK,
        "state": "st-1",
        "scopes": ["chat:write"],
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    body.update(overrides)
    return body


async def exchange(browser: httpx.AsyncClient, tenant: EmulatorState, connection: str = "slack") -> httpx.Response:
    subject = tenant.mint_access_token(USER, audience=API, scopes=["request:token"], azp=CLIENT_ID)
    fields = {
        "grant_type": TOKEN_VAULT_GRANT,
        "subject_token": subject,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "requested_token_type": FEDERATED_TOKEN_TYPE,
        "connection": connection,
    }
    return await browser.post("/oauth/token", data=fields, auth=(CLIENT_ID, CLIENT_SECRET))


async def start(browser: httpx.AsyncClient, token: str, challenge: str, **overrides: Any) -> dict[str, Any]:
    answer = await browser.post(PREFIX + "/connect", json=connect_body(challenge, **overrides), headers=bearer(token))
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


async def consent(browser: httpx.AsyncClient, started: dict[str, Any], decision: str) -> httpx.Response:
    page = await browser.get(started["connect_uri"], params=started["connect_params"])
    assert page.status_code == 200, page.text
    return await browser.post("/connect", data={"ticket": hidden_value(page.text, "ticket"), "decision": decision})


async def test_connect_consent_complete_then_token_vault_exchanges_with_the_granted_scopes(
    browser: httpx.AsyncClient, callbacks: Callbacks, slack: EmulatorState
) -> None:
    assert error_of(await exchange(browser, slack)) == (401, "federated_connection_refresh_token_not_found")
    token = await my_account_token(browser, callbacks)
    verifier, challenge = pkce_pair()

    started = await start(browser, token, challenge)
    assert set(started) == {"auth_session", "connect_uri", "connect_params", "expires_in"}
    assert started["connect_uri"] == ISSUER + "connect" and set(started["connect_params"]) == {"ticket"}
    page = await browser.get(started["connect_uri"], params=started["connect_params"])
    assert "chat:write" in page.text and "form-action 'self' http://127.0.0.1:5123" in page.headers[
        "content-security-policy"
    ]
    await browser.post("/connect", data={"ticket": started["connect_params"]["ticket"], "decision": "approve"})
    back = callbacks.seen[-1]
    assert set(back) == {"connect_code", "state"} and back["state"] == "st-1"

    completed = await browser.post(
        PREFIX + "/complete",
        json={"auth_session": started["auth_session"], "connect_code": back["connect_code"],
              "redirect_uri": CALLBACK, "code_verifier": verifier},
        headers=bearer(token),
    )
    assert completed.status_code == 201, completed.text
    account = completed.json()
    assert account["id"].startswith("cac_") and account["connection"] == "slack"
    assert (account["access_type"], account["scopes"]) == ("offline", ["chat:write"])
    assert account["created_at"].endswith("Z") and "expires_at" not in account
    vault = await exchange(browser, slack)
    assert vault.status_code == 200 and vault.json()["scope"] == "chat:write"

    listed = await browser.get(PREFIX + "/accounts", params={"connection": "slack"}, headers=bearer(token))
    assert listed.json() == {"accounts": [account]}
    again = await browser.post(
        PREFIX + "/complete",
        json={"auth_session": started["auth_session"], "connect_code": back["connect_code"],
              "redirect_uri": CALLBACK, "code_verifier": verifier},
        headers=bearer(token),
    )
    assert problem(again) == (409, "Conflict")

    deleted = await browser.delete(f"{PREFIX}/accounts/{account['id']}", headers=bearer(token))
    assert deleted.status_code == 204
    assert error_of(await exchange(browser, slack)) == (401, "federated_connection_refresh_token_not_found")
    gone = await browser.delete(f"{PREFIX}/accounts/{account['id']}", headers=bearer(token))
    assert problem(gone) == (404, "Not Found")


async def test_deny_at_consent_sends_access_denied_with_the_state_and_complete_is_refused(
    browser: httpx.AsyncClient, callbacks: Callbacks, slack: EmulatorState
) -> None:
    token = await my_account_token(browser, callbacks)
    verifier, challenge = pkce_pair()
    started = await start(browser, token, challenge)

    await consent(browser, started, "deny")
    assert callbacks.seen[-1]["error"] == "access_denied" and callbacks.seen[-1]["state"] == "st-1"
    assert "connect_code" not in callbacks.seen[-1]
    refused = await browser.post(
        PREFIX + "/complete",
        json={"auth_session": started["auth_session"], "connect_code": "x", "redirect_uri": CALLBACK,
              "code_verifier": verifier},
        headers=bearer(token),
    )
    assert problem(refused)[0] == 400
    # the ticket was spent: the consent page is gone
    assert (await browser.get(started["connect_uri"], params=started["connect_params"])).status_code == 400
    assert error_of(await exchange(browser, slack))[0] == 401


@pytest.mark.parametrize("spoil", ["verifier", "redirect_uri", "connect_code", "expired"])
async def test_complete_checks_pkce_redirect_code_and_expiry(
    browser: httpx.AsyncClient, callbacks: Callbacks, slack: EmulatorState, clock: FakeClock, spoil: str
) -> None:
    token = await my_account_token(browser, callbacks)
    verifier, challenge = pkce_pair()
    started = await start(browser, token, challenge)
    await consent(browser, started, "approve")
    fields = {"auth_session": started["auth_session"], "connect_code": callbacks.seen[-1]["connect_code"],
              "redirect_uri": CALLBACK, "code_verifier": verifier}
    if spoil == "verifier":
        fields["code_verifier"] = pkce_pair()[0]
    elif spoil == "redirect_uri":
        fields["redirect_uri"] = "http://127.0.0.1:5999/callback"
    elif spoil == "connect_code":
        fields["connect_code"] = "forged-code"
    else:
        clock.advance(slack.connect_expires_in)

    assert problem(await browser.post(PREFIX + "/complete", json=fields, headers=bearer(token))) == (
        400,
        "Bad Request",
    )
    assert error_of(await exchange(browser, slack))[0] == 401


async def test_another_users_token_cannot_complete_the_session(
    browser: httpx.AsyncClient, callbacks: Callbacks, slack: EmulatorState
) -> None:
    token = await my_account_token(browser, callbacks)
    verifier, challenge = pkce_pair()
    started = await start(browser, token, challenge)
    await consent(browser, started, "approve")
    slack.add_user("auth0|mallory")
    other = slack.mint_access_token("auth0|mallory", audience=ME, scopes=ALL.split(), azp=NATIVE_ID)

    answer = await browser.post(
        PREFIX + "/complete",
        json={"auth_session": started["auth_session"], "connect_code": callbacks.seen[-1]["connect_code"],
              "redirect_uri": CALLBACK, "code_verifier": verifier},
        headers=bearer(other),
    )
    assert problem(answer) == (404, "Not Found")


async def test_tokens_for_another_audience_or_without_the_scope_are_refused(
    browser: httpx.AsyncClient, slack: EmulatorState
) -> None:
    _, challenge = pkce_pair()
    body = connect_body(challenge)
    api_token = slack.mint_access_token(USER, audience=API, scopes=["create:me:connected_accounts"], azp=NATIVE_ID)
    read_only = slack.mint_access_token(USER, audience=ME, scopes=["read:me:connected_accounts"], azp=NATIVE_ID)

    assert problem(await browser.post(PREFIX + "/connect", json=body)) == (401, "Unauthorized")
    assert problem(await browser.post(PREFIX + "/connect", json=body, headers=bearer("not-a-jwt"))) == (
        401,
        "Unauthorized",
    )
    assert problem(await browser.post(PREFIX + "/connect", json=body, headers=bearer(api_token))) == (
        401,
        "Unauthorized",
    )
    assert problem(await browser.post(PREFIX + "/connect", json=body, headers=bearer(read_only))) == (
        403,
        "Forbidden",
    )
    assert problem(await browser.delete(PREFIX + "/accounts/cac_x", headers=bearer(read_only))) == (403, "Forbidden")


@pytest.mark.parametrize(
    "overrides",
    [
        {"surprise": 1},
        {"redirect_uri": "https://evil.example/cb"},
        {"connection": "myspace"},
        {"scopes": ["admin"]},
        {"code_challenge_method": "plain"},
        {"connection": ""},
    ],
)
async def test_connect_rejects_unknown_fields_bad_redirects_connections_and_scopes(
    browser: httpx.AsyncClient, slack: EmulatorState, overrides: dict[str, Any]
) -> None:
    token = slack.mint_access_token(USER, audience=ME, scopes=ALL.split(), azp=NATIVE_ID)
    _, challenge = pkce_pair()
    answer = await browser.post(PREFIX + "/connect", json=connect_body(challenge, **overrides), headers=bearer(token))

    assert problem(answer) == (400, "Bad Request")


async def test_accounts_are_paged_and_expired_connections_stop_exchanging(
    browser: httpx.AsyncClient, slack: EmulatorState, clock: FakeClock
) -> None:
    token = slack.mint_access_token(USER, audience=ME, scopes=ALL.split(), azp=NATIVE_ID)
    slack.connect_account(USER, "slack", ["chat:write"], expires_at=clock() + 60)

    first = (await browser.get(PREFIX + "/accounts", params={"take": 1}, headers=bearer(token))).json()
    assert len(first["accounts"]) == 1 and first["next"]
    second = (await browser.get(PREFIX + "/accounts", params={"take": 1, "from": first["next"]},
                                headers=bearer(token))).json()
    assert [a["connection"] for a in first["accounts"] + second["accounts"]] == ["github", "slack"]
    assert "next" not in second and second["accounts"][0]["expires_at"].endswith("Z")
    assert (await exchange(browser, slack)).status_code == 200
    clock.advance(60)
    assert error_of(await exchange(browser, slack))[0] == 401
    bad = await browser.get(PREFIX + "/accounts", params={"take": 0}, headers=bearer(token))
    assert problem(bad) == (400, "Bad Request")


async def test_require_connect_through_the_test_api_makes_an_existing_connection_unconnected(
    browser: httpx.AsyncClient, slack: EmulatorState
) -> None:
    assert (await exchange(browser, slack, "github")).status_code == 200
    answer = await browser.post("/emulator/accounts/require-connect", json={"sub": USER, "connection": "github"})

    assert answer.json()["connected"] is False
    assert error_of(await exchange(browser, slack, "github"))[0] == 401


async def test_consent_page_escapes_hostile_names_and_refuses_unknown_tickets(
    browser: httpx.AsyncClient, slack: EmulatorState
) -> None:
    hostile = '<script>alert("x")</script>'
    slack.add_user(USER, name=hostile)
    token = slack.mint_access_token(USER, audience=ME, scopes=ALL.split(), azp=NATIVE_ID)
    started = await start(browser, token, pkce_pair()[1], state=hostile)
    page = await browser.get(started["connect_uri"], params=started["connect_params"])

    assert "<script>" not in page.text and "&lt;script&gt;" in page.text
    assert (await browser.get("/connect", params={"ticket": "forged"})).status_code == 400
    assert (await browser.post("/connect", data={"ticket": "forged", "decision": "approve"})).status_code == 400
