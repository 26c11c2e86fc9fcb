"""`/authorize` with its sign-in page and the authorization-code exchange with PKCE, driven by a real HTTP
client that follows redirects (the emulator and the client's callback served in process)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from server.emulator import EmulatorState
from server.emulator.state import MY_ACCOUNT_SCOPES
from tests.server.emulator.helpers import (
    API,
    CALLBACK,
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    NATIVE_ID,
    OTHER_CLIENT_ID,
    USER,
    WEB_CALLBACK,
    Callbacks,
    FakeClock,
    error_of,
    hidden_value,
    pkce_pair,
)

ME = ISSUER + "me/"
BOB = "auth0|bob"


def authorize_params(challenge: str, **overrides: str) -> dict[str, str]:
    params = {
        "client_id": NATIVE_ID,
        "redirect_uri": CALLBACK,
        "response_type": "code",
        "scope": "openid create:me:connected_accounts",
        "audience": ME,
        "state": "xyz-state",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "nonce": "n-1",
    }
    params.update(overrides)
    return params


async def sign_in(browser: httpx.AsyncClient, params: dict[str, str], sub: str = USER) -> httpx.Response:
    page = await browser.get("/authorize", params=params)
    assert page.status_code == 200, page.text
    return await browser.post("/authorize/login", data={"txn": hidden_value(page.text, "txn"), "sub": sub})


async def redeem(browser: httpx.AsyncClient, code: str, verifier: str, **overrides: str) -> httpx.Response:
    fields = {
        "grant_type": "authorization_code",
        "client_id": NATIVE_ID,
        "code": code,
        "redirect_uri": CALLBACK,
        "code_verifier": verifier,
        **overrides,
    }
    return await browser.post("/oauth/token", data=fields)


async def code_for(browser: httpx.AsyncClient, callbacks: Callbacks, challenge: str, **overrides: str) -> str:
    await sign_in(browser, authorize_params(challenge, **overrides))
    return callbacks.seen[-1]["code"]


async def test_sign_in_page_then_code_then_my_account_token_and_id_token(
    browser: httpx.AsyncClient, callbacks: Callbacks, tenant: EmulatorState
) -> None:
    verifier, challenge = pkce_pair()

    page = await browser.get("/authorize", params=authorize_params(challenge))
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script" not in page.text.lower()
    assert "form-action 'self' http://127.0.0.1:5123" in policy
    assert "Continue as Alice (auth0|alice)" in page.text
    landed = await browser.post("/authorize/login", data={"txn": hidden_value(page.text, "txn"), "sub": USER})

    assert str(landed.url).startswith(CALLBACK + "?")
    assert set(callbacks.seen[-1]) == {"code", "state"} and callbacks.seen[-1]["state"] == "xyz-state"
    answer = await redeem(browser, callbacks.seen[-1]["code"], verifier)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "openid create:me:connected_accounts"
    assert "refresh_token" not in body
    claims = tenant.verify_access_token(body["access_token"])
    assert claims["sub"] == USER and claims["azp"] == NATIVE_ID
    assert claims["aud"] == [ME, ISSUER + "userinfo"] and claims["scope"] == body["scope"]
    id_claims = tenant.verify_access_token(body["id_token"])
    assert (id_claims["aud"], id_claims["nonce"], id_claims["name"]) == (NATIVE_ID, "n-1", "Alice")


async def test_auto_login_redirects_at_once_without_a_page(
    browser: httpx.AsyncClient, callbacks: Callbacks
) -> None:
    await browser.post("/emulator/users", json={"sub": BOB, "name": "Bob"})
    assert (await browser.post("/emulator/login", json={"sub": BOB})).json() == {"sub": BOB}
    verifier, challenge = pkce_pair()

    first = await browser.get("/authorize", params=authorize_params(challenge), follow_redirects=False)
    assert first.status_code == 302 and first.headers["location"].startswith(CALLBACK + "?code=")
    await browser.get(first.headers["location"])
    tokens = (await redeem(browser, callbacks.seen[-1]["code"], verifier)).json()
    assert tokens["id_token"] and "access_token" in tokens

    await browser.post("/emulator/login", json={"sub": None})
    again = await browser.get("/authorize", params=authorize_params(challenge), follow_redirects=False)
    assert again.status_code == 200 and "Sign in" in again.text
    unknown = await browser.post("/emulator/login", json={"sub": "auth0|nobody"})
    assert unknown.status_code == 404


async def test_a_code_works_once(browser: httpx.AsyncClient, callbacks: Callbacks) -> None:
    verifier, challenge = pkce_pair()
    code = await code_for(browser, callbacks, challenge)

    assert (await redeem(browser, code, verifier)).status_code == 200
    assert error_of(await redeem(browser, code, verifier)) == (403, "invalid_grant")


async def test_an_expired_code_is_refused(
    browser: httpx.AsyncClient, callbacks: Callbacks, clock: FakeClock, tenant: EmulatorState
) -> None:
    verifier, challenge = pkce_pair()
    code = await code_for(browser, callbacks, challenge)
    clock.advance(tenant.code_expires_in)

    assert error_of(await redeem(browser, code, verifier)) == (403, "invalid_grant")


async def test_a_wrong_verifier_is_refused_and_burns_the_code(browser: httpx.AsyncClient, callbacks: Callbacks) -> None:
    verifier, challenge = pkce_pair()
    other_verifier, _ = pkce_pair()
    code = await code_for(browser, callbacks, challenge)

    answer = await redeem(browser, code, other_verifier)
    assert error_of(answer) == (403, "invalid_grant")
    assert "code verifier" in answer.json()["error_description"]
    assert error_of(await redeem(browser, code, verifier)) == (403, "invalid_grant")


async def test_another_redirect_uri_or_client_is_refused(browser: httpx.AsyncClient, callbacks: Callbacks) -> None:
    verifier, challenge = pkce_pair()
    code = await code_for(browser, callbacks, challenge)
    assert error_of(await redeem(browser, code, verifier, redirect_uri="http://127.0.0.1:5999/callback")) == (
        403,
        "invalid_grant",
    )
    code = await code_for(browser, callbacks, challenge)
    answer = await redeem(browser, code, verifier, client_id=OTHER_CLIENT_ID, client_secret="other-secret")
    assert error_of(answer) == (403, "invalid_grant")


async def test_a_confidential_client_must_authenticate(browser: httpx.AsyncClient, callbacks: Callbacks) -> None:
    verifier, challenge = pkce_pair()
    params = {"client_id": CLIENT_ID, "redirect_uri": WEB_CALLBACK, "audience": API, "scope": "openid read:market"}
    code = await code_for(browser, callbacks, challenge, **params)
    without = await redeem(browser, code, verifier, client_id=CLIENT_ID, redirect_uri=WEB_CALLBACK)
    assert error_of(without) == (401, "access_denied")

    code = await code_for(browser, callbacks, challenge, **params)
    fields = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uri": WEB_CALLBACK}
    assert (await redeem(browser, code, verifier, **fields)).status_code == 200


async def test_api_tokens_carry_each_users_own_permissions(
    browser: httpx.AsyncClient, callbacks: Callbacks, tenant: EmulatorState
) -> None:
    tenant.add_api(API, ["read:market", "manage:broker"])
    await browser.post("/emulator/users", json={"sub": BOB, "permissions": {API: ["read:market", "manage:broker"]}})
    await browser.post("/emulator/users", json={"sub": USER, "permissions": {API: ["read:market"]}})
    verifier, challenge = pkce_pair()
    params = {"audience": API, "scope": "openid read:market manage:broker offline_access"}

    granted = {}
    for sub in (BOB, USER):
        await sign_in(browser, authorize_params(challenge, **params), sub=sub)
        body = (await redeem(browser, callbacks.seen[-1]["code"], verifier)).json()
        claims = tenant.verify_access_token(body["access_token"])
        granted[sub] = (claims["scope"], claims["permissions"], "refresh_token" in body)

    assert granted[BOB] == ("openid read:market manage:broker", ["read:market", "manage:broker"], True)
    assert granted[USER] == ("openid read:market", ["read:market"], True)


async def test_my_account_scopes_beyond_the_clients_grant_are_dropped(
    browser: httpx.AsyncClient, callbacks: Callbacks, tenant: EmulatorState
) -> None:
    tenant.add_client(NATIVE_ID, native=True, loopback_callbacks=True, my_account_scopes=MY_ACCOUNT_SCOPES[:1])
    verifier, challenge = pkce_pair()
    scope = "openid create:me:connected_accounts delete:me:connected_accounts made:up"
    code = await code_for(browser, callbacks, challenge, scope=scope)

    assert (await redeem(browser, code, verifier)).json()["scope"] == "openid create:me:connected_accounts"


async def test_a_client_without_a_my_account_grant_is_refused_at_the_redirect(
    browser: httpx.AsyncClient, callbacks: Callbacks, tenant: EmulatorState
) -> None:
    _, challenge = pkce_pair()
    params = authorize_params(challenge, client_id=CLIENT_ID, redirect_uri=WEB_CALLBACK)
    await browser.get("/authorize", params=params)

    assert callbacks.seen[-1]["error"] == "access_denied"
    assert callbacks.seen[-1]["state"] == "xyz-state" and "client-grant" in callbacks.seen[-1]["error_description"]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"code_challenge": ""}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"audience": "https://unknown.example/"}, "access_denied"),
        ({"prompt": "none"}, "login_required"),
    ],
)
async def test_bad_requests_go_back_to_a_trusted_redirect_with_the_state(
    browser: httpx.AsyncClient, callbacks: Callbacks, overrides: dict[str, str], error: str
) -> None:
    _, challenge = pkce_pair()
    landed = await browser.get("/authorize", params=authorize_params(challenge, **overrides))

    assert urlsplit(str(landed.url)).path == "/callback"
    assert callbacks.seen[-1]["error"] == error and callbacks.seen[-1]["state"] == "xyz-state"
    assert callbacks.seen[-1]["error_description"] and "code" not in callbacks.seen[-1]


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_id": "nobody"},
        {"redirect_uri": "https://evil.example/callback"},
        {"redirect_uri": ""},
        {"client_id": CLIENT_ID, "redirect_uri": "http://127.0.0.1:5123/callback"},  # no loopback for it
        {"redirect_uri": "http://127.0.0.1.evil.example:5123/callback"},
        {"redirect_uri": "http://user@127.0.0.1:5123/callback"},
        {"redirect_uri": "https://app.example/callback/extra"},
    ],
)
async def test_untrusted_redirects_get_an_error_page_and_no_redirect(
    browser: httpx.AsyncClient, callbacks: Callbacks, overrides: dict[str, str]
) -> None:
    _, challenge = pkce_pair()
    answer = await browser.get("/authorize", params=authorize_params(challenge, **overrides), follow_redirects=False)

    assert answer.status_code == 400 and answer.headers["content-type"].startswith("text/html")
    assert callbacks.seen == []


async def test_a_wrong_user_id_shows_the_page_again_and_an_expired_page_is_refused(
    browser: httpx.AsyncClient, callbacks: Callbacks, clock: FakeClock
) -> None:
    _, challenge = pkce_pair()
    page = await browser.get("/authorize", params=authorize_params(challenge))
    txn = hidden_value(page.text, "txn")

    wrong = await browser.post("/authorize/login", data={"txn": txn, "sub": "auth0|nobody"})
    assert wrong.status_code == 400 and "Wrong user id." in wrong.text and callbacks.seen == []
    clock.advance(601)
    expired = await browser.post("/authorize/login", data={"txn": txn, "sub": USER})
    assert expired.status_code == 400 and "expired" in expired.text and callbacks.seen == []
    forged = await browser.post("/authorize/login", data={"txn": "forged", "sub": USER})
    assert forged.status_code == 400 and callbacks.seen == []


async def test_hostile_state_and_user_names_are_escaped(
    browser: httpx.AsyncClient, callbacks: Callbacks, tenant: EmulatorState
) -> None:
    hostile = '"><script>alert(1)</script>'
    tenant.add_user("auth0|<img src=x onerror=alert(2)>", name=hostile)
    _, challenge = pkce_pair()
    page = await browser.get("/authorize", params=authorize_params(challenge, state=hostile))

    assert "<script>" not in page.text and "<img" not in page.text
    assert "&lt;script&gt;" in page.text and "&lt;img src=x" in page.text
    await browser.post("/authorize/login", data={"txn": hidden_value(page.text, "txn"), "sub": USER})
    assert callbacks.seen[-1]["state"] == hostile  # echoed exactly, URL-encoded on the way
    error_page = await browser.get("/authorize", params=authorize_params(challenge, client_id=hostile))
    assert "<script>" not in error_page.text and "&lt;script&gt;" in error_page.text


async def test_discovery_names_the_authorization_endpoint(browser: httpx.AsyncClient) -> None:
    config: dict[str, Any] = (await browser.get("/.well-known/openid-configuration")).json()

    assert config["authorization_endpoint"] == ISSUER + "authorize"
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert "authorization_code" in config["grant_types_supported"]

