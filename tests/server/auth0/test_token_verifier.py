"""JwtVerifier against the emulator's JWKS: what it accepts, and that unknown kids cannot hammer the tenant."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from server.auth0.client import Auth0Client
from server.auth0.token_verifier import InvalidToken, JwtVerifier
from server.emulator import EmulatorState, create_app
from server.principal import Principal

ISSUER = "https://tenant.test/"
AUDIENCE = "https://api.test/"


@pytest.fixture
def state() -> EmulatorState:
    s = EmulatorState(issuer=ISSUER)
    s.add_api(AUDIENCE, ["read:market", "buy:quota"])
    return s


class CountingTransport(httpx.AsyncBaseTransport):
    """The emulator in process, counting the requests per path."""

    def __init__(self, state: EmulatorState) -> None:
        self.inner = httpx.ASGITransport(app=create_app(state))
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return await self.inner.handle_async_request(request)


@pytest.fixture
def transport(state: EmulatorState) -> CountingTransport:
    return CountingTransport(state)


@pytest.fixture
async def auth0(transport: CountingTransport) -> AsyncIterator[Auth0Client]:
    client = Auth0Client(ISSUER, "client", "secret", transport=transport)
    yield client
    await client.aclose()


@pytest.fixture
def jwks_fetches(transport: CountingTransport) -> Callable[[], int]:
    return lambda: transport.paths.count("/.well-known/jwks.json")


async def test_valid_token_gives_merged_scopes_and_permissions(state: EmulatorState, auth0: Auth0Client) -> None:
    token = state.mint_access_token(
        "auth0|u1", audience=[AUDIENCE, ISSUER + "userinfo"], scopes=["read:market"], azp="agent-9",
        permissions=["buy:quota"],
    )
    claims = await JwtVerifier(auth0, AUDIENCE).verify(token)
    principal = Principal.from_claims(claims)
    assert principal.account == "auth0|u1"
    assert principal.agent == "agent-9"
    assert principal.scopes == {"read:market", "buy:quota"}


async def test_leeway_is_sixty_seconds(state: EmulatorState, auth0: Auth0Client) -> None:
    now = int(time.time())
    just_expired = state.mint_access_token(
        "auth0|u1", audience=AUDIENCE, scopes=[], extra_claims={"exp": now - 30}
    )
    assert (await JwtVerifier(auth0, AUDIENCE).verify(just_expired))["sub"] == "auth0|u1"
    long_expired = state.mint_access_token("auth0|u1", audience=AUDIENCE, scopes=[], extra_claims={"exp": now - 90})
    with pytest.raises(InvalidToken, match="expired") as refused:
        await JwtVerifier(auth0, AUDIENCE).verify(long_expired)
    assert refused.value.claims is not None and refused.value.claims["sub"] == "auth0|u1"


async def test_rotated_key_is_picked_up_by_one_refetch(
    state: EmulatorState, auth0: Auth0Client, jwks_fetches: Callable[[], int]
) -> None:
    verifier = JwtVerifier(auth0, AUDIENCE)
    await verifier.verify(state.mint_access_token("auth0|u1", audience=AUDIENCE, scopes=[]))
    assert jwks_fetches() == 1
    state.rotate_signing_key()
    await verifier.verify(state.mint_access_token("auth0|u1", audience=AUDIENCE, scopes=[]))
    assert jwks_fetches() == 2


async def test_unknown_kids_refetch_at_most_once_per_interval(
    state: EmulatorState, auth0: Auth0Client, jwks_fetches: Callable[[], int]
) -> None:
    clock = [1000.0]
    verifier = JwtVerifier(auth0, AUDIENCE, clock=lambda: clock[0])
    await verifier.verify(state.mint_access_token("auth0|u1", audience=AUDIENCE, scopes=[], extra_claims={
        "exp": 10_000, "iat": 900}))
    for n in range(20):
        forged = state.mint_access_token("auth0|u1", audience=AUDIENCE, scopes=[], kid=f"nope-{n}")
        with pytest.raises(InvalidToken):
            await verifier.verify(forged)
    assert jwks_fetches() == 2  # the first load, then one refetch for the first unknown kid
    clock[0] += 31
    with pytest.raises(InvalidToken):
        await verifier.verify(state.mint_access_token("auth0|u1", audience=AUDIENCE, scopes=[], kid="nope-x"))
    assert jwks_fetches() == 3


async def test_a_verified_token_is_not_checked_again_but_still_expires(
    state: EmulatorState, auth0: Auth0Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [time.time()]
    verifier = JwtVerifier(auth0, AUDIENCE, clock=lambda: clock[0])
    token = state.mint_access_token(
        "auth0|u1", audience=AUDIENCE, scopes=["read:market"], extra_claims={"exp": int(clock[0]) + 100}
    )
    assert (await verifier.verify(token))["sub"] == "auth0|u1"

    def no_second_rsa_check(*args: object, **kwargs: object) -> None:
        raise AssertionError("the signature was checked again")

    monkeypatch.setattr("server.auth0.token_verifier.jwt.decode", no_second_rsa_check)
    assert (await verifier.verify(token))["sub"] == "auth0|u1"
    clock[0] += 100 + 61
    with pytest.raises(InvalidToken, match="expired") as refused:
        await verifier.verify(token)
    assert refused.value.claims is not None and refused.value.claims["sub"] == "auth0|u1"


async def test_a_forged_copy_of_a_verified_token_is_still_refused(state: EmulatorState, auth0: Auth0Client) -> None:
    verifier = JwtVerifier(auth0, AUDIENCE)
    token = state.mint_access_token("auth0|u1", audience=AUDIENCE, scopes=["read:market"])
    await verifier.verify(token)
    head, body, signature = token.split(".")
    forged = ".".join([head, body, ("A" if signature[0] != "A" else "B") + signature[1:]])
    with pytest.raises(InvalidToken, match="signature"):
        await verifier.verify(forged)
