"""A small emulated tenant and Auth0 clients pointed at it in process, for the Auth0-facing tests.

The broker's client has a secret *and* a registered public key, so one tenant accepts all three
client authentication methods. Backoff pauses go through `Sleeps`, which records them and
returns at once: no test waits for real.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import httpx
from joserfc.jwk import RSAKey

from server.auth0.client import Auth0Client, RetryPolicy
from server.emulator import EmulatorState, create_app
from server.emulator.keys import generate_signing_key
from server.principal import SubjectToken

ISSUER = "https://tenant.test/"
AUDIENCE = "https://api.test/"
SCOPES = ["read:market", "read:balance", "buy:quota", "request:token"]
BROKER_ID = "broker"
BROKER_SECRET = "broker-secret-value"
NATIVE_ID = "cli"
USER = "auth0|alice"
GITHUB_SCOPES = ["repo:read", "repo:write", "read:user"]
METHODS = ("client_secret_post", "client_secret_basic", "private_key_jwt")


@functools.cache
def signing_key() -> RSAKey:
    return generate_signing_key("tenant-kid")


@functools.cache
def client_key() -> RSAKey:
    """The broker's private_key_jwt key (its public half is registered with the tenant)."""
    return RSAKey.generate_key(2048, private=True)


@functools.cache
def other_key() -> RSAKey:
    """A key the tenant does not know."""
    return RSAKey.generate_key(2048, private=True)


def pem(key: RSAKey) -> bytes:
    return key.as_pem(private=True)


def make_tenant(clock: Callable[[], float] = time.time) -> EmulatorState:
    state = EmulatorState(ISSUER, clock=clock, signing_key=signing_key())
    state.add_api(AUDIENCE, SCOPES)
    state.add_client(BROKER_ID, BROKER_SECRET, public_key_pem=client_key().as_pem(private=False).decode())
    state.add_client(NATIVE_ID, native=True)
    state.add_user(USER)
    state.connect_account(USER, "github", GITHUB_SCOPES)
    return state


class Sleeps:
    """An instant stand-in for asyncio.sleep that records every pause asked for."""

    def __init__(self, then: Callable[[float], None] | None = None) -> None:
        self.calls: list[float] = []
        self._then = then

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        if self._then is not None:
            self._then(seconds)


def transport(state: EmulatorState) -> httpx.AsyncBaseTransport:
    return httpx.ASGITransport(app=create_app(state, admin=False))


def auth0_client(
    state: EmulatorState,
    *,
    method: str = "client_secret_post",
    secret: str | None = BROKER_SECRET,
    key: RSAKey | None = None,
    sleep: Sleeps | None = None,
    deadline: float = 2.0,
    client_id: str = BROKER_ID,
    **kw: Any,
) -> Auth0Client:
    """The broker's client against `state`; `key` defaults to the registered one for private_key_jwt."""
    if method == "private_key_jwt" and key is None:
        key = client_key()
    return Auth0Client(
        ISSUER,
        client_id,
        secret,
        auth_method=method,
        private_key_pem=pem(key) if key is not None else None,
        transport=transport(state),
        retry=RetryPolicy(deadline=deadline, **kw),
        sleep=sleep or Sleeps(),
    )


def user_subject(state: EmulatorState, sub: str = USER) -> SubjectToken:
    """An access token of `sub` for the tenant's API: the Token Vault subject remote callers bring."""
    return SubjectToken(state.mint_access_token(sub, audience=AUDIENCE, scopes=SCOPES, azp="agent"), "access_token")


def token_requests(state: EmulatorState, grant_type: str | None = None) -> list[Any]:
    return [
        r for r in state.requests if r.path == "/oauth/token" and (grant_type is None or r.grant_type == grant_type)
    ]
