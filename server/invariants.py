"""The books' invariants (SPEC §5), checked over the whole database."""

from __future__ import annotations

from server import audit
from server.store import Tx


def check_invariants(tx: Tx) -> list[str]:
    """Every broken invariant as a sentence; empty when the books balance."""
    totals = tx.ledger_totals()
    problems: list[str] = []
    if totals.balance_sum != 0:
        problems.append(f"account balances sum to {totals.balance_sum}, not 0")
    problems += [f"wallet {name} is below zero" for name in totals.negative_wallets]
    problems += [f"account {name}'s balance differs from its transfers" for name in totals.balance_mismatches]
    problems += [
        f"holding {h}: bought ≠ held + consumed + reserved, or ≠ its purchases and moves"
        for h in totals.holding_mismatches
    ]
    problems += [f"listing {name}: units sold ≠ held + reserved + spent over its holdings"
                 for name in totals.unplaced_listings]
    problems += [f"operator move {mid} does not match its transfer" for mid in totals.move_mismatches]
    problems += [f"transfer {tid} moved credits between wallets, but no operator move made it"
                 for tid in totals.unmoved_transfers]
    problems += _move_events(tx)
    problems += [f"listing {name} sold more than its supply" for name in totals.oversold_listings]
    problems += [f"listing {name}'s sold count differs from its purchases" for name in totals.sold_mismatches]
    problems += [
        f"holding {h}: reserved/consumed units differ from its reservations" for h in totals.reserved_mismatches
    ]
    # units spent = tokens issued + grants opened: each committed reservation paid for exactly one of them
    committed, events = tx.token_events_by_reservation()
    granted = tx.grant_reservations()
    problems += [
        f"committed reservation {rid} has {events.get(rid, 0)} ok request_token events, not 1"
        for rid in sorted(committed - set(granted))
        if events.get(rid, 0) != 1
    ]
    problems += [f"grant {granted[rid]} was paid by reservation {rid}, which is not committed"
                 for rid in sorted(set(granted) - committed)]
    problems += [f"reservation {rid} paid for grant {granted[rid]} and for a request_token token"
                 for rid in sorted(set(granted) & set(events))]
    opened = tx.grant_opening_events()
    problems += [f"grant {gid} has {opened.get(gid, 0)} call_api events that opened it, not 1"
                 for gid in sorted(granted.values()) if opened.get(gid, 0) != 1]
    problems += [f"an ok request_token event names reservation {rid}, which is not committed"
                 for rid in sorted(set(events) - committed)]
    result = audit.verify_log(tx)
    if not result.ok:
        problems.append(f"audit chain broken at event {result.bad_id}: {result.reason}")
    return problems


def _move_events(tx: Tx) -> list[str]:
    """Each operator move is recorded by exactly one ok event on each of its two accounts."""
    recorded = tx.move_events()
    problems: list[str] = []
    for move in tx.moves():
        accounts = sorted(recorded.pop(move.move_id, []))
        if accounts != sorted([move.from_account, move.to_account]):
            problems.append(f"move {move.move_id} has events on {accounts or 'no account'}, not one on each of "
                            f"{move.from_account} and {move.to_account}")
    problems += [f"an ok transfer event names move {mid}, which does not exist" for mid in sorted(recorded)]
    return problems
