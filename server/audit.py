"""The tamper-evident audit log (SPEC §5): a SHA-256 hash chain of one event per call.

`hash = SHA-256(prev_hash ‖ canonical JSON of the event's other fields)`; the first
event chains from 32 zero bytes. Tokens are never stored: `token_id` is an HMAC-SHA256
of the token under a per-database key, so a leaked token can be looked up but no token
can be recovered from the log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _json_string  # the C encoder json.dumps uses
from typing import Any, cast

from server.allowlist import keys_only
from server.errors import AuditUnavailable
from server.models import AuditRecord
from server.store import Tx

GENESIS = bytes(32)
MAX_TEXT = 500  # longest argument string kept; longer ones are cut (events stay small)
KEPT_ARGS = frozenset(
    {
        "connection",
        "include_closed",
        "limit",
        "cursor",
        "listing_id",
        "units",
        "max_unit_price",
        "idempotency_key",
        "scopes",
        "purpose",
        "account",
        "amount",
        "reason",
        "remote",
        "flags",
        "reservation_id",
        # call_api (§8): the request's shape, never its headers or body; the url without query values
        "method",
        "url",
        "login_hint",
        "grant_id",
        "new_grant",
        "status",
        # operator control (§9)
        "suppressed",
        "agent",
        "grants_closed",
        "rules",
        # operator moves (§11)
        "operator",
        "from_account",
        "to_account",
        "move_id",
        "side",
        "replayed",
    }
)
REDACTED = "[redacted]"
HEAD_KEY = "audit_head"


@dataclass
class Event:
    """An audit event before it is chained and stored."""

    ts: str
    transport: str
    outcome: str
    account: str | None = None
    agent: str | None = None
    tool: str | None = None
    scope: str | None = None
    code: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    token_id: bytes | None = None
    latency_ms: float | None = None


def token_fingerprint(key: bytes, token: str) -> bytes:
    """HMAC-SHA256 of a token under the database's key."""
    return hmac.new(key, token.encode(), hashlib.sha256).digest()


