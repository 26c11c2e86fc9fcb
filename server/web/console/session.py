"""Console sessions: one-time sign-in links, session cookies and their CSRF tokens.

A session is a random id (256 bits) in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` over
https) that expires; the server keeps only its SHA-256, the operator's name, its CSRF token and
its expiry, in this process's memory (a restart signs everyone out). The one-time link of local
and demo mode is another random token, kept the same way, good for one visit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "tvm_console"
SESSION_SECONDS = 8 * 3600  # a working day; then the operator signs in again
LINK_SECONDS = 24 * 3600  # how long an unused one-time link stays good
MAX_SESSIONS = 1000  # oldest dropped beyond this: a flood of sign-ins cannot grow memory without bound


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class Session:
    operator: str  # who signed in: the Auth0 `sub`, or `console:<user>` locally
    csrf: str = ""
    expires: float = 0.0

    def csrf_ok(self, given: str | None) -> bool:
        """Whether a form's CSRF token is this session's (compared in constant time)."""
        return bool(given) and hmac.compare_digest(self.csrf.encode(), str(given).encode())


class Sessions:
    """Live sessions and the one-time link, by the SHA-256 of their secrets."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._sessions: dict[bytes, Session] = {}
        self._links: dict[bytes, tuple[str, float]] = {}

    def one_time_link(self, operator: str) -> str:
        """A fresh one-time sign-in token for `operator` (the caller prints it; it is never logged)."""
        token = secrets.token_urlsafe(32)
        self._links[_digest(token)] = (operator, self._clock() + LINK_SECONDS)
        return token

    def redeem(self, token: str) -> str | None:
        """The operator a one-time token signs in, consuming it; None for an unknown, used or old token."""
        found = self._links.pop(_digest(token), None) if token else None
        if found is None or found[1] < self._clock():
            return None
        return found[0]

    def open(self, operator: str) -> tuple[str, Session]:
        """A new session for `operator`: (the cookie's value, the session)."""
        now = self._clock()
        self._sessions = {k: v for k, v in self._sessions.items() if v.expires > now}
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        secret = secrets.token_urlsafe(32)
        session = Session(operator, secrets.token_urlsafe(32), now + SESSION_SECONDS)
        self._sessions[_digest(secret)] = session
        return secret, session

    def get(self, secret: str | None) -> Session | None:
        """The live session of a cookie value, or None (unknown or expired)."""
        if not secret:
            return None
        session = self._sessions.get(_digest(secret))
        if session is None or session.expires <= self._clock():
            return None
        return session

    def close(self, secret: str | None) -> None:
        if secret:
            self._sessions.pop(_digest(secret), None)
