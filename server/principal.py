"""Who is calling: the principal of SPEC §3, and the one scope check every tool goes through."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from server.errors import InsufficientScope, Unauthenticated

SubjectType = Literal["access_token", "refresh_token"]
SUBJECT_TOKEN_TYPES: dict[SubjectType, str] = {
    "access_token": "urn:ietf:params:oauth:token-type:access_token",
    "refresh_token": "urn:ietf:params:oauth:token-type:refresh_token",
}


@dataclass(frozen=True)
class SubjectToken:
    """The token that identifies the caller to Token Vault. Never printed."""

    token: str = field(repr=False)
    kind: SubjectType

    @property
    def token_type(self) -> str:
        return SUBJECT_TOKEN_TYPES[self.kind]


@dataclass(frozen=True)
class Principal:
    """An account (`sub`), the agent acting for it (`azp`/`client_id`) and its scopes."""

    account: str
    agent: str | None
    scopes: frozenset[str]
    subject: SubjectToken | None = field(default=None, repr=False, compare=False)
    # the scopes in the order the token lists them, for messages a person reads
    scope_order: tuple[str, ...] = field(default=(), compare=False)

    @property
    def plain_names(self) -> bool:
        """Whether account and agent are free of NUL (text no store can hold, and no honest name has)."""
        return "\x00" not in self.account and "\x00" not in (self.agent or "")

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any], subject: SubjectToken | None = None) -> Principal:
        """Build a principal from verified JWT claims.

        Raises Unauthenticated when the token names no subject.
        """
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("the access token has no subject (sub); sign in again")
        agent = claims.get("azp") or claims.get("client_id")
        ordered = scopes_of(claims)
        return cls(
            account=sub,
            agent=agent if isinstance(agent, str) else None,
            scopes=frozenset(ordered),
            subject=subject,
            scope_order=tuple(ordered),
        )


def scopes_of(claims: Mapping[str, Any]) -> list[str]:
    """The `scope` claim split on spaces, united with the `permissions` claim (first-seen order)."""
    found: dict[str, None] = {}
    scope = claims.get("scope")
    if isinstance(scope, str):
        found.update(dict.fromkeys(s for s in scope.split(" ") if s))
    permissions = claims.get("permissions")
    if isinstance(permissions, list):
        found.update(dict.fromkeys(p for p in permissions if isinstance(p, str) and p))
    return list(found)


def require_scope(principal: Principal, scope: str, tool: str) -> None:
    """Raise InsufficientScope unless the principal holds `scope`."""
    if scope in principal.scopes:
        return
    shown = principal.scope_order or tuple(sorted(principal.scopes))
    held = " ".join(shown) or "no scopes"
    raise InsufficientScope(f"{tool} needs scope {scope}; the token grants {held}")
