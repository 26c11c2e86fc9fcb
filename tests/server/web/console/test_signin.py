"""Sessions and sign-in state, without a browser: single use, expiry, the browser that began a sign-in."""

from __future__ import annotations

import httpx
import pytest

from server.auth0.client import Auth0Client
from server.auth0.token_verifier import JwtVerifier
from server.emulator import create_app, demo_tenant
from server.web.console.session import LINK_SECONDS, SESSION_SECONDS, Sessions
from server.web.console.signin import Auth0SignIn, SignInRefused


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_one_time_link_works_once_and_not_after_it_expires() -> None:
    clock = Clock()
    sessions = Sessions(clock)
    token = sessions.one_time_link("console:alice")
    assert sessions.redeem(token) == "console:alice"
    assert sessions.redeem(token) is None
    late = sessions.one_time_link("console:alice")
    clock.now += LINK_SECONDS + 1
    assert sessions.redeem(late) is None and sessions.redeem("") is None


def test_a_session_expires_and_checks_its_csrf_token_exactly() -> None:
    clock = Clock()
    sessions = Sessions(clock)
    secret, session = sessions.open("console:alice")
    assert sessions.get(secret) == session and session.csrf_ok(session.csrf)
    assert not session.csrf_ok("") and not session.csrf_ok(None) and not session.csrf_ok(session.csrf + "x")
    clock.now += SESSION_SECONDS
    assert sessions.get(secret) is None
    other, _ = sessions.open("console:bob")
    sessions.close(other)
    assert sessions.get(other) is None and sessions.get(None) is None


async def test_a_sign_in_is_refused_for_an_unknown_state_or_another_browser() -> None:
    tenant = demo_tenant("https://tenant.test/")
    auth0 = Auth0Client("https://tenant.test", tenant.client_id, tenant.client_secret,
                        transport=httpx.ASGITransport(app=create_app(tenant.state)))
    try:
        signin = Auth0SignIn(auth0, JwtVerifier(auth0, tenant.audience), tenant.audience, tenant.client_id, None)
        url, browser = signin.begin("http://127.0.0.1:9/console/callback")
        assert url.startswith("https://tenant.test/authorize?") and "code_challenge_method=S256" in url
        assert f"client_id={tenant.client_id}" in url and "state=" in url
        state = url.split("state=", 1)[1].split("&", 1)[0]
        with pytest.raises(SignInRefused, match="another browser") as refused:
            await signin.finish(state, "a-code", "another-browsers-cookie")
        assert refused.value.status == 400
        with pytest.raises(SignInRefused, match="unknown or too old"):  # a state is good for one try
            await signin.finish(state, "a-code", browser)
        with pytest.raises(SignInRefused, match="unknown or too old"):
            await signin.finish("made-up", "a-code", browser)
    finally:
        await auth0.aclose()
