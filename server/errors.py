"""The one error tree of the broker, with the stable codes of SPEC §2.

    BrokerError (code, outcome)
    ├── Unauthenticated          unauthenticated        denied
    ├── InsufficientScope        insufficient_scope     denied
    ├── InvalidArgument          invalid_argument       denied
    ├── UnknownListing           unknown_listing        denied
    ├── ListingClosed            listing_closed         denied
    ├── SoldOut                  sold_out               denied
    ├── InsufficientFunds        insufficient_funds     denied
    ├── PriceAboveLimit          price_above_limit      denied
    ├── IdempotencyKeyReused     idempotency_key_reused denied
    ├── NoQuota                  no_quota               denied
    ├── ScopeNotCovered          scope_not_covered      denied
    ├── AccountNotConnected      account_not_connected  denied
    ├── VaultDenied              vault_denied           denied
    ├── VaultUnavailable         vault_unavailable      error   (retryable; quota refunded)
    │   └── LeaseLapsed                                    (the reservation's lease lapsed first)
    ├── RateLimited              rate_limited           error   (retry_after seconds)
    ├── ProxyOnly                proxy_only             denied  (use call_api: the listing keeps its token)
    ├── ApiNotAllowed            api_not_allowed        denied  (url or method outside the listing's api)
    ├── ApiUnavailable           api_unavailable        error   (the provider did not answer in time)
    ├── AgentBlocked             agent_blocked          denied  (the operator's kill switch; says why)
    ├── PolicyDenied             policy_denied          denied  (names the policy rule)
    ├── ApprovalDenied           approval_denied        denied  (the account's owner said no; unit refunded)
    ├── ApprovalTimeout          approval_timeout       error   (no answer in time; unit refunded)
    ├── AuditUnavailable         audit_unavailable      error
    └── InternalError            internal               error   (no details leaked)

Every message is a sentence a person can act on and never carries a token or secret.
Tools turn these into `[code] message` results in one place (tools/registry.py).
"""

from __future__ import annotations

from typing import ClassVar, Literal

Outcome = Literal["ok", "denied", "error"]


class BrokerError(Exception):
    """Base of every error a tool can answer with."""

    code: ClassVar[str] = "internal"
    outcome: ClassVar[Outcome] = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def render(self) -> str:
        """The text of the tool result: `[code] message`."""
        return f"[{self.code}] {self.message}"


class Unauthenticated(BrokerError):
    code = "unauthenticated"
    outcome = "denied"


class InsufficientScope(BrokerError):
    code = "insufficient_scope"
    outcome = "denied"


class InvalidArgument(BrokerError):
    code = "invalid_argument"
    outcome = "denied"


class UnknownListing(BrokerError):
    code = "unknown_listing"
    outcome = "denied"


class ListingClosed(BrokerError):
    code = "listing_closed"
    outcome = "denied"


class SoldOut(BrokerError):
    code = "sold_out"
    outcome = "denied"


class InsufficientFunds(BrokerError):
    code = "insufficient_funds"
    outcome = "denied"


class PriceAboveLimit(BrokerError):
    code = "price_above_limit"
    outcome = "denied"


class IdempotencyKeyReused(BrokerError):
    code = "idempotency_key_reused"
    outcome = "denied"


class NoQuota(BrokerError):
    code = "no_quota"
    outcome = "denied"


class ScopeNotCovered(BrokerError):
    code = "scope_not_covered"
    outcome = "denied"


class AccountNotConnected(BrokerError):
    code = "account_not_connected"
    outcome = "denied"


class VaultDenied(BrokerError):
    code = "vault_denied"
    outcome = "denied"


class VaultUnavailable(BrokerError):
    code = "vault_unavailable"


class LeaseLapsed(VaultUnavailable):
    """A reservation was refunded by another process before this one committed it (its lease lapsed)."""

    def __init__(self) -> None:
        super().__init__(
            "the broker took too long and the reserved unit was given back; nothing was spent, try again"
        )


class RateLimited(BrokerError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProxyOnly(BrokerError):
    code = "proxy_only"
    outcome = "denied"


class ApiNotAllowed(BrokerError):
    code = "api_not_allowed"
    outcome = "denied"


class ApiUnavailable(BrokerError):
    code = "api_unavailable"


class AgentBlocked(BrokerError):
    code = "agent_blocked"
    outcome = "denied"


class PolicyDenied(BrokerError):
    code = "policy_denied"
    outcome = "denied"


class ApprovalDenied(BrokerError):
    code = "approval_denied"
    outcome = "denied"


class ApprovalTimeout(BrokerError):
    code = "approval_timeout"


class AuditUnavailable(BrokerError):
    code = "audit_unavailable"


class InternalError(BrokerError):
    code = "internal"

    def __init__(self, message: str = "the broker hit an unexpected error; it was logged") -> None:
        super().__init__(message)


class ConfigError(Exception):
    """A configuration value is wrong; the message names the variable."""


def describe_failure(exc: BaseException) -> str:
    """`Type at file:line` of where an unexpected exception was raised: enough to find the bug,
    with no message, argument or traceback that could carry a token or an agent's data."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {tb.tb_frame.f_code.co_filename.rsplit('/', 2)[-1]}:{tb.tb_lineno}" if tb is not None else ""
    return f"{type(exc).__name__}{where}"
