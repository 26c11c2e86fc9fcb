"""Token Vault brokering against the emulator: error mapping, single flight, and the reuse cache's limits."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.auth0.client import TOKEN_VAULT_GRANT, Auth0Error
from server.errors import AccountNotConnected, BrokerError, RateLimited, VaultDenied, VaultUnavailable
from server.vault import NOT_WITHIN, REUSE_FOR, TokenVault, map_exchange_error
from tests.server.tenant import METHODS, USER, Sleeps, auth0_client, make_tenant, other_key, user_subject


@pytest.mark.parametrize(
    ("status", "error", "description", "expected"),
    [
        (None, None, None, VaultUnavailable),
        (500, "server_error", None, VaultUnavailable),
        (503, None, None, VaultUnavailable),
        (200, None, None, VaultUnavailable),  # an unreadable success
        (401, "federated_connection_refresh_token_not_found", "Federated connection Refresh Token not found.",
         AccountNotConnected),
        (401, "tokenset_not_found", None, AccountNotConnected),
        (401, "invalid_grant", "The connected account's refresh token has expired.", AccountNotConnected),
        (400, "invalid_request", "No token set for this federated connection.", AccountNotConnected),
        (401, "access_denied", "Unauthorized", VaultDenied),  # the broker's client authentication
        (401, "invalid_client", None, VaultDenied),
        (401, "invalid_grant", "Invalid refresh token.", VaultDenied),
        (403, "unauthorized_client", "Grant type not allowed for the client.", VaultDenied),
        (403, "access_denied", "The connected account did not grant the scopes", VaultDenied),
        (400, "invalid_request", "Missing required parameter: connection", VaultDenied),
    ],
)
def test_auth0_answers_map_to_spec_codes(
    status: int | None, error: str | None, description: str | None, expected: type[BrokerError]
) -> None:
    mapped = map_exchange_error(Auth0Error("x", status=status, error=error, description=description), "github")
    assert type(mapped) is expected
    assert "refunded" in mapped.message
    if expected is AccountNotConnected:
        assert "reconnect github" in mapped.message


def test_messages_say_what_to_do() -> None:
    def text(**kw: object) -> str:
        return map_exchange_error(Auth0Error("x", **kw), "github").message  # type: ignore[arg-type]

    assert "client authentication" in text(status=401, error="access_denied")
    assert "not allowed to use Token Vault" in text(status=403, error="unauthorized_client")
    assert "try again" in text(status=503)
    limited = map_exchange_error(Auth0Error("x", status=429, retry_after=6.2), "github")
    assert isinstance(limited, RateLimited) and limited.retry_after == 7 and "retry in 7 seconds" in limited.message
    assert text(status=429).endswith("retry in 1 second")


@pytest.mark.parametrize("method", METHODS)
async def test_wrong_client_credentials_are_vault_denied_after_one_request(method: str) -> None:
    state = make_tenant()
    sleeps = Sleeps()
    wrong = {"key": other_key()} if method == "private_key_jwt" else {"secret": "not-the-secret"}
    auth0 = auth0_client(state, method=method, sleep=sleeps, **wrong)  # type: ignore[arg-type]
    try:
        with pytest.raises(VaultDenied, match="client authentication"):
            await TokenVault(auth0).fetch(USER, user_subject(state), "github", ["repo:read"], None)
    finally:
        await auth0.aclose()
    assert len(state.requests) == 1 and sleeps.calls == []


async def test_concurrent_same_asks_share_one_exchange_and_different_asks_do_not() -> None:
    state = make_tenant()
    state.add_user("auth0|bob")
    state.connect_account("auth0|bob", "github", ["repo:read", "repo:write"])
    auth0 = auth0_client(state)
    vault = TokenVault(auth0)
    alice, bob = user_subject(state), user_subject(state, "auth0|bob")
    try:
        same = await asyncio.gather(*(vault.fetch(USER, alice, "github", ["repo:read"], None) for _ in range(20)))
        others = await asyncio.gather(
            vault.fetch(USER, alice, "github", ["repo:read", "repo:write"], None),  # another scope set
            vault.fetch("auth0|bob", bob, "github", ["repo:read"], None),  # another account
            vault.fetch(USER, alice, "github", ["repo:read"], "octocat"),  # another login_hint
        )
    finally:
        await auth0.aclose()
    assert len({t.access_token for t in same}) == 1
    assert len({t.access_token for t in [same[0], *others]}) == 4
    assert len([r for r in state.requests if r.grant_type == TOKEN_VAULT_GRANT]) == 4
    assert [i.sub for i in state.vault_issues].count("auth0|bob") == 1


async def test_a_failed_shared_exchange_fails_every_waiter_and_is_not_cached() -> None:
    state = make_tenant()
    state.revoke_connection(USER, "github")
    auth0 = auth0_client(state)
    vault = TokenVault(auth0)
    subject = user_subject(state)
    try:
        results = await asyncio.gather(
            *(vault.fetch(USER, subject, "github", ["repo:read"], None) for _ in range(5)), return_exceptions=True
        )
        state.connect_account(USER, "github", ["repo:read"])
        token = await vault.fetch(USER, subject, "github", ["repo:read"], None)
    finally:
        await auth0.aclose()
    assert all(isinstance(r, AccountNotConnected) for r in results)
    assert token.scopes == ("repo:read",)
    assert len(state.requests) == 2


async def test_reuse_only_for_the_same_exact_ask_and_not_past_sixty_seconds() -> None:
    state = make_tenant()
    now = [time.time()]
    auth0 = auth0_client(state)
    vault = TokenVault(auth0, clock=lambda: now[0])
    subject = user_subject(state)
    try:
        first = await vault.fetch(USER, subject, "github", ["repo:read", "read:user"], None)
        now[0] += REUSE_FOR - 1
        again = await vault.fetch(USER, subject, "github", ["read:user", "repo:read"], None)  # same set
        subset = await vault.fetch(USER, subject, "github", ["repo:read"], None)  # not the same set
        now[0] += 2
        later = await vault.fetch(USER, subject, "github", ["repo:read", "read:user"], None)
    finally:
        await auth0.aclose()
    assert again.access_token == first.access_token
    assert subset.access_token != first.access_token and subset.scopes == ("repo:read",)
    assert later.access_token != first.access_token


async def test_a_token_close_to_expiry_is_never_reused() -> None:
    state = make_tenant()
    state.vault_token_expires_in = int(NOT_WITHIN) + 10
    now = [time.time()]
    auth0 = auth0_client(state)
    vault = TokenVault(auth0, clock=lambda: now[0])
    subject = user_subject(state)
    try:
        first = await vault.fetch(USER, subject, "github", ["repo:read"], None)
        now[0] += 5
        assert (await vault.fetch(USER, subject, "github", ["repo:read"], None)) is first
        now[0] += 6  # now within NOT_WITHIN seconds of its expiry
        fresh = await vault.fetch(USER, subject, "github", ["repo:read"], None)
        state.vault_token_expires_in = int(NOT_WITHIN) - 1  # born too close to expiry: never cached
        short = await vault.fetch(USER, subject, "github", ["repo:write"], None)
        again = await vault.fetch(USER, subject, "github", ["repo:write"], None)
    finally:
        await auth0.aclose()
    assert fresh.access_token != first.access_token
    assert again.access_token != short.access_token
