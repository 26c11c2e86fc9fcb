"""Brokered grants (SPEC §8): one unit of a listing with an `api` buys calls to that API for a while.

A call needs a live grant of its caller (account and agent) for the connection, the exact scope set
and `login_hint`. Without one, a unit of a covering holding whose listing admits the call (its `api`
holds the URL, its `methods` the method) is reserved, least privilege first, and a grant opens when
the call is done: for `TVM_GRANT_TTL` seconds, never past the provider token's expiry less 30 s.
The grant record is durable; the token lives only in `GrantTokens`, in this process's memory.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from server import ledger
from server.allowlist import AdmittedUrl, NotAllowed, admit
from server.errors import ApiNotAllowed, LeaseLapsed
from server.models import Grant, Holding
from server.store import Tx
from server.vault import VaultToken

NOT_WITHIN = 30.0  # seconds: a grant ends this long before its provider token would


@dataclass(frozen=True)
class GrantAsk:
    """What a call_api call asks for: who, which grant, and the request it wants to make."""

    account: str
    agent: str
    connection: str
    scopes: tuple[str, ...]  # sorted, unique
    login_hint: str | None
    method: str
    url: str


@dataclass(frozen=True)
class Plan:
    """How a call will be paid for: a live `grant`, or a unit reserved (`reservation_id`) for a new one."""

    admitted: AdmittedUrl
    holding: Holding
    grant: Grant | None = None
    reservation_id: str | None = None


def plan(tx: Tx, ask: GrantAsk, owner: str, now: datetime) -> Plan:
    """Find the caller's live grant, else reserve a unit for a new one. Raises ApiNotAllowed (nothing
    spent) when the URL or method is outside what the listing allows, or what `ledger.reserve` raises."""
    # the holdings are read with the grants (one round trip on PostgreSQL): a call inside a grant needs both
    live, covering = tx.live_grants_and_holdings_for(
        ask.account, ask.agent, ask.connection, ask.scopes, ask.login_hint, now
    )
    if live:
        holdings = {h.id: h for h in covering}
        for grant in live:  # a grant whose listing admits this call (its listing may have changed since)
            holding = holdings.get(grant.holding_id)
            if holding is None:  # pragma: no cover - a grant's holding is never deleted
                continue
            try:
                return Plan(admit_call(holding, ask), holding, grant=grant)
            except ApiNotAllowed:
                continue  # another holding may admit it: it then opens a grant of its own
    admitted: dict[int, AdmittedUrl] = {}

    def fit(covering: list[Holding]) -> list[Holding]:
        reasons: list[str] = []
        for holding in covering:
            try:
                admitted[holding.id] = admit_call(holding, ask)
            except ApiNotAllowed as exc:
                reasons.append(exc.message)
        if not admitted:
            raise ApiNotAllowed(reasons[0] if len(set(reasons)) == 1 else "; ".join(sorted(set(reasons))))
        return [h for h in covering if h.id in admitted]

    reservation_id, holding = ledger.reserve(
        tx, ask.account, ask.connection, list(ask.scopes), owner, now, fit
    )
    return Plan(admitted[holding.id], holding, reservation_id=reservation_id)


def _live(tx: Tx, ask: GrantAsk, now: datetime) -> list[Grant]:
    return tx.live_grants_for(ask.account, ask.agent, ask.connection, ask.scopes, ask.login_hint, now)


def admit_call(holding: Holding, ask: GrantAsk) -> AdmittedUrl:
    """The URL to send if the holding's listing allows this call. Raises ApiNotAllowed."""
    if not holding.api:
        raise ApiNotAllowed(
            f"listing {holding.listing_id} names no API for call_api (it has no `api` base URLs); "
            "use request_token, or buy quota of a listing with an API"
        )
    if ask.method not in holding.methods:
        raise ApiNotAllowed(
            f"{ask.method} is not allowed by listing {holding.listing_id}; it allows {' '.join(holding.methods)}"
        )
    try:
        return admit(ask.url, holding.api)
    except NotAllowed as exc:
        raise ApiNotAllowed(f"{exc}; listing {holding.listing_id} allows {' '.join(holding.api)}") from None


def open_grant(
    tx: Tx, ask: GrantAsk, plan: Plan, token_id: bytes, ttl: float, token_left: float, now: datetime
) -> tuple[Grant, bool]:
    """Commit the reserved unit and open its grant; whether this call opened it.

    When another call of the same caller opened a grant for the same ask meanwhile (two first calls at
    once, here or on another process), that one is used and this unit is refunded: one unit, one grant.
    """
    assert plan.reservation_id is not None
    other = next((g for g in _live(tx, ask, now) if g.holding_id == plan.holding.id), None)
    if other is not None:
        ledger.settle(tx, plan.reservation_id, committed=False, now=now)
        return other, False
    if not ledger.settle(tx, plan.reservation_id, committed=True, now=now):
        raise LeaseLapsed()  # another process refunded it meanwhile: no grant for a unit not spent
    lasts = max(0.0, min(ttl, token_left - NOT_WITHIN))
    grant = Grant(
        id="gr_" + secrets.token_hex(12),
        account=ask.account,
        agent=ask.agent,
        connection=ask.connection,
        scopes=ask.scopes,
        login_hint=ask.login_hint,
        holding_id=plan.holding.id,
        reservation_id=plan.reservation_id,
        token_id=token_id,
        opened_at=now,
        expires_at=now + timedelta(seconds=lasts),
    )
    tx.insert_grant(grant)
    return grant, True


class GrantTokens:
    """The provider token of each grant this process used, in memory only (never stored).

    A token is dropped when its grant ends, when it would expire within NOT_WITHIN seconds, and on
    `drop` (the provider refused it). A grant without a token here re-exchanges, spending nothing.
    """

    def __init__(self, clock: Callable[[], float] = time.time, limit: int = 10_000) -> None:
        self._clock = clock
        self._limit = limit
        self._tokens: dict[str, tuple[VaultToken, datetime, str]] = {}  # grant id → (token, ends, agent)

    def get(self, grant_id: str, now: datetime) -> VaultToken | None:
        held = self._tokens.get(grant_id)
        if held is None:
            return None
        token, ends, _ = held
        if now >= ends or token.expires_at - self._clock() <= NOT_WITHIN:
            del self._tokens[grant_id]
            return None
        return token

    def put(self, grant: Grant, token: VaultToken) -> None:
        if len(self._tokens) >= self._limit:  # many grants at once: forget the oldest (they re-exchange)
            del self._tokens[next(iter(self._tokens))]
        self._tokens[grant.id] = (token, grant.expires_at, grant.agent)

    def drop(self, grant_id: str) -> None:
        self._tokens.pop(grant_id, None)

    def drop_agents(self, agents: set[str]) -> None:
        """Forget the tokens of these agents' grants (the operator blocked them)."""
        self._tokens = {gid: held for gid, held in self._tokens.items() if held[2] not in agents}

    def __len__(self) -> int:
        return len(self._tokens)
