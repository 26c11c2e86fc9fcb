"""The operator's policy file (SPEC §9): per-agent rules, replaced as a whole on load.

    [[agent]]
    id = "*"                   # the token's azp / client_id; "*" = every agent not named
    connections = ["github"]   # connections it may use (absent = all)
    calls_per_minute = 120     # tool calls per (account, agent), token bucket (default 600)
    max_spend_per_day = 5000   # credits buy_quota may spend per (account, agent) per UTC day
    max_grants_per_hour = 60   # request_token tokens + new call_api grants per (account, agent)
    approval = "listing"       # "listing" (as each listing says) | "always" | "never"

A malformed file is refused with one line naming the entry and the key; nothing of it is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from server.tomlfile import read_toml

DEFAULT_CALLS_PER_MINUTE = 600
MAX_RATE = 1_000_000
AgentId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
Connection = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")]


class AgentRule(BaseModel):
    """One `[[agent]]` table."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: AgentId
    connections: tuple[Connection, ...] | None = None
    calls_per_minute: Annotated[int, Field(ge=1, le=MAX_RATE)] = DEFAULT_CALLS_PER_MINUTE
    max_spend_per_day: Annotated[int, Field(ge=0, le=10**15)] | None = None
    max_grants_per_hour: Annotated[int, Field(ge=0, le=MAX_RATE)] | None = None
    approval: Literal["listing", "always", "never"] = "listing"

    def may_use(self, connection: str) -> bool:
        return self.connections is None or connection in self.connections


DEFAULT_RULE = AgentRule(id="*")


class Policy(BaseModel):
    """The whole policy: the rules by agent id, `*` for every other agent (the defaults when absent)."""

    model_config = ConfigDict(frozen=True)

    agents: tuple[AgentRule, ...] = ()

    def rule_for(self, agent: str | None) -> AgentRule:
        named = {rule.id: rule for rule in self.agents}
        return named.get(agent or "", named.get("*", DEFAULT_RULE))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls.model_validate_json(text)


class PolicyFileError(Exception):
    """The policy file cannot be read or an entry in it is invalid (the message names the entry and key)."""


def read_policy_file(path: str | Path) -> Policy:
    """Parse and check a policy file. Raises PolicyFileError."""
    return parse_policy(read_toml(path, "policy", PolicyFileError), str(path))


def parse_policy(data: dict[str, object], source: str = "policy") -> Policy:
    unknown = sorted(set(data) - {"agent"})
    if unknown:
        raise PolicyFileError(
            f"{source}: unknown table or key {', '.join(json.dumps(k) for k in unknown)}; rules are [[agent]] tables"
        )
    tables = data.get("agent", [])
    if not isinstance(tables, list):
        raise PolicyFileError(f"{source}: expected [[agent]] tables")
    rules: list[AgentRule] = []
    for number, table in enumerate(tables, start=1):
        name = json.dumps(table["id"]) if isinstance(table, dict) and "id" in table else f"#{number}"
        if isinstance(table, dict) and isinstance(table.get("connections"), list):
            table = {**table, "connections": tuple(table["connections"])}  # strict mode wants the frozen form
        try:
            rule = AgentRule.model_validate(table)
        except ValidationError as exc:
            problems = "; ".join(_problem(e) for e in exc.errors())
            raise PolicyFileError(f"{source}: agent {name}: {problems}") from None
        if any(r.id == rule.id for r in rules):
            raise PolicyFileError(f"{source}: agent {name} appears twice")
        rules.append(rule)
    return Policy(agents=tuple(rules))


def _problem(error: object) -> str:
    assert isinstance(error, dict)
    where = ".".join(str(p) for p in error["loc"]) or "agent"
    if error["type"] == "extra_forbidden":
        keys = ", ".join(AgentRule.model_fields)
        return f"{where}: unknown key; an agent rule has {keys}"
    return f"{where}: {error['msg']}"
