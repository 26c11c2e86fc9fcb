"""`create_browser_app`: only the sign-in and consent pages, mounted under a prefix on another origin (as the
demo mounts them on the broker's), with their forms posting back under the mount and `state.browser_url`
named in the `connect_uri`; the back channel stays at the issuer."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from server.emulator import EmulatorState, create_app, create_browser_app
from tests.server.emulator.helpers import ISSUER, USER, Callbacks, hidden_value, pkce_pair
from tests.server.emulator.test_authorize import authorize_params, redeem
from tests.server.emulator.test_my_account import CONNECT_SCOPES, bearer, connect_body

ELSEWHERE = "http://127.0.0.1:8600"  # the origin the pages are mounted on (the broker's, in the demo)
MOUNT = "/demo-tenant"


@pytest.fixture
async def visitor(tenant: EmulatorState, callbacks: Callbacks) -> AsyncIterator[httpx.AsyncClient]:
    """A redirect-following browser that reaches the pages only at ELSEWHERE + MOUNT; the issuer is the back
    channel (the code exchange, the My Account API)."""
    tenant.add_connection("slack", CONNECT_SCOPES)
    tenant.browser_url = ELSEWHERE + MOUNT + "/"
    mounts = {
        ISSUER.rstrip("/"): httpx.ASGITransport(app=create_app(tenant)),
        ELSEWHERE: httpx.ASGITransport(app=Starlette(routes=[Mount(MOUNT, app=create_browser_app(tenant))])),
        "http://127.0.0.1:5123": httpx.ASGITransport(app=callbacks),
    }
    async with httpx.AsyncClient(mounts=mounts, base_url=ISSUER, follow_redirects=True) as client:
        yield client


async def test_the_mounted_sign_in_and_consent_post_back_under_the_mount_and_connect(
    visitor: httpx.AsyncClient, callbacks: Callbacks, tenant: EmulatorState
) -> None:
    verifier, challenge = pkce_pair()
    page = await visitor.get(ELSEWHERE + MOUNT + "/authorize", params=authorize_params(challenge))
    assert page.status_code == 200
    assert f'action="{MOUNT}/authorize/login"' in page.text
    assert "form-action 'self' http://127.0.0.1:5123" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "same-origin"  # a form POST carries its Origin, not `null`
    await visitor.post(ELSEWHERE + MOUNT + "/authorize/login", data={"txn": hidden_value(page.text, "txn"),
                                                                    "sub": USER})
    code = callbacks.seen[-1]["code"]
    token = (await redeem(visitor, code, verifier)).json()["access_token"]

    started = await visitor.post(ISSUER + "me/v1/connected-accounts/connect", json=connect_body(challenge),
                                 headers=bearer(token))
    assert started.status_code == 201, started.text
    assert started.json()["connect_uri"] == ELSEWHERE + MOUNT + "/connect"
    consent = await visitor.get(started.json()["connect_uri"], params=started.json()["connect_params"])
    assert consent.status_code == 200 and f'action="{MOUNT}/connect"' in consent.text
    await visitor.post(ELSEWHERE + MOUNT + "/connect", data={"ticket": hidden_value(consent.text, "ticket"),
                                                            "decision": "approve"})
    assert callbacks.seen[-1]["state"] == "st-1" and callbacks.seen[-1]["connect_code"]


async def test_without_browser_url_the_connect_uri_is_the_issuers(
    tenant: EmulatorState, http: httpx.AsyncClient
) -> None:
    tenant.add_connection("slack", CONNECT_SCOPES)
    token = tenant.mint_access_token(USER, audience=ISSUER + "me/", scopes=["create:me:connected_accounts"],
                                     azp="cli")
    _, challenge = pkce_pair()
    started = await http.post("/me/v1/connected-accounts/connect", json=connect_body(challenge),
                              headers=bearer(token))
    assert started.status_code == 201, started.text
    assert started.json()["connect_uri"] == ISSUER + "connect"


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/oauth/token"), ("GET", "/.well-known/jwks.json"), ("POST", "/me/v1/connected-accounts/connect"),
    ("POST", "/emulator/tokens"), ("GET", "/provider/github/user"),
])
async def test_the_browser_app_serves_no_back_channel(visitor: httpx.AsyncClient, method: str, path: str) -> None:
    answer = await visitor.request(method, ELSEWHERE + MOUNT + path)
    assert answer.status_code in (404, 405)
