"""Token Vault brokering (SPEC §4): exchange, granted-scope check, error mapping, reuse cache."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.auth0_client import Auth0Client, Auth0Error, TokenSet
from server.errors import AccountNotConnected, BrokerError, RateLimited, VaultDenied, VaultUnavailable
from server.principal import SubjectToken

REUSE_FOR = 60.0  # seconds an answer may be handed out again
NOT_WITHIN = 30.0  # never reuse an answer this close to its expiry
NOT_CONNECTED_ERRORS = frozenset({"federated_connection_refresh_token_not_found", "tokenset_not_found"})


@dataclass(frozen=True)
class VaultToken:
    access_token: str = field(repr=False)
    token_type: str
    expires_at: float
    scopes: tuple[str, ...]
    flags: tuple[str, ...]
    fetched_at: float


CacheKey = tuple[str, str, frozenset[str], str | None]


class TokenVault:
    """Gets third-party tokens through Token Vault, reusing a fresh answer for the exact same ask."""

    def __init__(self, auth0: Auth0Client, clock: Callable[[], float] = time.time) -> None:
        self._auth0 = auth0
        self._clock = clock
        self._cache: dict[CacheKey, VaultToken] = {}
        self._inflight: dict[CacheKey, asyncio.Future[VaultToken]] = {}

    async def fetch(
        self, account: str, subject: SubjectToken, connection: str, scopes: list[str], login_hint: str | None
    ) -> VaultToken:
        """A token for `connection` covering `scopes`. Raises a BrokerError the tool can answer with."""
        key: CacheKey = (account, connection, frozenset(scopes), login_hint)
        cached = self._cache.get(key)
        now = self._clock()
        if cached is not None and now - cached.fetched_at <= REUSE_FOR and cached.expires_at - now > NOT_WITHIN:
            return cached
        self._cache.pop(key, None)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[VaultToken] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            token = await self._exchange(subject, connection, scopes, login_hint)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        else:
            future.set_result(token)
            if token.expires_at - token.fetched_at > NOT_WITHIN:
                self._cache[key] = token
            return token
        finally:
            del self._inflight[key]

    async def _exchange(
        self, subject: SubjectToken, connection: str, scopes: list[str], login_hint: str | None
    ) -> VaultToken:
        try:
            answer = await self._auth0.exchange(subject, connection, scopes, login_hint)
        except Auth0Error as exc:
            raise map_exchange_error(exc, connection) from None
        return check_grant(answer, scopes, self._clock())


def check_grant(answer: TokenSet, requested: list[str], now: float) -> VaultToken:
    """Refuse a grant narrower than the request; flag a broader or unconfirmed one."""
    flags: list[str] = []
    if answer.scope is None:
        granted = sorted(set(requested))
        flags.append("scope_unconfirmed")
    else:
        granted = sorted({s for s in answer.scope.split(" ") if s})
        missing = sorted(set(requested) - set(granted))
        if missing:
            raise VaultDenied(f"Token Vault granted less than asked: missing {' '.join(missing)}")
        if set(granted) > set(requested):
            flags.append("scope_overgrant")
    return VaultToken(
        access_token=answer.access_token,
        token_type=answer.token_type,
        expires_at=answer.expires_at,
        scopes=tuple(granted),
        flags=tuple(flags),
        fetched_at=now,
    )


def map_exchange_error(exc: Auth0Error, connection: str) -> BrokerError:
    """Auth0's answer to an exchange, as the SPEC's error code with an actionable sentence."""
    if exc.unreachable or (exc.status is not None and exc.status >= 500) or exc.status == 200:
        return VaultUnavailable("Token Vault is unavailable right now; your unit was refunded, try again shortly")
    if exc.status == 429:
        wait = max(1, math.ceil(exc.retry_after)) if exc.retry_after is not None else 1
        return RateLimited(f"Auth0 is rate limiting; your unit was refunded, retry in {wait} seconds", wait)
    text = f"{exc.error or ''} {exc.description or ''}".lower()
    if exc.status == 401 and (
        exc.error in NOT_CONNECTED_ERRORS or "connect" in text or "federated" in text or "tokenset" in text
    ):
        return AccountNotConnected(
            f"your {connection} account is not connected to Auth0, or its connection expired; "
            f"reconnect {connection} (sign in with it again) and retry; your unit was refunded"
        )
    reason = exc.error or f"HTTP {exc.status}"
    return VaultDenied(f"Token Vault refused the exchange for {connection} ({reason}); your unit was refunded")
