"""Token Vault brokering (SPEC §4): exchange, granted-scope check, error mapping, reuse cache.

Retries and deadlines live in the Auth0 client (server/auth0/client.py);
by the time an Auth0Error reaches here it is final.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.auth0.client import Auth0Client, Auth0Error, TokenSet, seconds
from server.errors import AccountNotConnected, BrokerError, RateLimited, VaultDenied, VaultUnavailable
from server.principal import SubjectToken
from server.singleflight import SingleFlight

REUSE_FOR = 60.0  # seconds an answer may be handed out again
NOT_WITHIN = 30.0  # never reuse an answer this close to its expiry
# Auth0's codes for "no usable connected account" (both unverified, seen in the wild); other wordings are
# recognised by their description.
NOT_CONNECTED_ERRORS = frozenset({"federated_connection_refresh_token_not_found", "tokenset_not_found"})
_NOT_CONNECTED_TEXT = re.compile(r"federated connection|connected account|token ?set", re.IGNORECASE)


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
    """Gets third-party tokens through Token Vault, reusing a fresh answer for the exact same ask.

    An answer is reused only for the same account, connection, exact scope set and
    `login_hint`, for at most REUSE_FOR seconds and never within NOT_WITHIN seconds of its
    expiry. Concurrent asks with the same key share one exchange (single flight). `on_reuse(hit)` is
    told of each ask `fetch` answers (hit: from the cache) and of each answer `reusable` finds.
    """

    def __init__(
        self, auth0: Auth0Client, clock: Callable[[], float] = time.time,
        on_reuse: Callable[[bool], None] | None = None,
    ) -> None:
        self._auth0 = auth0
        self._clock = clock
        self._on_reuse = on_reuse
        self._cache: dict[CacheKey, VaultToken] = {}
        self._flights: SingleFlight[CacheKey, VaultToken] = SingleFlight()

    async def fetch(
        self, account: str, subject: SubjectToken, connection: str, scopes: list[str], login_hint: str | None
    ) -> VaultToken:
        """A token for `connection` covering `scopes`. Raises a BrokerError the tool can answer with."""
        key: CacheKey = (account, connection, frozenset(scopes), login_hint)
        cached = self._reused(key)
        if self._on_reuse is not None:
            self._on_reuse(cached is not None)
        if cached is not None:
            return cached
        self._cache.pop(key, None)

        async def exchange() -> VaultToken:
            token = await self._exchange(subject, connection, scopes, login_hint)
            if self._reusable(token):
                self._cache[key] = token
            return token

        return await self._flights.do(key, exchange)

    def clear(self) -> None:
        """Reuse nothing fetched so far (an agent was blocked: its answers must not be handed out again)."""
        self._cache.clear()

    def forget(self, account: str, connection: str, scopes: list[str], login_hint: str | None) -> None:
        """Stop reusing the answer for this ask (the provider refused its token)."""
        self._cache.pop((account, connection, frozenset(scopes), login_hint), None)

    def reusable(self, account: str, connection: str, scopes: list[str], login_hint: str | None) -> VaultToken | None:
        """The answer `fetch` would reuse for this ask right now, if any (no network)."""
        found = self._reused((account, connection, frozenset(scopes), login_hint))
        if found is not None and self._on_reuse is not None:  # a miss here goes on to `fetch`, which counts it
            self._on_reuse(True)
        return found

    def _reused(self, key: CacheKey) -> VaultToken | None:
        cached = self._cache.get(key)
        return cached if cached is not None and self._reusable(cached) else None

    def _reusable(self, token: VaultToken) -> bool:
        now = self._clock()
        return now - token.fetched_at <= REUSE_FOR and token.expires_at - now > NOT_WITHIN

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
    """Auth0's answer to an exchange, as the SPEC's error code with a sentence the user can act on.

    5xx, no answer, or an unreadable 200 → vault_unavailable; 429 → rate_limited with the
    seconds to wait; a missing, revoked or expired connected account (by `error` or
    `error_description`, on 400/401/404) → account_not_connected; any other refusal →
    vault_denied, worded for the cause: client authentication, a client not allowed to use
    Token Vault, the subject token, or the scopes.
    """
    refunded = "your unit was refunded"
    if exc.unreachable or (exc.status is not None and exc.status >= 500) or (exc.status or 0) < 400:
        return VaultUnavailable(f"Token Vault is unavailable right now; {refunded}, try again shortly")
    if exc.status == 429:
        wait = exc.wait_seconds
        return RateLimited(f"Auth0 is rate limiting; {refunded}, retry in {seconds(wait)}", wait)
    if exc.status in (400, 401, 404) and not_connected(exc):
        return AccountNotConnected(
            f"your {connection} account is not connected to Auth0, or its connection was revoked or expired; "
            f"reconnect {connection} (sign in with {connection} again) and retry; {refunded}"
        )
    error = exc.error or f"HTTP {exc.status}"
    if exc.client_auth_failed:
        reason = "Auth0 did not accept this broker's client authentication; its operator must fix its credentials"
    elif exc.status == 403 and exc.error == "unauthorized_client":
        reason = "this broker's Auth0 application is not allowed to use Token Vault"
    elif exc.error == "invalid_grant":
        reason = "Auth0 did not accept your login as the subject of the exchange; sign in again"
    elif exc.status == 403 and exc.error == "access_denied":
        reason = f"your {connection} account did not grant these scopes; reconnect it granting them"
    else:
        reason = "Token Vault refused the exchange"
    return VaultDenied(f"{reason} ({error}, {connection}); {refunded}")


def not_connected(exc: Auth0Error) -> bool:
    """Whether Auth0's error says the user's connected account is missing, revoked or expired."""
    if exc.error in NOT_CONNECTED_ERRORS:
        return True
    return bool(_NOT_CONNECTED_TEXT.search(exc.description or ""))
