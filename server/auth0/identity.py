"""Who the stdio user is: their Auth0 refresh token, exchanged for a verified access token (SPEC §3)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from server.auth0.client import Auth0Client, Auth0Error, renew_at, seconds
from server.auth0.token_verifier import InvalidToken, JwtVerifier
from server.errors import BrokerError, RateLimited, Unauthenticated, VaultUnavailable
from server.principal import Principal, SubjectToken
from server.singleflight import SingleFlight

log = logging.getLogger(__name__)


class StdioIdentity:
    """The local user's principal, renewed shortly before expiry; concurrent callers share one refresh."""

    def __init__(
        self,
        auth0: Auth0Client,
        verifier: JwtVerifier,
        refresh_token: str | None,
        refresh_client_id: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._auth0 = auth0
        self._verifier = verifier
        self._refresh_token = refresh_token
        self._refresh_client = refresh_client_id or auth0.client_id
        self._clock = clock
        self._principal: Principal | None = None
        self._renew_at = 0.0
        self._flight: SingleFlight[str, Principal] = SingleFlight()

    @property
    def uses_refresh_subject(self) -> bool:
        """A refresh token of the broker's own client is itself the Token Vault subject."""
        return self._refresh_client == self._auth0.client_id

    async def for_request(self, _http_scope: object = None) -> Principal:
        """The principal source for stdio: one user, whatever the request."""
        return await self.principal()

    async def principal(self) -> Principal:
        """The verified principal. Raises Unauthenticated, RateLimited, or VaultUnavailable when Auth0
        cannot be reached; a burst of callers on a cold or stale cache shares one refresh (and its failure).
        """
        if self._principal is not None and self._clock() < self._renew_at:
            return self._principal
        return await self._flight.do("renew", self._renew)

    async def _renew(self) -> Principal:
        if not self._refresh_token:
            raise Unauthenticated(
                "no Auth0 login: run `token-vault-mcp login` or set TVM_REFRESH_TOKEN, then restart the server"
            )
        issued = self._clock()
        try:
            tokens = await self._auth0.refresh(self._refresh_token, self._refresh_client)
        except Auth0Error as exc:
            raise _refresh_error(exc) from None
        try:
            claims = await self._verifier.verify(tokens.access_token)
        except InvalidToken as exc:
            log.warning("the access token from the refresh grant was refused: %s", exc)
            raise Unauthenticated(f"the access token Auth0 issued was refused: {exc}") from None
        if self.uses_refresh_subject:
            subject = SubjectToken(self._refresh_token, "refresh_token")
        else:
            subject = SubjectToken(tokens.access_token, "access_token")
        expires_at = float(claims.get("exp", tokens.expires_at))
        self._principal = Principal.from_claims(claims, subject)
        self._renew_at = renew_at(issued, expires_at)
        return self._principal


def _refresh_error(exc: Auth0Error) -> BrokerError:
    """Auth0's refusal of the refresh grant, as the answer a stdio user can act on."""
    if exc.status == 429:
        return RateLimited(f"Auth0 is rate limiting sign-ins; retry in {seconds(exc.wait_seconds)}", exc.wait_seconds)
    if exc.unreachable or (exc.status or 0) >= 500 or (exc.status or 0) < 400:
        return VaultUnavailable("Auth0 could not be reached to confirm who you are; try again shortly")
    if exc.client_auth_failed:
        return Unauthenticated(
            f"Auth0 refused this server's client authentication ({exc.error}); "
            "check AUTH0_CLIENT_ID and AUTH0_CLIENT_SECRET or TVM_CLIENT_KEY_FILE"
        )
    return Unauthenticated(
        f"Auth0 refused the stored login ({exc.error or exc.status}); run `token-vault-mcp login` again"
    )
