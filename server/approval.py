"""Human approval of a grant through Auth0 CIBA (SPEC §9): ask the account's owner, wait for the answer.

`await_approval` sends one `/bc-authorize` request (a binding message naming agent and
connection, one `token_vault_grant` authorization detail) and polls until the owner answers,
the request expires, or Auth0 cannot be reached. Every refusal is a BrokerError whose message
says the unit was refunded: the caller refunds it in the same transaction as its event.
"""

from __future__ import annotations

import asyncio
import copy
import math
import re
import string
import time
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

from server.auth0.client import Auth0Client, Auth0Error, seconds
from server.errors import ApprovalDenied, ApprovalTimeout, BrokerError, RateLimited, VaultUnavailable

RAR_TYPE = "token_vault_grant"
MAX_BINDING_MESSAGE = 64  # Auth0's limit
MAX_CONNECTION_CHARS = 24  # of the binding message; the agent gets the rest
MAX_PURPOSE = 200
MAX_REASON = 200
SLOW_DOWN_STEP = 5  # seconds added to the interval on a slow_down without a new one (RFC 8628 §3.5)
MIN_INTERVAL = 1  # never poll in a tight loop, whatever a tenant says
REFUNDED = "your unit was refunded"

# Names in the binding message keep letters, digits and `-_.` only: with `:` and spaces reserved for
# the message itself, no agent name can pass itself off as another connection ("x: stripe").
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")
_EDGES = "-_."

