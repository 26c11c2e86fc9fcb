"""The broker: each tool's domain work, committed together with its audit event (fail closed).

Knows nothing of MCP. `tools/` validates input, resolves the principal and calls in here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from server import audit, grants, ledger, market, moves
from server.api_calls import ApiCall, ApiCalls, ApiResult
from server.approval import Progress
from server.audit import Event
from server.clock import Clock, SystemClock, rfc3339
from server.config import DEFAULT_GRANT_TTL, DEFAULT_RESERVATION_LEASE
from server.connect import ConnectRequired
from server.control import Control
from server.errors import (
    AccountNotConnected,
    AgentBlocked,
    ApprovalDenied,
    AuditUnavailable,
    BrokerError,
    InternalError,
    LeaseLapsed,
    RateLimited,
    Unauthenticated,
    describe_failure,
)
from server.models import Grant, Holding, Move, Receipt
from server.owners import owner_alive, process_owner
from server.policy import Policy
from server.principal import Principal
from server.provider import ProviderClient
from server.store import Database, StoreUnavailable, Tx
from server.vault import TokenVault, VaultToken

if TYPE_CHECKING:  # only the type: prometheus_client stays out of the domain
    from server.connect import ConnectFlows
    from server.metrics import Metrics

log = logging.getLogger(__name__)
R = TypeVar("R")
# Asks the account's owner to approve one token or grant (server.approval.await_approval, bound to this
# broker's Auth0 client and TVM_APPROVAL_TIMEOUT); raises ApprovalDenied / ApprovalTimeout / ….
Approver = Callable[..., Awaitable[None]]


@dataclass
class Call:
    """One tool call as the audit log sees it."""

    tool: str | None
    scope: str | None
    transport: str
    args: Mapping[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    admitted: bool = False  # the kill switch and the rate limit let this call in (checked once per call)
    # A call whose first transaction should write nothing (call_api inside a live grant: it only looks the
    # grant up) checks its rate-limit token there and takes it in its next transaction (`settle_rate`).
    defer_rate: bool = False
    rate_owed: bool = False
    progress: Progress | None = None  # tells the client how a long wait (an approval) goes, if it asked

    def event(self, now: datetime, principal: Principal | None, error: BrokerError | None, **extra: Any) -> Event:
        return Event(
            ts=rfc3339(now),
            transport=self.transport,
            outcome="ok" if error is None else error.outcome,
            account=principal.account if principal else None,
            agent=principal.agent if principal else None,
            tool=self.tool,
            scope=self.scope,
            code=None if error is None else error.code,
            args={**self.args, **extra.pop("args", {})},
            latency_ms=(time.perf_counter() - self.started) * 1000,
            **extra,
        )


@dataclass(frozen=True)
class Balance:
    account: str
    balance: int
    holdings: list[Holding]
    as_of: datetime
    grants: list[Grant] = field(default_factory=list)


@dataclass(frozen=True)
class IssuedToken:
    access_token: str = field(repr=False)
    token_type: str
    expires_at: datetime
    expires_in: int
    connection: str
    scopes: tuple[str, ...]
    token_id: str
    units_remaining: int


@dataclass(frozen=True)
class _Failed:
    error: BrokerError


def _token_event(token_id: bytes, reservation_id: str, token: VaultToken) -> dict[str, Any]:
    """What an ok request_token event adds: the token's fingerprint, its reservation, its scope flags."""
    return {
        "token_id": token_id,
        "args": {"reservation_id": reservation_id, **({"flags": list(token.flags)} if token.flags else {})},
    }


def _issued(token: VaultToken, token_id: bytes, connection: str, remaining: int) -> IssuedToken:
    return IssuedToken(
        access_token=token.access_token,
        token_type=token.token_type,
        expires_at=datetime.fromtimestamp(token.expires_at, UTC).replace(microsecond=0),
        expires_in=max(0, int(token.expires_at - time.time())),
        connection=connection,
        scopes=token.scopes,
        token_id=token_id.hex(),
        units_remaining=remaining,
    )


