"""call_api's flow (SPEC §8): find or open a grant, get its token, call the provider, write one event.

Inside a live grant nothing is spent; otherwise one unit is reserved, and the grant opens with the
call's event (or the unit is refunded with it when no token could be had). The broker's generic
steps (one audited transaction, refunds, approval) do the bookkeeping; this module decides the order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from server import approval, audit, grants, ledger
from server.allowlist import keys_only
from server.errors import ApiUnavailable, BrokerError, InternalError, Unauthenticated
from server.models import Grant
from server.principal import Principal
from server.provider import ProviderAnswer, ProviderRequest, ProviderUnreachable
from server.store import Tx
from server.vault import VaultToken

if TYPE_CHECKING:
    from server.broker import Broker, Call


@dataclass(frozen=True)
class ApiCall:
    """A call_api request, validated: which grant it needs and what to send."""

    connection: str
    scopes: tuple[str, ...]  # sorted, unique
    login_hint: str | None
    request: ProviderRequest


@dataclass(frozen=True)
class ApiResult:
    answer: ProviderAnswer
    grant_id: str
    grant_expires_at: datetime
    token_id: str
    units_remaining: int


class ApiCalls:
    """call_api for one broker (its store, vault, provider client and grant tokens)."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker

    async def call(self, call: Call, principal: Principal, api: ApiCall) -> ApiResult:
        """Call the provider's API with a brokered token the caller never sees (SPEC §8).

        Inside a live grant nothing is spent; otherwise one unit is reserved, the grant opens with the
        call's event (or the unit is refunded with it when no token could be had). A provider's answer,
        4xx/5xx included, is a result; a provider that cannot be reached is ApiUnavailable (the grant stays).
        """
        if self.b.vault is None or self.b.provider is None:  # pragma: no cover - only the CLI builds such a broker
            raise InternalError()
        request = api.request
        ask = grants.GrantAsk(
            principal.account, principal.agent or "", api.connection, api.scopes, api.login_hint, request.method,
            request.url,
        )
        call.args = {
            "connection": api.connection, "scopes": list(api.scopes), "method": request.method,
            "url": keys_only(request.url), **({"purpose": call.args["purpose"]} if "purpose" in call.args else {}),
            **({"login_hint": api.login_hint} if api.login_hint else {}),
        }
        if principal.subject is None:
            error = Unauthenticated("this session has no Auth0 token to exchange; sign in again")
            await self.b.record(call, principal, error)
            raise error
        def plan_call(tx: Tx, now: datetime) -> tuple[grants.Plan, bool]:
            self.b.control.check_connection(tx, principal, ask.connection)
            plan = grants.plan(tx, ask, self.b.owner, now)
            if plan.grant is None:  # a new grant writes here anyway: its rate token too
                self.b.settle_rate(tx, call, principal, now)
            approve = request.method not in ("GET", "HEAD") and self.b.control.writes_need_approval(
                tx, principal, plan.holding.approval
            )  # a write under approval = "writes": its own approval, bound to its method and URL
            if plan.reservation_id is not None:  # a new grant counts against max_grants_per_hour
                hour = self.b.control.count_grant(tx, principal, ask.connection, now)
                tx.mark_reservation(plan.reservation_id, ask.agent, hour, "call_api", now + self.b.lease)
                approve = approve or self.b.control.needs_approval(tx, principal, plan.holding.approval)
            return plan, approve

        call.defer_rate = True  # inside a live grant, finding it writes nothing: the token is taken at the event
        # inside a live grant, finding it reads only: tried without the write lock (Database.probe)
        def reads(tx: Tx, now: datetime) -> object:  # grants.plan's first read, sent ahead
            return tx.live_grants_and_holdings_for(
                ask.account, ask.agent, ask.connection, ask.scopes, ask.login_hint, now
            )

        plan, approve = await self.b._run(call, principal, plan_call, audit_ok=False, probe=True, reads=reads)
        call.args = {**call.args, "url": plan.admitted.audit_url}
        sent = ProviderRequest(
            request.method, plan.admitted.url, request.headers, request.content, request.content_type
        )
        if plan.grant is not None:
            return await self._call_in_grant(call, principal, ask, plan.grant, sent, approve)
        return await self._call_opening_grant(call, principal, ask, plan, sent, approve)

    async def _call_in_grant(
        self, call: Call, principal: Principal, ask: grants.GrantAsk, grant: Grant, sent: ProviderRequest,
        approve: bool,
    ) -> ApiResult:
        base = {"grant_id": grant.id, "new_grant": False}
        token = self.b.grant_tokens.get(grant.id, self.b.clock.now())
        exchanged = token is None
        try:
            if approve:
                try:
                    await self.b._approve(call, principal, ask.connection, ask.scopes, sent.method, call.args["url"])
                except BrokerError as exc:  # nothing was reserved for a call inside a grant
                    raise approval.nothing_spent(exc) from None
            if token is None:  # a restart, another replica, or a dropped token: re-exchange, spend nothing
                token = await self._grant_token(principal, ask)
            answer, token, refetched = await self._send(principal, ask, grant.id, sent, token)
        except BrokerError as error:  # nothing was spent: the event says what went wrong
            call.args = {**call.args, **base}
            await self.b.record(call, principal, error)
            raise
        token_id = audit.token_fingerprint(self.b.db.hmac_key, token.access_token)
        self.b.grant_tokens.put(grant, token)

        def finish(tx: Tx, now: datetime) -> int:
            if exchanged or refetched:
                tx.set_grant_token(grant.id, token_id)
            return ledger.units_remaining(tx, principal.account, grant.holding_id)

        remaining = await self.b._run(
            call, principal, finish,
            ok_extra=lambda _: {"token_id": token_id, "args": {**base, "status": answer.status}},
        )
        return ApiResult(answer, grant.id, grant.expires_at, token_id.hex(), remaining)

    async def _call_opening_grant(
        self, call: Call, principal: Principal, ask: grants.GrantAsk, plan: grants.Plan, sent: ProviderRequest,
        approve: bool,
    ) -> ApiResult:
        assert plan.reservation_id is not None
        with self.b.holding_one():
            return await self._open(call, principal, ask, plan, sent, approve, plan.reservation_id)

    async def _open(
        self, call: Call, principal: Principal, ask: grants.GrantAsk, plan: grants.Plan, sent: ProviderRequest,
        approve: bool, reservation_id: str,
    ) -> ApiResult:
        try:
            if approve:
                await self.b._approve(call, principal, ask.connection, ask.scopes, sent.method, call.args["url"])
            token = await self._grant_token(principal, ask)
        except BaseException as exc:
            error = exc if isinstance(exc, BrokerError) else InternalError()
            await self.b._refund(call, principal, reservation_id, error)
            raise
        failure: BrokerError | None = None
        answer: ProviderAnswer | None = None
        try:
            answer, token, _ = await self._send(principal, ask, None, sent, token)
        except ApiUnavailable as exc:  # the unit bought the grant, not the call: the grant opens all the same
            failure = exc
        except BaseException as exc:
            error = exc if isinstance(exc, BrokerError) else InternalError()
            await self.b._refund(call, principal, reservation_id, error)
            raise
        token_id = audit.token_fingerprint(self.b.db.hmac_key, token.access_token)
        left = token.expires_at - time.time()

        def finish(tx: Tx, now: datetime) -> tuple[Grant, bool, int]:
            grant, opened = grants.open_grant(tx, ask, plan, token_id, self.b.grant_ttl, left, now)
            args: dict[str, Any] = {"grant_id": grant.id, "new_grant": opened, "reservation_id": reservation_id}
            if answer is not None:
                args["status"] = answer.status
            event = call.event(now, principal, failure, token_id=token_id, args=args)
            audit.append(tx, event)
            return grant, opened, ledger.units_remaining(tx, principal.account, grant.holding_id)

        try:
            grant, _, remaining = await self.b._write(call, principal, lambda tx: finish(tx, self.b.clock.now()))
        except BrokerError as error:
            await self.b._refund(call, principal, reservation_id, error)
            raise
        self.b.grant_tokens.put(grant, token)
        if failure is not None:
            raise failure
        assert answer is not None
        return ApiResult(answer, grant.id, grant.expires_at, token_id.hex(), remaining)

    async def _grant_token(self, principal: Principal, ask: grants.GrantAsk) -> VaultToken:
        assert self.b.vault is not None and principal.subject is not None
        return await self.b.vault.fetch(principal.account, principal.subject, ask.connection, list(ask.scopes),
                                      ask.login_hint)

    async def _send(
        self, principal: Principal, ask: grants.GrantAsk, grant_id: str | None, sent: ProviderRequest,
        token: VaultToken,
    ) -> tuple[ProviderAnswer, VaultToken, bool]:
        """Send with `token`; on a 401 drop it, re-exchange once and retry once. (answer, token used, refetched).

        The whole of it, retry included, fits in the provider client's timeout (TVM_API_TIMEOUT).
        """
        assert self.b.provider is not None and self.b.vault is not None
        deadline = time.monotonic() + self.b.provider.timeout
        try:
            answer = await self.b.provider.send(sent, token.access_token)
            if answer.status != 401:
                return answer, token, False
            if grant_id is not None:
                self.b.grant_tokens.drop(grant_id)
            self.b.vault.forget(principal.account, ask.connection, list(ask.scopes), ask.login_hint)
            token = await self._grant_token(principal, ask)
            return await self.b.provider.send(sent, token.access_token, deadline - time.monotonic()), token, True
        except ProviderUnreachable as exc:
            raise ApiUnavailable(f"{exc}; nothing was refunded (the grant stays), try again") from None