def redact(args: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments fit for the log: known fields kept (strings cut), anything else redacted."""
    clean: dict[str, Any] = {}
    for name, value in list(args.items())[:32]:
        key = _cut(_no_nul(str(name)), 64)
        if name == "url" and isinstance(value, str):
            value = keys_only(value)  # even for a call refused before validation: query values may be secrets
        clean[key] = _clean_value(value) if name in KEPT_ARGS else REDACTED
    return clean


def _clean_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return _cut(_no_nul(value), MAX_TEXT)
    if isinstance(value, list | tuple):
        return [_clean_value(v) for v in list(value)[:32]]
    return REDACTED


def _no_nul(text: str) -> str:
    # NUL has no place in a stored event (PostgreSQL's JSON cannot hold it): shown as the four characters \x00
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def canonical(record_fields: Mapping[str, Any]) -> bytes:
    return json.dumps(record_fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _hash_input(
    id_: int, ev_ts: str, account: str | None, agent: str | None, tool: str | None, transport: str,
    scope: str | None, outcome: str, code: str | None, args: str, token_id: bytes | None,
    latency_ms: float | None,
) -> bytes:
    try:
        return _hash_input_fast(
            id_, ev_ts, account, agent, tool, transport, scope, outcome, code, args, token_id, latency_ms
        )
    except _NotPlain:
        pass
    return canonical(
        {
            "id": id_,
            "ts": ev_ts,
            "account": account,
            "agent": agent,
            "tool": tool,
            "transport": transport,
            "scope": scope,
            "outcome": outcome,
            "code": code,
            "args": args,
            "token_id": None if token_id is None else token_id.hex(),
            "latency_ms": latency_ms,
        }
    )


class _NotPlain(Exception):
    """A field the fast encoding does not handle; `canonical` encodes it."""


def _hash_input_fast(
    id_: object, ev_ts: object, account: object, agent: object, tool: object, transport: object,
    scope: object, outcome: object, code: object, args: object, token_id: object, latency_ms: object,
) -> bytes:
    """The same bytes as `canonical` of the event's fields, without building a dict and sorting its keys.

    `audit verify` hashes every event; this is most of its time. Keys in sorted order, as
    `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)` writes them; a field
    of another type than a stored event holds (str, int id, finite float) raises _NotPlain.
    """
    if type(id_) is not int:
        raise _NotPlain
    latency, token = _latency_json(latency_ms), _token_json(token_id)
    # _json_string raises TypeError for anything but a str
    s, known = cast(Callable[[object], str], _json_string), _KNOWN_STRINGS
    try:
        return _body(
            known.get(account) or _known(account), known.get(agent) or _known(agent), s(args),
            known.get(code) or _known(code), int.__repr__(id_), latency, known.get(outcome) or _known(outcome),
            known.get(scope) or _known(scope), token, known.get(tool) or _known(tool),
            known.get(transport) or _known(transport), s(ev_ts),
        )
    except TypeError:
        raise _NotPlain from None


def _body(
    account: str, agent: str, args: str, code: str, id_: str, latency_ms: str, outcome: str, scope: str,
    token_id: str, tool: str, transport: str, ts: str,
) -> bytes:
    """An event's canonical JSON from its fields, each given as JSON text: the keys in sorted order, as
    `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)` writes them. What both
    `append` and `verify` hash."""
    return (
        f'{{"account":{account},"agent":{agent},"args":{args},"code":{code},"id":{id_},'
        f'"latency_ms":{latency_ms},"outcome":{outcome},"scope":{scope},"token_id":{token_id},'
        f'"tool":{tool},"transport":{transport},"ts":{ts}}}'
    ).encode()


def _latency_json(latency_ms: object) -> str:
    """`latency_ms` as JSON; raises _NotPlain for anything but None or a finite float."""
    if latency_ms is None:
        return "null"
    if type(latency_ms) is float and math.isfinite(latency_ms):
        return float.__repr__(latency_ms)
    raise _NotPlain


def _token_json(token_id: object) -> str:
    """`token_id` as JSON (hex text); raises _NotPlain for anything but None or bytes."""
    if token_id is None:
        return "null"
    if type(token_id) is bytes:
        return '"' + token_id.hex() + '"'
    raise _NotPlain


# Accounts, agents, tools, scopes, outcomes and codes repeat from event to event: their JSON is kept.
_KNOWN_STRINGS: dict[object, str] = {None: "null"}
_KNOWN_LIMIT = 10_000


def _known(value: object) -> str:
    """`value` (None or a str) in JSON, remembered. Raises TypeError for any other type."""
    encoded = _json_string(value)  # type: ignore[arg-type]
    if len(_KNOWN_STRINGS) >= _KNOWN_LIMIT:
        _KNOWN_STRINGS.clear()
        _KNOWN_STRINGS[None] = "null"
    _KNOWN_STRINGS[value] = encoded
    return encoded


def chain_hash(prev_hash: bytes, body: bytes) -> bytes:
    return hashlib.sha256(prev_hash + body).digest()


def append(tx: Tx, event: Event) -> int:
    """Chain `event` onto the log inside the current transaction; return its id.

    Raises AuditUnavailable when the row cannot be written (the caller's whole job
    then rolls back: fail closed).
    """
    try:
        prev_id, prev_hash = _chain_head(tx)
        new_id = prev_id + 1
        args = (
            json.dumps(redact(event.args), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            if event.args
            else "{}"
        )
        latency = None if event.latency_ms is None else round(event.latency_ms, 3)
        body = _hash_input(
            new_id, event.ts, event.account, event.agent, event.tool, event.transport, event.scope,
            event.outcome, event.code, args, event.token_id, latency,
        )
        tx.insert_audit(
            AuditRecord(
                id=new_id,
                ts=event.ts,
                account=event.account,
                agent=event.agent,
                tool=event.tool,
                transport=event.transport,
                scope=event.scope,
                outcome=event.outcome,
                code=event.code,
                args=args,
                token_id=event.token_id,
                latency_ms=latency,
                prev_hash=prev_hash,
                hash=(new_hash := chain_hash(prev_hash, body)),
            )
        )
        # the head is kept apart from the rows, so deleting the newest events is noticed too
        tx.set_meta(HEAD_KEY, f"{new_id}:{new_hash.hex()}")
    except Exception as exc:
        raise AuditUnavailable("the audit log could not be written, so nothing was done; try again") from exc
    return new_id


def recorded_head(tx: Tx) -> str | None:
    """The stored `id:hash` of the newest event, as text (None before the first event)."""
    recorded = tx.get_meta(HEAD_KEY)
    return recorded.decode() if isinstance(recorded, bytes) else recorded


def verify_log(tx: Tx, progress: Callable[[int], None] | None = None) -> VerifyResult:
    """Verify the whole stored chain against its recorded head."""
    return verify(tx.iter_audit_rows(), tx.audit_names(), recorded_head(tx), progress)


def _chain_head(tx: Tx) -> tuple[int, bytes]:
    """Where the next event chains on: the recorded head, not merely the newest row left.

    Chaining from the newest row would let one more call paper over deleted tail events.
    Raises ValueError when the recorded head is unreadable (the caller fails closed).
    """
    recorded = recorded_head(tx)
    if recorded is None:
        newest = tx.audit_head()
        return newest if newest is not None else (0, GENESIS)
    parsed = _parse_head(recorded)
    if parsed is None:
        raise ValueError("the recorded audit head is unreadable")
    return parsed


def _parse_head(head: str) -> tuple[int, bytes] | None:
    id_text, _, hash_hex = head.partition(":")
    try:
        return int(id_text), bytes.fromhex(hash_hex)
    except ValueError:
        return None


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    bad_id: int | None = None
    reason: str | None = None


def verify(
    rows: Iterable[Sequence[Any]],
    names: Mapping[int, str],
    head: str | None,
    progress: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Walk the chain; report the first event whose position, names or hash are wrong.

    `rows` are stored rows in id order (`Tx.iter_audit_rows`: names as ids into `names`); `head`
    is the stored `id:hash` of the newest event, which catches a cut-off tail. Each event must hash,
    from the previous event's hash, to its own: an edit, an insertion, a deletion or a reordering
    breaks the chain at the first event it touches.
    """
    prev_id, prev_hash = 0, GENESIS
    checked = 0
    sha256, s = hashlib.sha256, _json_string
    # each name's JSON, by id: events refer to a few names over and over
    known: dict[Any, str] = {i: s(n) for i, n in names.items() if type(n) is str}
    known[None] = "null"
    for row in rows:
        # unpacked once: this loop runs for every event of the log
        id_, ts, account, agent, tool, transport, scope, outcome, code, args, token_id, latency, hash_ = row
        if id_ != prev_id + 1:
            return VerifyResult(False, checked, id_, f"event {prev_id + 1} is missing (next is {id_})")
        try:
            body = _body(
                known[account], known[agent], s(args), known[code], int.__repr__(id_), _latency_json(latency),
                known[outcome], known[scope], _token_json(token_id), known[tool], known[transport], s(ts),
            )
        except (KeyError, TypeError, _NotPlain):
            return VerifyResult(False, checked, id_, "it is unreadable: a field was edited")
        if type(hash_) is not bytes or sha256(prev_hash + body).digest() != hash_:  # chain_hash, inlined
            return VerifyResult(
                False, checked, id_, "its hash does not match its content and the event before it (edited)"
            )
        prev_id, prev_hash = id_, hash_
        checked += 1
        if progress is not None and checked % 10_000 == 0:
            progress(checked)
    if head is None:
        if checked:
            return VerifyResult(False, checked, prev_id, "the recorded head of the chain is missing")
        return VerifyResult(True, checked)
    if head != f"{prev_id}:{prev_hash.hex()}":
        parsed = _parse_head(head)
        if parsed is None:
            return VerifyResult(False, checked, prev_id, "the recorded head of the chain is unreadable")
        head_id = parsed[0]
        if head_id > prev_id:
            return VerifyResult(False, checked, prev_id + 1, f"events {prev_id + 1}..{head_id} are missing")
        return VerifyResult(False, checked, head_id, "it does not match the recorded head of the chain")
    return VerifyResult(True, checked)


def export_line(rec: AuditRecord) -> dict[str, Any]:
    """The JSON Lines shape of SPEC §5."""
    return {
        "id": rec.id,
        "ts": rec.ts,
        "account": rec.account,
        "agent": rec.agent,
        "tool": rec.tool,
        "transport": rec.transport,
        "scope": rec.scope,
        "outcome": rec.outcome,
        "code": rec.code,
        "args": json.loads(rec.args),
        "token_id": None if rec.token_id is None else rec.token_id.hex(),
        "latency_ms": rec.latency_ms,
        "prev_hash": None if rec.prev_hash is None else rec.prev_hash.hex(),
        "hash": rec.hash.hex(),
    }
