"""Operator control in every call's transaction (SPEC §9): kill switch, policy, rate limits, flood folding.

Everything the operator sets lives in the database, so every process that shares it (stdio servers,
remote servers, replicas) applies it on the next call: blocks and the policy are read inside the
call's own transaction, and rate-limit buckets are rows updated there. What is per process is only
a cache of the parsed policy (keyed by the database's control version) and the folding of floods
of refusals into one audit event a second per source. Both change inside a call's transaction, so
both are put back (Tx.on_undo) when that transaction is rolled back or run again.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from server.errors import AgentBlocked, PolicyDenied, RateLimited
from server.models import Listing
from server.policy import AgentRule, Policy
from server.principal import Principal
from server.store import Tx
from server.textsafe import escape_controls

FOLD_SECONDS = 1.0  # at most one refusal event per source per this many seconds
# How long a process trusts its copy of the policy and the blocks before it looks at the database's control
# version again (SPEC §9: in force on every process within one second). Saves two queries on most calls.
REFRESH_SECONDS = 0.25
AUTH_FAILURES = 30  # rejected authentications from one address in AUTH_WINDOW seconds before 429s
AUTH_WINDOW = 60.0


@dataclass
class _Fold:
    until: float  # no further event for this source before this time (seconds)
    suppressed: int  # refusals not written since the last event
    last: Any = None  # what the last folded refusal was (the caller's), to write their count later


class Control:
    """Applies the operator's rules; one per process (it caches the policy and the folds)."""

    def __init__(self, on_change: Callable[[set[str]], None] | None = None) -> None:
        self._version: int | None = None
        self._checked = -math.inf  # when the version was last read (time.monotonic)
        self._policy = Policy()
        self._blocked: dict[str, str] = {}  # agent → the operator's reason
        self._folds: dict[tuple[str, ...], _Fold] = {}
        self.fold_seconds = FOLD_SECONDS
        self._on_change = on_change  # drop cached tokens of newly blocked agents

    # ---- the policy, as the database has it now ------------------------------------------
    def policy(self, tx: Tx) -> Policy:
        now = time.monotonic()
        if self._version is not None and now - self._checked < REFRESH_SECONDS:
            return self._policy
        version = tx.control_version()
        self._checked = now
        if version != self._version:
            before = (self._version, self._policy, self._blocked)
            tx.on_undo(lambda: self._restore(*before))  # what this transaction read may never be committed
            stored = tx.get_meta("policy")
            text = stored.decode() if isinstance(stored, bytes) else stored
            self._policy = Policy.from_json(text) if text else Policy()
            blocked = {agent: reason for agent, reason, *_ in tx.blocks()}
            newly = set(blocked) - set(self._blocked)
            self._blocked = blocked
            self._version = version
            if newly and self._on_change is not None:
                self._on_change(newly)
        return self._policy

    def invalidate(self) -> None:
        """This process changed the policy or the blocks: read them again at the next call."""
        self._checked = -math.inf

    def _restore(self, version: int | None, policy: Policy, blocked: dict[str, str]) -> None:
        self._version, self._policy, self._blocked = version, policy, blocked
        self._checked = -math.inf

    def rule(self, tx: Tx, principal: Principal) -> AgentRule:
        return self.policy(tx).rule_for(principal.agent)

    # ---- every call ------------------------------------------------------------------------
    def admit(self, tx: Tx, principal: Principal, now: datetime, take: bool = True) -> None:
        """A tool call may go on: its agent is not blocked and its (account, agent) bucket has a token,
        which is taken (or, with `take` false, only looked at: `take_owed` takes it later).

        Raises AgentBlocked (with the operator's reason) or RateLimited (with the seconds to wait).
        """
        rule = self.rule(tx, principal)
        agent = principal.agent or ""
        reason = self._blocked.get(agent)
        if reason is not None:
            raise AgentBlocked(
                f"the operator blocked agent {escape_controls(agent) or '(none)'}: {escape_controls(reason)}"
            )
        wait = tx.take_rate_token(principal.account, agent, rule.calls_per_minute, now, take=take)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise RateLimited(
                f"too many calls: at most {rule.calls_per_minute} a minute for this agent and account; "
                f"retry in {seconds} s",
                seconds,
            )

    def take_owed(self, tx: Tx, principal: Principal, now: datetime) -> None:
        """Take the token `admit(take=False)` let a call in on, even into debt."""
        rule = self.rule(tx, principal)
        tx.take_rate_token(principal.account, principal.agent or "", rule.calls_per_minute, now, debt=True)

    # ---- rules of particular tools --------------------------------------------------------
    def check_connection(self, tx: Tx, principal: Principal, connection: str) -> AgentRule:
        rule = self.rule(tx, principal)
        if not rule.may_use(connection):
            allowed = " ".join(rule.connections or ()) or "none"
            raise PolicyDenied(
                f"policy rule connections of agent {_shown(rule)} does not allow {connection} (it allows {allowed})"
            )
        return rule

    def spend(self, tx: Tx, principal: Principal, listing: Listing, total: int, now: datetime) -> None:
        """buy_quota may spend `total` on `listing`: its connection is allowed and the day's cap holds."""
        rule = self.check_connection(tx, principal, listing.connection)
        day = now.strftime("%Y-%m-%d")
        agent = principal.agent or ""
        if rule.max_spend_per_day is not None:
            spent = tx.usage(principal.account, agent, "spend", day)
            if spent + total > rule.max_spend_per_day:
                raise PolicyDenied(
                    f"policy rule max_spend_per_day of agent {_shown(rule)} is {rule.max_spend_per_day} credits: "
                    f"{spent} spent today (UTC), this purchase costs {total}"
                )
        if total > 0:
            tx.add_usage(principal.account, agent, "spend", day, total)

    def count_grant(self, tx: Tx, principal: Principal, connection: str, now: datetime) -> str:
        """One more token or grant this hour for (account, agent), within max_grants_per_hour; the hour."""
        rule = self.check_connection(tx, principal, connection)
        hour = now.strftime("%Y-%m-%dT%H")
        agent = principal.agent or ""
        if rule.max_grants_per_hour is not None:
            used = tx.usage(principal.account, agent, "grants", hour)
            if used >= rule.max_grants_per_hour:
                raise PolicyDenied(
                    f"policy rule max_grants_per_hour of agent {_shown(rule)} is {rule.max_grants_per_hour}: "
                    f"{used} tokens and grants this hour (UTC); try again next hour"
                )
        tx.add_usage(principal.account, agent, "grants", hour, 1)
        return hour

    def needs_approval(self, tx: Tx, principal: Principal, listing_approval: str) -> bool:
        """Whether a new token or grant must be approved by the account's owner (the listing or the policy)."""
        mode = self.rule(tx, principal).approval
        if mode == "always":
            return True
        if mode == "never":
            return False
        return listing_approval in ("grant", "writes")

    def writes_need_approval(self, tx: Tx, principal: Principal, listing_approval: str) -> bool:
        mode = self.rule(tx, principal).approval
        return mode != "never" and listing_approval == "writes"

    # ---- floods -----------------------------------------------------------------------------
    def fold(self, source: tuple[str, ...], now: float, last: Any = None, tx: Tx | None = None) -> int | None:
        """Whether a refusal from `source` gets an event now: the count of earlier refusals folded into it,
        or None (folded: `last` describes it, for the event that `due` hands out once its second is over).

        Decided inside `tx` (the refusal's event, if any, is written there): undone if `tx` is rolled back."""
        fold = self._folds.get(source)
        if tx is not None:
            kept = None if fold is None else _Fold(fold.until, fold.suppressed, fold.last)
            tx.on_undo(lambda: self._unfold(source, kept))
        if fold is not None and now < fold.until:
            fold.suppressed += 1
            fold.last = last
            return None
        suppressed = fold.suppressed if fold is not None else 0
        self._folds[source] = _Fold(now + self.fold_seconds, 0)
        if len(self._folds) > 10_000:  # many sources: forget the ones whose second is over and nothing folded
            self._folds = {k: v for k, v in self._folds.items() if v.until > now or v.suppressed}
        return suppressed

    def _unfold(self, source: tuple[str, ...], kept: _Fold | None) -> None:
        if kept is None:
            self._folds.pop(source, None)
        else:
            self._folds[source] = kept

    def due(self, now: float, everything: bool = False) -> list[tuple[int, Any]]:
        """Folded refusals whose second is over (or all of them): (how many, the last one), each once."""
        out: list[tuple[int, Any]] = []
        for source, fold in list(self._folds.items()):
            if fold.suppressed and (everything or now >= fold.until):
                out.append((fold.suppressed, fold.last))
                self._folds[source] = _Fold(now + self.fold_seconds, 0)
        return out


def _shown(rule: AgentRule) -> str:
    return escape_controls(rule.id)


class AuthFailures:
    """Rejected HTTP authentications per remote address over the last minute (per process).

    After AUTH_FAILURES of them an address is answered 429 before any token is parsed, until the oldest
    falls out of the window: a flood costs the broker a dictionary lookup, not a signature check.
    """

    def __init__(self, limit: int = AUTH_FAILURES, window: float = AUTH_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str, now: float) -> int | None:
        """Seconds `address` must wait, or None when it may try."""
        seen = self._failures.get(address)
        if seen is None:
            return None
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        if len(seen) < self.limit:
            return None
        return max(1, math.ceil(seen[0] + self.window - now))

    def failed(self, address: str, now: float) -> None:
        seen = self._failures.setdefault(address, deque(maxlen=self.limit))
        seen.append(now)
        if len(self._failures) > 100_000:  # a spread-out flood: keep the addresses that are still counting
            self._failures = {a: d for a, d in self._failures.items() if d and d[-1] > now - self.window}