class _NotBlocked(BrokerError):
    """Nothing to unblock (not an answer to an agent: the CLI says so itself)."""

    code = "invalid_argument"
    outcome = "denied"

    def __init__(self) -> None:
        super().__init__("that agent is not blocked")


def _unadmit(call: Call) -> None:
    call.admitted = False
    call.rate_owed = False


def _operator(by: str) -> Principal:
    return Principal(account=by, agent="operator", scopes=frozenset())


def _side(account: str) -> Principal:
    """An operator move's event is on each account it touches; `args.operator` names who moved."""
    return Principal(account=account, agent="operator", scopes=frozenset())


class Broker:
    """Runs each tool's work and its audit event in one transaction."""

    def __init__(
        self,
        db: Database,
        vault: TokenVault | None = None,
        clock: Clock | None = None,
        provider: ProviderClient | None = None,
        grant_ttl: float = DEFAULT_GRANT_TTL,
        approver: Approver | None = None,
        lease: float = DEFAULT_RESERVATION_LEASE,
        metrics: Metrics | None = None,
    ) -> None:
        self.db = db
        self.vault = vault
        self.clock = clock or SystemClock()
        self.owner = process_owner()
        self.provider = provider
        self.grant_ttl = grant_ttl
        self.grant_tokens = grants.GrantTokens()
        self.control = Control(on_change=self._blocked_now)
        self.approver = approver  # asks the account's owner (Auth0 CIBA); None: nothing can be approved
        self.lease = timedelta(seconds=lease)  # how long this process holds a reservation unrenewed
        self.holding = 0  # reservations this process holds now (their leases are renewed while > 0)
        self._api_calls = ApiCalls(self)
        self.metrics = metrics  # told of each tool call's answer by tools/registry (None: no metrics)
        self.connects: ConnectFlows | None = None  # makes connect links (SPEC §10); None: plain account_not_connected

    def _blocked_now(self, agents: set[str]) -> None:
        """Agents the operator just blocked: their cached tokens go at once (their grants are closed)."""
        self.grant_tokens.drop_agents(agents)
        if self.vault is not None:
            self.vault.clear()

    # ---- the generic audited step ---------------------------------------------------------
    async def _run(
        self,
        call: Call,
        principal: Principal | None,
        op: Callable[[Tx, datetime], R],
        *,
        audit_ok: bool | Callable[[R], bool] = True,
        ok_extra: Callable[[R], dict[str, Any]] | None = None,
        reads_only: bool = False,
        probe: bool = False,
        reads: Callable[[Tx, datetime], object] | None = None,
    ) -> R:
        """Run `op` and append the call's event in one transaction; a refusal by `op` undoes its
        writes but keeps its event. `reads_only` ops write nothing, so they need no savepoint; `probe`
        ops most often write nothing (and no event): the store may try them without the write lock first
        (Database.probe). `reads` makes the reads `op` starts with: they travel with the admission's
        statements (Tx.prefetch), and `op` finds them answered."""

        def job(tx: Tx) -> R | _Failed:
            now = self.clock.now()
            if reads is not None:
                tx.prefetch(lambda: reads(tx, now))
            owed = call.rate_owed  # owed by an earlier transaction of this call: this one takes it
            refused = self._admit(tx, call, principal, now)
            if refused is not None:
                return refused
            if owed:
                self.settle_rate(tx, call, principal, now)
            mark = None if reads_only else tx.savepoint()  # (a plain call: this runs for every tool call)
            try:
                result = op(tx, now)
            except BrokerError as error:
                if mark is not None:
                    tx.rollback_savepoint(mark)
                audit.append(tx, call.event(now, principal, error))
                return _Failed(error)
            # any other exception fails the whole job: the store rolls all of it back
            if mark is not None:
                tx.release_savepoint()
            if audit_ok(result) if callable(audit_ok) else audit_ok:
                audit.append(tx, call.event(now, principal, None, **(ok_extra(result) if ok_extra else {})))
            return result

        outcome = await self._write(call, principal, job, record_failure=True, probe=probe)
        if isinstance(outcome, _Failed):
            raise outcome.error
        return outcome

    def _admit(self, tx: Tx, call: Call, principal: Principal | None, now: datetime) -> _Failed | None:
        """The kill switch and the rate limit, once per tool call, in its transaction. A refusal's event is
        folded: at most one a second per principal, `args.suppressed` counting the ones left out."""
        if call.admitted or call.scope is None or principal is None:  # operator actions are not tool calls
            return None
        try:
            self.control.admit(tx, principal, now, take=not call.defer_rate)
        except (AgentBlocked, RateLimited) as error:
            source = (error.code, principal.account, principal.agent or "")
            suppressed = self.control.fold(source, time.monotonic(), (call, principal, error), tx)
            if suppressed is not None:
                audit.append(tx, call.event(now, principal, error, args={"suppressed": suppressed}))
            return _Failed(error)
        call.admitted = True
        call.rate_owed = call.defer_rate
        tx.on_undo(lambda: _unadmit(call))  # rolled back (or run again): not admitted yet
        return None

    def settle_rate(self, tx: Tx, call: Call, principal: Principal | None, now: datetime) -> None:
        """Take the rate-limit token a deferred call still owes (it may put the bucket in debt: calls that
        passed the check together all pay, and later ones wait the longer)."""
        if not call.rate_owed or principal is None:
            return
        self.control.take_owed(tx, principal, now)
        call.rate_owed = False
        tx.on_undo(lambda: setattr(call, "rate_owed", True))

    async def flush_refusals(self, everything: bool = False) -> int:
        """Write the folded refusals whose second is over: one event per source saying how many (its
        `args.suppressed`), so a flood that stops is counted too. Returns the events written."""
        due = self.control.due(time.monotonic(), everything)
        if not due:
            return 0

        def job(tx: Tx) -> int:
            now = self.clock.now()
            for count, (call, principal, error) in due:
                folded = Call(call.tool, call.scope, call.transport, {**call.args, "suppressed": count - 1})
                audit.append(tx, folded.event(now, principal, error))
            return len(due)

        try:
            return await self.db.write(job)
        except Exception as exc:  # the counts are lost, the refusals stood
            log.error("could not record %d folded refusal counts: %s", len(due), type(exc).__name__)
            return 0

    async def record(self, call: Call, principal: Principal | None, error: BrokerError) -> BrokerError:
        """Write the event of a call refused before any work (bad input, no auth, no scope); return the
        refusal to answer with (a blocked or rate-limited caller hears that instead)."""

        def job(tx: Tx) -> BrokerError:
            now = self.clock.now()
            refused = self._admit(tx, call, principal, now)
            if refused is not None:
                return refused.error
            self.settle_rate(tx, call, principal, now)
            audit.append(tx, call.event(now, principal, error))
            return error

        try:
            return await self.db.write(job)
        except Exception as exc:  # the refusal stands; only its record is missing
            log.error("could not record a refused %s call: %s", call.tool, type(exc).__name__)
            return error

    # ---- tools ---------------------------------------------------------------------------
    async def list_market(
        self, call: Call, principal: Principal, *, connection: str | None, include_closed: bool, limit: int,
        cursor: str | None,
    ) -> market.Page:
        return await self._run(
            call,
            principal,
            lambda tx, now: market.page(
                tx, now=now, connection=connection, include_closed=include_closed, limit=limit, cursor=cursor
            ),
            reads_only=True,
        )

    async def check_balance(self, call: Call, principal: Principal) -> Balance:
        def reads(tx: Tx, now: datetime) -> tuple[int | None, list[Holding], list[Grant]]:
            return tx.balance_sheet(principal.account, principal.agent or "", now)

        def op(tx: Tx, now: datetime) -> Balance:
            balance, holdings, live = reads(tx, now)
            return Balance(principal.account, balance or 0, holdings, now, live)

        return await self._run(call, principal, op, reads_only=True, reads=reads)

    async def buy_quota(
        self, call: Call, principal: Principal, *, listing_id: str, units: int, max_unit_price: int,
        idempotency_key: str | None,
    ) -> Receipt:
        def op(tx: Tx, now: datetime) -> Receipt:
            return ledger.buy(
                tx, principal.account, listing_id, units, max_unit_price, idempotency_key, now,
                lambda listing, total: self.control.spend(tx, principal, listing, total, now),
            )

        return await self._run(
            call, principal, op, reads=lambda tx, now: tx.buy_context(principal.account, listing_id, idempotency_key)
        )

    async def request_token(
        self, call: Call, principal: Principal, *, connection: str, scopes: list[str], login_hint: str | None
    ) -> IssuedToken:
        """Reserve a unit, exchange through Token Vault, then commit it (or refund it on failure).

        With an answer that may be reused (SPEC §4) there is no exchange to wait for: the unit is spent and
        the event written in one transaction. An account that is not connected is ConnectRequired (a link
        to connect it, SPEC §10) when this broker makes connect links; the unit is refunded first.
        """
        try:
            return await self._request_token(call, principal, connection, scopes, login_hint)
        except AccountNotConnected as error:
            raise await self._connect_needed(call, principal, connection, scopes, error) from None

    async def _connect_needed(
        self, call: Call, principal: Principal, connection: str, scopes: Sequence[str], error: AccountNotConnected
    ) -> AccountNotConnected:
        """The answer to a missing connected account: a connect link (with its start event), or `error` itself
        when this broker makes none or the link could not be made."""
        if self.connects is None or isinstance(error, ConnectRequired):
            return error
        try:
            return await self.connects.start(call, principal, connection, list(scopes))
        except Exception as exc:  # the refusal stands; only the way out is missing
            log.error("could not make a connect link: %s", describe_failure(exc))
            return error

    async def _request_token(
        self, call: Call, principal: Principal, connection: str, scopes: list[str], login_hint: str | None
    ) -> IssuedToken:
        if self.vault is None:  # pragma: no cover - only the CLI builds a broker without a vault
            raise InternalError()
        vault = self.vault
        if principal.subject is None:
            error = Unauthenticated("this session has no Auth0 token to exchange; sign in again")
            await self.record(call, principal, error)
            raise error
        reused = vault.reusable(principal.account, connection, scopes, login_hint)
        if reused is not None:
            issued = await self._spend_on(call, principal, connection, scopes, reused)
            if issued is not None:
                return issued
            # the token must be approved first: reserve and ask, as for a fresh exchange

        def reserve(tx: Tx, now: datetime) -> tuple[str, Holding, bool]:
            hour = self.control.count_grant(tx, principal, connection, now)
            rid, holding = ledger.reserve(
                tx, principal.account, connection, scopes, self.owner, now, ledger.tokens_may_leave(connection)
            )
            tx.mark_reservation(rid, principal.agent or "", hour, "request_token", now + self.lease)
            return rid, holding, self.control.needs_approval(tx, principal, holding.approval)

        reservation_id, holding, approve = await self._run(call, principal, reserve, audit_ok=False)
        with self.holding_one():
            try:
                if approve:
                    await self._approve(call, principal, connection, scopes)
                token = await vault.fetch(principal.account, principal.subject, connection, scopes, login_hint)
            except BrokerError as error:
                await self._refund(call, principal, reservation_id, error)
                raise
            except BaseException:
                await self._refund(call, principal, reservation_id, InternalError())
                raise
            token_id = audit.token_fingerprint(self.db.hmac_key, token.access_token)

            def commit(tx: Tx, now: datetime) -> int:
                if not ledger.settle(tx, reservation_id, committed=True, now=now):
                    raise LeaseLapsed()  # refunded meanwhile by another process: no token for a unit not spent
                return ledger.units_remaining(tx, principal.account, holding.id)

            try:
                remaining = await self._run(
                    call, principal, commit, ok_extra=lambda _: _token_event(token_id, reservation_id, token)
                )
            except LeaseLapsed:
                raise  # its event is written; the unit was refunded by the process that took the lease over
            except BrokerError as error:
                await self._refund(call, principal, reservation_id, error)
                raise
        return _issued(token, token_id, connection, remaining)

    @contextmanager
    def holding_one(self) -> Iterator[None]:
        """While a reservation of this process is pending: housekeeping renews its lease."""
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1

    async def _spend_on(
        self, call: Call, principal: Principal, connection: str, scopes: list[str], token: VaultToken
    ) -> IssuedToken | None:
        """A reused answer: the unit is spent and the event written in one transaction (one commit, not two).

        Nothing waits between reserving and committing, so there is nothing to refund either. None (and
        nothing done) when the holding it would spend needs its owner's approval first.
        """
        token_id = audit.token_fingerprint(self.db.hmac_key, token.access_token)

        def spend(tx: Tx, now: datetime) -> tuple[str, int] | None:
            fit = ledger.tokens_may_leave(connection)
            holding = ledger.choose_holding(tx.holdings_of(principal.account, connection), connection, scopes, fit)
            if self.control.needs_approval(tx, principal, holding.approval):
                return None
            self.control.count_grant(tx, principal, connection, now)
            return ledger.spend(tx, principal.account, connection, scopes, now, fit, holding)

        spent = await self._run(
            call, principal, spend, audit_ok=lambda done: done is not None,
            ok_extra=lambda done: _token_event(token_id, done[0], token) if done else {},
            reads=lambda tx, now: tx.holdings_of(principal.account, connection),
        )
        return None if spent is None else _issued(token, token_id, connection, spent[1])

    async def _approve(
        self, call: Call, principal: Principal, connection: str, scopes: Sequence[str],
        method: str | None = None, url: str | None = None,
    ) -> None:
        """Ask the account's owner (Auth0 CIBA) and wait; raises ApprovalDenied / ApprovalTimeout / …"""
        if self.approver is None:
            raise ApprovalDenied("this listing needs its owner's approval, and this broker cannot ask for it; "
                                 "your unit was refunded")
        await self.approver(
            account=principal.account, agent=principal.agent, connection=connection, scopes=list(scopes),
            purpose=str(call.args.get("purpose", "")), method=method, url=url, progress=call.progress,
        )

    async def call_api(self, call: Call, principal: Principal, api: ApiCall) -> ApiResult:
        """Call the provider's API with a brokered token the caller never sees (SPEC §8; server.api_calls).

        A missing connected account is answered as by `request_token` (ConnectRequired)."""
        try:
            return await self._api_calls.call(call, principal, api)
        except AccountNotConnected as error:
            raise await self._connect_needed(call, principal, api.connection, api.scopes, error) from None

    async def _write(
        self, call: Call, principal: Principal | None, job: Callable[[Tx], R], *, record_failure: bool = False,
        probe: bool = False,
    ) -> R:
        """Run a job that writes its own event. A store failure is AuditUnavailable (nothing kept); any other
        unexpected failure is InternalError (its event written when `record_failure`)."""
        try:
            return await (self.db.probe(job) if probe else self.db.write(job))
        except (AuditUnavailable, StoreUnavailable) as exc:
            log.error("audit write failed for %s: %s", call.tool, exc)
            if isinstance(exc, StoreUnavailable) and exc.outcome_unknown:
                raise AuditUnavailable(
                    "the database went away while this call was being saved, so it may or may not have taken "
                    "effect; look (check_balance) before you retry, or retry with the same idempotency_key"
                ) from None
            raise AuditUnavailable("the audit log could not be written, so nothing was done; try again") from None
        except BrokerError:
            raise
        except Exception as exc:
            log.error("unexpected failure in %s: %s", call.tool, describe_failure(exc))
            if record_failure:
                await self.record(call, principal, InternalError())
            raise InternalError() from None

    async def _refund(self, call: Call, principal: Principal, reservation_id: str, error: BrokerError) -> None:
        """Give the reserved unit back with the failure's event; without the event if the log is down."""

        def with_event(tx: Tx) -> None:
            now = self.clock.now()
            ledger.settle(tx, reservation_id, committed=False, now=now)
            audit.append(tx, call.event(now, principal, error, args={"reservation_id": reservation_id}))

        try:
            await self.db.write(with_event)
            return
        except Exception as exc:
            log.error("refund with audit event failed (%s); refunding without it", type(exc).__name__)
        try:
            await self.db.write(lambda tx: ledger.settle(tx, reservation_id, committed=False, now=self.clock.now()))
        except Exception as exc:
            log.error("refund failed (%s); the reservation is refunded at next start", type(exc).__name__)

    # ---- start-up ------------------------------------------------------------------------
    async def recover_reservations(self, transport: str = "startup") -> int:
        """Refund reservations whose process died (on this host), or whose lease lapsed (a replica elsewhere
        that stopped renewing it), each with its own event. Returns how many."""

        def job(tx: Tx) -> int:
            refunded = 0
            now = self.clock.now()
            for res in tx.pending_reservations():
                if res.owner == self.owner:
                    continue
                lapsed = res.lease_until is not None and res.lease_until < now
                if not lapsed and owner_alive(res.owner):
                    continue
                ledger.settle(tx, res.id, committed=False, now=now)
                audit.append(
                    tx,
                    Event(
                        ts=rfc3339(now),
                        transport=transport,
                        outcome="error",
                        account=res.account,
                        agent=res.agent or None,
                        tool=res.tool or "request_token",
                        scope="call:api" if res.tool == "call_api" else "request:token",
                        code="vault_unavailable",
                        args={"reservation_id": res.id, "connection": res.connection,
                              "reason": "owner process died" if not lapsed else "lease lapsed"},
                    ),
                )
                refunded += 1
            return refunded

        return await self.db.write(job)

    async def renew_leases(self) -> int:
        """Keep this process's pending reservations its own (housekeeping does this every lease/3)."""
        if self.holding <= 0:
            return 0
        return await self.db.write(lambda tx: tx.renew_leases(self.owner, self.clock.now() + self.lease))

    # ---- operator control (§9) ------------------------------------------------------------
    async def block_agent(self, agent: str, reason: str, by: str, transport: str = "cli") -> int:
        """Block `agent` on every process sharing the database; close its live grants. Audited (tool
        agent_block, account = who did it, agent `operator`). Returns the number of grants closed."""

        def op(tx: Tx, now: datetime) -> int:
            tx.set_block(agent, reason, rfc3339(now), by)
            tx.bump_control_version()
            return tx.close_grants_of(agent, now)

        call = Call(tool="agent_block", scope=None, transport=transport, args={"agent": agent, "reason": reason})
        closed = await self._run(call, _operator(by), op, ok_extra=lambda n: {"args": {"grants_closed": n}})
        self.control.invalidate()
        self._blocked_now({agent})
        return closed

    async def unblock_agent(self, agent: str, by: str, transport: str = "cli") -> bool:
        """Lift a block; False when the agent was not blocked (the attempt is audited as denied)."""

        def op(tx: Tx, now: datetime) -> bool:
            if not tx.clear_block(agent):
                raise _NotBlocked()
            tx.bump_control_version()
            return True

        call = Call(tool="agent_unblock", scope=None, transport=transport, args={"agent": agent})
        try:
            return await self._run(call, _operator(by), op)
        except _NotBlocked:
            return False
        finally:
            self.control.invalidate()

    async def load_policy(self, policy: Policy, by: str, transport: str = "cli") -> int:
        """Replace the whole policy (every process applies it on its next call). Audited (tool policy_load)."""

        def op(tx: Tx, now: datetime) -> int:
            tx.set_meta("policy", policy.to_json())
            tx.bump_control_version()
            return len(policy.agents)

        call = Call(tool="policy_load", scope=None, transport=transport, args={"rules": len(policy.agents)})
        try:
            return await self._run(call, _operator(by), op)
        finally:
            self.control.invalidate()

    async def credit(
        self, account: str, amount: int, transport: str = "cli", once_key: str | None = None, by: str | None = None
    ) -> int:
        """Operator credit from `mint`, with its own audit event; return the new balance.

        With `once_key`, the credit is marked done in the same transaction (a one-time grant); `by` names the
        operator in the event's `args.operator` (the console). Raises InvalidArgument for a bad amount or account.
        """

        def op(tx: Tx, now: datetime) -> int:
            balance = ledger.credit(tx, account, amount, now)
            if once_key is not None:
                tx.set_meta(once_key, "1")
            return balance

        args: dict[str, Any] = {"account": account, "amount": amount, **({"operator": by} if by else {})}
        call = Call(tool="wallet_credit", scope=None, transport=transport, args=args)
        operator = Principal(account=account, agent="operator", scopes=frozenset())
        return await self._run(call, operator, op)


    # ---- operator moves (§11) -------------------------------------------------------------
    async def transfer_credits(
        self, operator: str, from_account: str, to_account: str, amount: int, idempotency_key: str | None = None,
        transport: str = "cli",
    ) -> Move:
        """Move `amount` credits from one wallet to another, for `operator` (who appears in the audit log).

        One transaction: the transfer, its `moves` row and an event on each account (tool wallet_transfer,
        agent `operator`, `args.operator` naming who). With `idempotency_key`, the same key and arguments
        again answer the first Move (`replayed` true, one event, nothing moved). A refusal moves nothing and
        is one denied event on `from_account`. Raises InvalidArgument, InsufficientFunds,
        IdempotencyKeyReused, AuditUnavailable (the database failed: nothing kept).
        """
        args = {"operator": operator, "from_account": from_account, "to_account": to_account, "amount": amount,
                "idempotency_key": idempotency_key}
        return await self._move(
            "wallet_transfer", transport, args, from_account,
            lambda tx, now: moves.move_credits(tx, operator, from_account, to_account, amount, idempotency_key, now),
        )

    async def transfer_units(
        self, operator: str, from_account: str, to_account: str, listing: str, units: int,
        idempotency_key: str | None = None, transport: str = "cli",
    ) -> Move:
        """Move `units` held units of `listing` from one account to another, for `operator`.

        The receiver may spend them as bought ones (the listing's delivery, API and scopes); reserved units
        and grants stay. Audited, idempotent and refused as transfer_credits (tool quota_transfer). Raises
        InvalidArgument, UnknownListing, NoQuota, IdempotencyKeyReused, AuditUnavailable.
        """
        args = {"operator": operator, "from_account": from_account, "to_account": to_account, "listing_id": listing,
                "units": units, "idempotency_key": idempotency_key}
        return await self._move(
            "quota_transfer", transport, args, from_account,
            lambda tx, now: moves.move_units(
                tx, operator, from_account, to_account, listing, units, idempotency_key, now
            ),
        )

    async def _move(
        self, tool: str, transport: str, args: dict[str, Any], from_account: str,
        move: Callable[[Tx, datetime], Move],
    ) -> Move:
        """Run a move and write its events in one transaction: one on each account (a replay: one on the
        sender's, `replayed` true); a refusal is the sender's denied event (written by _run)."""
        call = Call(tool=tool, scope=None, transport=transport,
                    args={k: v for k, v in args.items() if v is not None})

        def op(tx: Tx, now: datetime) -> Move:
            done = move(tx, now)
            sides = [("from", done.from_account)] if done.replayed else [
                ("from", done.from_account), ("to", done.to_account)
            ]
            for side, account in sides:
                extra = {"move_id": done.move_id, "side": side, **({"replayed": True} if done.replayed else {})}
                audit.append(tx, call.event(now, _side(account), None, args=extra))
            return done

        # a refusal's event is on the sender's account, unless that name itself was refused (then on none)
        refused_on = _side(from_account) if moves.name_ok(from_account) else None
        return await self._run(call, refused_on, op, audit_ok=False)
