"""How an operator signs in to the console (SPEC §11).

- `LinkSignIn` (local `token-vault-mcp console`, and the demo): a one-time URL with a random token,
  printed on stderr, traded at the first visit for a session; a fresh one is printed after each use.
- `Auth0SignIn` (the remote server with a tenant): OIDC authorization code + PKCE with
  `TVM_CONSOLE_CLIENT_ID` (and `TVM_CONSOLE_CLIENT_SECRET` for a confidential app) through the one
  Auth0 client; the access token for `AUTH0_AUDIENCE` is verified like an MCP bearer token and must
  carry `manage:broker`, else 403. `state` is bound to the browser by a short-lived cookie.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from server.auth0.client import Auth0Client, Auth0Error
from server.auth0.token_verifier import InvalidToken, JwtVerifier
from server.errors import Unauthenticated
from server.principal import Principal
from server.web.console.session import Sessions

MANAGE_SCOPE = "manage:broker"
STATE_COOKIE = "tvm_console_state"
STATE_SECONDS = 600
MAX_PENDING = 1000


class SignInRefused(Exception):
    """A sign-in that must not open a session; `status` is the HTTP answer (400, 403 or 502)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class LinkSignIn:
    """One-time links: `announce` prints one on stderr; `redeem` trades it for the operator's name."""

    kind = "link"

    def __init__(self, sessions: Sessions, operator: str, out: TextIO | None = None) -> None:
        self.sessions = sessions
        self.operator = operator
        self.out = out
        self.base_url = ""

    def announce(self, base_url: str) -> str:
        """Print a fresh one-time URL on stderr (never stdout, never a log) and return it."""
        self.base_url = base_url.rstrip("/")
        url = f"{self.base_url}/console/signin?token={self.sessions.one_time_link(self.operator)}"
        print(f"  operator console: open {url} (one-time link; a new one is printed after each use)",
              file=self.out or sys.stderr, flush=True)
        return url

    def redeem(self, token: str) -> str | None:
        operator = self.sessions.redeem(token)
        if operator is not None and self.base_url:
            self.announce(self.base_url)  # the next sign-in (another browser, after a restart of the browser)
        return operator


@dataclass(frozen=True)
class _Pending:
    verifier: str
    browser: str  # the digest of the state cookie's value: the browser that began this sign-in
    redirect_uri: str
    expires: float


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Auth0SignIn:
    """OIDC authorization code + PKCE against the tenant, for operators holding `manage:broker`."""

    kind = "auth0"

    def __init__(
        self, auth0: Auth0Client, verifier: JwtVerifier, audience: str, client_id: str, client_secret: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.auth0 = auth0
        self.verifier = verifier
        self.audience = audience
        self.client_id = client_id
        self.client_secret = client_secret
        self._clock = clock
        self._pending: dict[str, _Pending] = {}

    def begin(self, redirect_uri: str) -> tuple[str, str]:
        """Start a sign-in: (the `/authorize` URL to send the browser to, the state cookie's value)."""
        now = self._clock()
        self._pending = {k: v for k, v in self._pending.items() if v.expires > now}
        while len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
        state, verifier, browser = (secrets.token_urlsafe(32) for _ in range(3))
        self._pending[_digest(state)] = _Pending(verifier, _digest(browser), redirect_uri, now + STATE_SECONDS)
        url = self.auth0.authorize_url(
            client_id=self.client_id, redirect_uri=redirect_uri, scope="openid", audience=self.audience,
            state=state, code_challenge=_challenge(verifier),
        )
        return url, browser

    async def finish(self, state: str, code: str, browser: str | None) -> str:
        """Trade the code for tokens and return the operator's `sub`. Raises SignInRefused (400 for a
        stale or foreign sign-in, 403 without `manage:broker`, 502 when Auth0 fails)."""
        pending = self._pending.pop(_digest(state), None) if state else None
        if pending is None or pending.expires < self._clock():
            raise SignInRefused("this sign-in is unknown or too old; start again from the console")
        if not browser or _digest(browser) != pending.browser:
            raise SignInRefused("this sign-in was started in another browser; start again from the console")
        if not code:
            raise SignInRefused("Auth0 sent no authorization code back")
        try:
            tokens = await self.auth0.exchange_code(
                client_id=self.client_id, client_secret=self.client_secret, code=code,
                code_verifier=pending.verifier, redirect_uri=pending.redirect_uri,
            )
        except Auth0Error as exc:
            raise SignInRefused(f"Auth0 refused the sign-in ({exc.error or 'no answer'})", 502) from None
        try:
            principal = Principal.from_claims(await self.verifier.verify(tokens.access_token))
        except (InvalidToken, Unauthenticated) as exc:
            raise SignInRefused(f"the access token Auth0 issued is not valid here: {exc}", 403) from None
        if MANAGE_SCOPE not in principal.scopes:
            raise SignInRefused(f"the console needs the permission {MANAGE_SCOPE}; ask your Auth0 administrator", 403)
        return principal.account
