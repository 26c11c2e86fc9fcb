"""The stdio identity: one refresh for a burst, renewal before expiry, the subject Token Vault gets,
and what a refused or unreachable refresh means to the user."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import Runtime, open_runtime
from server.auth0.client import TOKEN_VAULT_GRANT
from server.auth0.identity import StdioIdentity
from server.auth0.login import StoredLogin, write_credentials
from server.auth0.token_verifier import JwtVerifier
from server.broker import Call
from server.clock import ManualClock
from server.config import load_config
from server.emulator import EmulatorState, create_app
from server.errors import RateLimited, Unauthenticated, VaultUnavailable
from server.principal import Principal
from tests.conftest import DEMO_NOW, demo_client, ok
from tests.server.tenant import AUDIENCE, BROKER_ID, NATIVE_ID, SCOPES, USER, auth0_client, make_tenant, token_requests

ASK = {"connection": "github", "scopes": ["repo:read"], "purpose": "burst"}


async def test_a_burst_of_fifty_calls_on_a_cold_cache_makes_one_identity_request(runtime: Runtime) -> None:
    assert runtime.tenant is not None
    state = runtime.tenant.state
    buyer = Principal(account=runtime.tenant.account, agent="setup", scopes=frozenset(SCOPES))
    await runtime.broker.buy_quota(  # straight to the broker: the identity stays cold
        Call("buy_quota", "buy:quota", "test"), buyer, listing_id="github-repo-read", units=50, max_unit_price=1000,
        idempotency_key=None,
    )
    assert state.requests == []
    async with demo_client(runtime) as client:
        tokens = await asyncio.gather(*(ok(client, "request_token", ASK) for _ in range(50)))
    assert len(token_requests(state, "refresh_token")) == 1
    assert len(token_requests(state, TOKEN_VAULT_GRANT)) == 1  # and one exchange, reused by the other 49
    assert len({t["access_token"] for t in tokens}) == 1
    [holding] = await runtime.db.read(lambda tx: tx.holdings_of(buyer.account))
    assert (holding.units_held, holding.units_reserved, holding.units_consumed) == (0, 0, 50)


def identity_for(
    state: EmulatorState, refresh_client: str, clock: Callable[[], float] = time.time, **client_kw: Any
) -> StdioIdentity:
    auth0 = auth0_client(state, **client_kw)
    token = state.issue_refresh_token(USER, refresh_client, [*SCOPES, "offline_access"], AUDIENCE)
    return StdioIdentity(auth0, JwtVerifier(auth0, AUDIENCE), token, refresh_client, clock=clock)


async def test_the_identity_is_renewed_shortly_before_it_expires() -> None:
    state = make_tenant()
    state.access_token_expires_in = 3600
    now = [time.time()]
    identity = identity_for(state, BROKER_ID, clock=lambda: now[0])
    first = await identity.principal()
    now[0] += 3600 - 70
    assert await identity.principal() is first
    now[0] += 20  # inside the last minute
    renewed = await identity.principal()
    assert renewed is not first and renewed.account == USER
    assert len(token_requests(state, "refresh_token")) == 2


async def test_a_login_of_another_client_uses_the_access_token_as_subject() -> None:
    state = make_tenant()
    native = identity_for(state, NATIVE_ID)
    own = identity_for(state, BROKER_ID)
    assert not native.uses_refresh_subject and own.uses_refresh_subject
    native_principal, own_principal = await native.principal(), await own.principal()
    assert native_principal.subject is not None and native_principal.subject.kind == "access_token"
    assert own_principal.subject is not None and own_principal.subject.kind == "refresh_token"
    native_refresh, own_refresh = token_requests(state, "refresh_token")
    assert (native_refresh.client_id, native_refresh.auth_method) == (NATIVE_ID, "none")
    assert "client_secret" not in native_refresh.fields  # the server's secret never goes with a public client
    assert (own_refresh.client_id, own_refresh.auth_method) == (BROKER_ID, "client_secret_post")


@pytest.mark.parametrize(
    ("fault", "expected", "words"),
    [
        ("wrong-secret", Unauthenticated, "client authentication"),
        ("revoked-login", Unauthenticated, "token-vault-mcp login"),
        ("outage", VaultUnavailable, "try again"),
        ("rate-limit", RateLimited, "retry in 9 seconds"),
    ],
)
async def test_refresh_failures_are_answers_a_user_can_act_on(fault: str, expected: type, words: str) -> None:
    state = make_tenant()
    identity = identity_for(state, BROKER_ID, secret="wrong" if fault == "wrong-secret" else "broker-secret-value")
    if fault == "revoked-login":
        state.refresh_tokens.clear()
    elif fault == "outage":
        state.faults.fail_next(503, count=10)
    elif fault == "rate-limit":
        state.faults.rate_limit_next(count=10, retry_after=9, reset_in=None)
    results = await asyncio.gather(*(identity.principal() for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, expected) and words in str(r) for r in results), results
    attempts = 3 if fault == "outage" else 1
    assert len(state.requests) == attempts  # ten callers, one shared (failed) refresh


async def test_serve_with_a_login_stored_refresh_token_of_the_native_client_uses_the_access_token_subject(
    tmp_path: Path,
) -> None:
    """SPEC §3/§4: the login client's refresh token cannot be a Token Vault subject of the broker's client."""
    state = make_tenant()
    refresh = state.issue_refresh_token(USER, NATIVE_ID, [*SCOPES, "offline_access"], AUDIENCE)
    credentials = tmp_path / "cfg" / "credentials.json"
    write_credentials(credentials, StoredLogin(refresh, client_id=NATIVE_ID, issuer=state.issuer, account=USER))
    market = tmp_path / "market.toml"
    market.write_text(
        '[[listing]]\nid = "gh"\ntitle = "GitHub read"\nconnection = "github"\nscopes = ["repo:read"]\n'
        'supply = 10\nstart_price = 10\nfloor_price = 5\nopens_at = 2026-01-01T00:00:00Z\n'
        'closes_at = 2030-01-01T00:00:00Z\n'
    )
    config = load_config(
        {
            "AUTH0_DOMAIN": state.issuer, "AUTH0_CLIENT_ID": BROKER_ID, "AUTH0_CLIENT_SECRET": "broker-secret-value",
            "AUTH0_AUDIENCE": AUDIENCE, "TVM_DATABASE": str(tmp_path / "v.db"), "TVM_MARKET_FILE": str(market),
            "TVM_CREDENTIALS_FILE": str(credentials),  # no TVM_LOGIN_CLIENT_ID: the file says whose token it is
        },
        dotenv=False,
    )
    runtime = await open_runtime(
        config, clock=ManualClock(DEMO_NOW), auth0_transport=httpx.ASGITransport(app=create_app(state))
    )
    try:
        await runtime.broker.credit(USER, 100)
        async with demo_client(runtime) as client:
            await ok(client, "buy_quota", {"listing_id": "gh", "units": 1, "max_unit_price": 10})
            token = await ok(client, "request_token", ASK)
    finally:
        await runtime.aclose()
    [exchange] = token_requests(state, TOKEN_VAULT_GRANT)
    assert exchange.fields["subject_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert exchange.client_id == BROKER_ID
    assert exchange.fields["subject_token"] != refresh
    [refreshed] = token_requests(state, "refresh_token")
    assert refreshed.client_id == NATIVE_ID
    assert token["access_token"] == state.vault_issues[0].access_token
