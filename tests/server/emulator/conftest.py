"""A small tenant served in process through httpx.ASGITransport."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from joserfc.jwk import RSAKey

from server.emulator import EmulatorState, create_app
from server.emulator.keys import generate_signing_key
from server.emulator.state import MY_ACCOUNT_SCOPES
from tests.server.emulator.helpers import (
    API,
    API_SCOPES,
    CLIENT_ID,
    CLIENT_SECRET,
    ISSUER,
    NATIVE_ID,
    OTHER_CLIENT_ID,
    OTHER_SECRET,
    USER,
    WEB_CALLBACK,
    Callbacks,
    FakeClock,
)


@pytest.fixture(scope="session")
def signing_key() -> RSAKey:
    # One RSA key for the session: generating one per test would dominate the run time.
    return generate_signing_key("test-kid")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(signing_key: RSAKey, clock: FakeClock) -> EmulatorState:
    tenant = EmulatorState(ISSUER, clock=clock, signing_key=signing_key)
    tenant.add_api(API, API_SCOPES)
    tenant.add_client(CLIENT_ID, CLIENT_SECRET)
    tenant.add_client(OTHER_CLIENT_ID, OTHER_SECRET)
    tenant.add_client(NATIVE_ID, native=True)
    tenant.add_user(USER)
    tenant.connect_account(USER, "github", ["repo:read", "repo:write", "read:user"])
    tenant.device_interval = 0
    return tenant


@pytest.fixture
async def http(state: EmulatorState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as client:
        yield client


@pytest.fixture
def callbacks() -> Callbacks:
    return Callbacks()


@pytest.fixture
def tenant(state: EmulatorState) -> EmulatorState:
    state.add_client(NATIVE_ID, native=True, loopback_callbacks=True, my_account_scopes=MY_ACCOUNT_SCOPES)
    state.add_client(CLIENT_ID, CLIENT_SECRET, callbacks=(WEB_CALLBACK,))
    state.add_user(USER, name="Alice")
    return state


@pytest.fixture
async def browser(tenant: EmulatorState, callbacks: Callbacks) -> AsyncIterator[httpx.AsyncClient]:
    """A client that follows redirects between the tenant and the app's callbacks, like a browser."""
    mounts = {
        ISSUER.rstrip("/"): httpx.ASGITransport(app=create_app(tenant)),
        "http://127.0.0.1:5123": httpx.ASGITransport(app=callbacks),
        "https://app.example": httpx.ASGITransport(app=callbacks),
    }
    async with httpx.AsyncClient(mounts=mounts, base_url=ISSUER, follow_redirects=True) as client:
        yield client