Progress = Callable[[float, float | None, str], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


def binding_message(agent: str | None, connection: str) -> str:
    """The text shown on the owner's device, e.g. `Approve agent-x: github`.

    Always valid for Auth0 (at most 64 letters, digits, spaces and `+-_.,:#`) whatever the agent
    name: other characters are mapped to ASCII where Unicode allows (é → e) or to `-`, runs
    collapsed, and the names cut to fit.
    """
    where = _name(connection, MAX_CONNECTION_CHARS, "a connection")
    if agent is None:
        return f"Approve access to {where}"
    room = MAX_BINDING_MESSAGE - len("Approve : ") - len(where)
    return f"Approve {_name(agent, room, 'an agent')}: {where}"


def authorization_details(
    *,
    connection: str,
    scopes: list[str],
    agent: str | None,
    purpose: str,
    method: str | None = None,
    url: str | None = None,
) -> dict[str, Any]:
    """The one RAR object of an approval request: what the owner is asked to allow.

    `method` and `url` are given for `call_api`. The purpose (the agent's words) is cut to
    MAX_PURPOSE characters with control and format characters dropped.
    """
    detail: dict[str, Any] = {
        "type": RAR_TYPE,
        "connection": connection,
        "scopes": list(scopes),
        "agent": agent,
        "purpose": _plain(purpose, MAX_PURPOSE),
    }
    if method is not None:
        detail["method"] = method
    if url is not None:
        detail["url"] = url
    return detail


async def await_approval(
    auth0: Auth0Client,
    *,
    account: str,
    agent: str | None,
    connection: str,
    scopes: list[str],
    purpose: str,
    method: str | None = None,
    url: str | None = None,
    timeout: int,  # noqa: ASYNC109 - Auth0's requested_expiry, not a cancellation deadline
    progress: Progress | None = None,
    sleep: Sleep = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Ask `account`'s owner to approve, and return once they did.

    `timeout` seconds is the request's `requested_expiry`. Polls no sooner than Auth0's
    `interval` after the previous answer, growing it on `slow_down` (to the new `interval`
    sent, else by 5 s; a `Retry-After` is waited out too), and never waits more than one
    interval past `timeout`. `progress(elapsed, timeout, message)` is awaited after the
    request and after every poll still pending (an exception it raises ends the wait).

    Raises ApprovalDenied (the owner said no before `timeout` seconds, or Auth0 refused to
    ask: its reason is given), ApprovalTimeout (no answer within `timeout` seconds, which
    Auth0 reports as `access_denied` too), VaultUnavailable (Auth0 unreachable) or
    RateLimited (Auth0 rate limiting the request, or asking to wait past the expiry).
    """
    if timeout < 1:
        raise ValueError("an approval needs a timeout of at least one second")
    started = clock()
    details = authorization_details(
        connection=connection, scopes=scopes, agent=agent, purpose=purpose, method=method, url=url
    )
    try:
        request = await auth0.bc_authorize(
            login_sub=account,
            binding_message=binding_message(agent, connection),
            authorization_details=[details],
            requested_expiry=timeout,
        )
    except Auth0Error as exc:
        raise _not_asked(exc) from None
    # Auth0 may grant less time than asked; its expiry is an access_denied we must not call a denial.
    limit = started + max(1, min(timeout, request.expires_in))
    interval = max(MIN_INTERVAL, request.interval)
    pause = float(interval)
    if progress is not None:
        await progress(clock() - started, float(timeout), _waiting(connection))
    while True:
        await sleep(pause)
        try:
            await auth0.poll_ciba(request.auth_req_id)
            return
        except Auth0Error as exc:
            answer = exc
        now = clock()
        if answer.error == "authorization_pending":
            pause = float(interval)
        elif answer.error == "slow_down" or answer.status == 429:
            if answer.error == "slow_down":
                interval = max(interval, answer.interval) if answer.interval is not None else interval + SLOW_DOWN_STEP
            pause = max(float(interval), answer.retry_after or 0.0)
        elif answer.error == "expired_token" or (answer.error == "access_denied" and not answer.client_auth_failed):
            if now >= limit or answer.error == "expired_token":
                raise _timed_out(timeout)
            raise ApprovalDenied(f"the account's owner declined the request for {connection}; {REFUNDED}")
        else:
            raise _poll_failed(answer)
        if now >= limit:
            raise _timed_out(timeout)
        if now + pause > limit + interval:  # told to wait past the expiry: no answer can be had now
            wait = math.ceil(pause)
            raise RateLimited(
                f"Auth0 asks to wait {seconds(wait)} before asking again, past the approval's expiry; "
                f"{REFUNDED}, retry in {seconds(wait)}",
                wait,
            )
        if progress is not None:
            await progress(now - started, float(timeout), _waiting(connection))


def nothing_spent(error: BrokerError) -> BrokerError:
    """The same refusal, worded for an approval that had no unit reserved (a write inside a live grant)."""
    changed = copy.copy(error)
    changed.message = error.message.replace(REFUNDED, "nothing was spent")
    changed.args = (changed.message,)
    return changed


def _waiting(connection: str) -> str:
    return f"waiting for the account's owner to approve {connection} on their device"


def _timed_out(timeout: int) -> ApprovalTimeout:
    return ApprovalTimeout(
        f"the account's owner did not answer the approval request within {seconds(timeout)}; {REFUNDED}, "
        "ask again when they can approve"
    )


def _not_asked(exc: Auth0Error) -> BrokerError:
    """Auth0's refusal of `/bc-authorize` as the error the caller answers with."""
    if _unavailable(exc):
        return VaultUnavailable(f"Auth0 could not be reached to ask for approval; {REFUNDED}, try again shortly")
    if exc.status == 429:
        wait = exc.wait_seconds
        return RateLimited(f"Auth0 is rate limiting approval requests; {REFUNDED}, retry in {seconds(wait)}", wait)
    return ApprovalDenied(f"Auth0 could not ask the account's owner for approval ({_reason(exc)}); {REFUNDED}")


def _poll_failed(exc: Auth0Error) -> BrokerError:
    if _unavailable(exc):
        return VaultUnavailable(
            f"Auth0 stopped answering while waiting for approval; {REFUNDED}, try again shortly"
        )
    return ApprovalDenied(f"Auth0 refused the approval request ({_reason(exc)}); {REFUNDED}")


def _unavailable(exc: Auth0Error) -> bool:
    """No answer, a 5xx, or an unreadable 200 (all already retried by the client)."""
    return exc.unreachable or (exc.status or 0) >= 500 or (exc.status or 0) < 400


def _reason(exc: Auth0Error) -> str:
    """Auth0's error code and description, bounded, with no control characters."""
    code = _plain(exc.error or f"HTTP {exc.status}", 60)
    description = _plain(exc.description or "", MAX_REASON)
    return f"{code}: {description}" if description else code


def _plain(text: str, limit: int) -> str:
    """`text` on one line, without control or format characters (ANSI escapes, bidi overrides), cut."""
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Cc", "Zl", "Zp"):
            kept.append(" ")
        elif category not in ("Cf", "Cs", "Co", "Cn"):
            kept.append(ch)
    return " ".join("".join(kept).split())[:limit].rstrip()


def _name(text: str, limit: int, fallback: str) -> str:
    """`text` in the binding message's name characters, at most `limit` long (`fallback` if none left)."""
    ascii_text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    mapped = "".join(ch if ch in _NAME_CHARS else "-" for ch in ascii_text)
    collapsed = re.sub(r"-{2,}", "-", mapped).strip(_EDGES)
    cut = collapsed[: max(0, limit)].rstrip(_EDGES)
    return cut or fallback[: max(0, limit)]
