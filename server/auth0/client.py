"""The one place the broker talks to Auth0 (or the emulator: it cannot tell the difference).

Every request goes through `Auth0Client._request` on one `httpx.AsyncClient`, whose
transport tests and the demo swap for `httpx.ASGITransport(emulator_app)`. There, each
operation gets one deadline and bounded, jittered retries for network errors, timeouts,
5xx and 429 (`RetryPolicy`); other 4xx are final. Client authentication
(`client_secret_post`, `client_secret_basic`, `private_key_jwt`) is applied per attempt by
authlib's `ClientAuth`, with the JWT assertion signed by joserfc.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random as _random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from authlib.oauth2.auth import ClientAuth
from joserfc import jwt
from joserfc.jwk import RSAKey

from server.errors import ConfigError
from server.principal import SubjectToken

log = logging.getLogger(__name__)

TOKEN_VAULT_GRANT = "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token"
FEDERATED_TOKEN_TYPE = "http://auth0.com/oauth/token-type/federated-connection-access-token"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CIBA_GRANT = "urn:openid:params:grant-type:ciba"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
USER_AGENT = "token-vault-mcp/0.1"
RENEW_BEFORE = 60.0  # renew a cached Auth0 token this long before it expires
# What a request hook (server.metrics) is told of an /oauth/token request: a fixed name, never a form value.
GRANT_NAMES = {
    "refresh_token": "refresh_token", TOKEN_VAULT_GRANT: "token_vault", DEVICE_CODE_GRANT: "device_code",
    CIBA_GRANT: "ciba", "authorization_code": "authorization_code",
}
# Told of every HTTP attempt: (path, grant name or "", status or None for no answer, seconds).
RequestHook = Callable[[str, str, int | None, float], None]


class Auth0Error(Exception):
    """Auth0 answered with an error, or could not be reached (status None).

    Carries Auth0's `error` code and description, never a token. `retry_after` is the wait
    Auth0 asked for (a `Retry-After` or rate-limit header), in seconds; `interval` a new polling
    interval sent in the body (CIBA's `slow_down`).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        description: str | None = None,
        retry_after: float | None = None,
        interval: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.description = description
        self.retry_after = retry_after
        self.interval = interval

    @property
    def unreachable(self) -> bool:
        """No HTTP answer: a network error or a timeout."""
        return self.status is None

    @property
    def retryable(self) -> bool:
        """Worth another attempt: network errors, timeouts, 5xx and 429 (but not the device flow's or
        CIBA's `slow_down`, a protocol answer the poller handles). Other 4xx would fail again the same way.
        """
        if self.status is None or self.status >= 500:
            return True
        return self.status == 429 and self.error != "slow_down"

    @property
    def client_auth_failed(self) -> bool:
        """Auth0 refused this client's own authentication (wrong secret or key, unknown client).

        Auth0 answers 401 `access_denied` ("Unauthorized"); RFC 6749 names it `invalid_client`.
        """
        return self.status == 401 and self.error in ("access_denied", "invalid_client", "unauthorized")

    @property
    def wait_seconds(self) -> int:
        """Whole seconds to wait before trying again (at least 1), from Auth0's rate-limit headers."""
        return max(1, math.ceil(self.retry_after)) if self.retry_after is not None else 1


@dataclass(frozen=True)
class RetryPolicy:
    """How one Auth0 operation copes with a failing tenant.

    Every operation (a token request, a JWKS fetch) has one `deadline` in seconds that covers
    all its attempts and waits. A single attempt may use at most `attempt_timeout` (default:
    half the deadline, so a hung attempt leaves room for one more). Retries happen only for
    `Auth0Error.retryable` failures, at most `max_attempts` attempts in all, after a jittered
    exponential backoff starting at `backoff` seconds (doubling, capped at `max_backoff`).
    A 429 is retried no sooner than its `Retry-After` / `x-ratelimit-reset`; when that wait is
    longer than `max_wait` (default: a quarter of the deadline) or would pass the deadline,
    the 429 is answered at once, so the caller hears how long to wait instead of being held.
    """

    deadline: float = 10.0
    max_attempts: int = 3
    backoff: float = 0.1
    max_backoff: float = 2.0
    attempt_timeout: float | None = None
    max_wait: float | None = None

    def __post_init__(self) -> None:
        if self.deadline <= 0 or self.max_attempts < 1 or self.backoff < 0:
            raise ValueError("a retry policy needs a positive deadline and at least one attempt")

    @property
    def per_attempt(self) -> float:
        return self.attempt_timeout if self.attempt_timeout is not None else self.deadline / 2

    @property
    def longest_wait(self) -> float:
        return self.max_wait if self.max_wait is not None else self.deadline / 4

    def backoff_for(self, attempt: int, draw: float) -> float:
        """The pause after failed attempt number `attempt` (1-based); `draw` in [0, 1) jitters it.

        Equal jitter: half the exponential step is fixed, half random, so retries from many
        callers spread out but none comes back at once.
        """
        step = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return step / 2 + draw * step / 2


@dataclass(frozen=True)
class TokenSet:
    """An Auth0 token answer. Tokens are hidden from repr."""

    access_token: str = field(repr=False)
    expires_at: float  # time.time() seconds
    token_type: str = "Bearer"
    scope: str | None = None
    refresh_token: str | None = field(default=None, repr=False)

    @property
    def expires_in(self) -> int:
        return max(0, int(self.expires_at - time.time()))


@dataclass(frozen=True)
class DeviceAuthorization:
    """The start of a device login: what to show the user, and how often to poll."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


@dataclass(frozen=True)
class CibaRequest:
    """A started backchannel authentication (CIBA): what to poll with, for how long, how often."""

    auth_req_id: str = field(repr=False)
    expires_in: int
    interval: int


Sleep = Callable[[float], Awaitable[None]]


def seconds(n: int) -> str:
    """`1 second`, `7 seconds`."""
    return f"{n} second" if n == 1 else f"{n} seconds"


def renew_at(issued_at: float, expires_at: float) -> float:
    """When to renew a token: RENEW_BEFORE seconds before expiry, or halfway for short-lived ones."""
    return expires_at - min(RENEW_BEFORE, (expires_at - issued_at) / 2)


class Auth0Client:
    """An Auth0 tenant's Authentication API, as one confidential client (plus public ones for login).

    Every operation runs under the `RetryPolicy` (one deadline, bounded jittered retries).
    `sleep` and `random` are the backoff's pause and jitter; tests pass instant ones.
    """

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str | None = None,
        *,
        auth_method: str = "client_secret_post",
        private_key_pem: bytes | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        sleep: Sleep = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.time,
        on_request: RequestHook | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # Where a browser reaches the tenant's pages (`/authorize`): the tenant itself, except in the demo, whose
        # in-process tenant has no reachable name and whose pages the broker serves on its own origin.
        self.browser_url: str | None = None
        self.client_id = client_id
        self._secret = client_secret
        self._auth_method = auth_method
        try:
            self._key = RSAKey.import_key(private_key_pem) if private_key_pem else None
        except Exception as exc:  # joserfc raises several kinds for a bad PEM
            raise ConfigError("TVM_CLIENT_KEY_FILE does not hold a PEM RSA private key") from exc
        self.retry = retry or RetryPolicy(deadline=timeout)
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self._on_request = on_request
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            timeout=self.retry.per_attempt,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            follow_redirects=False,
        )
        self._jwks: dict[str, Any] | None = None
        self._jwks_lock = asyncio.Lock()

    @property
    def issuer(self) -> str:
        return self.base_url + "/"

    @property
    def token_endpoint(self) -> str:
        return self.base_url + "/oauth/token"

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- keys --------------------------------------------------------------------------
    async def jwks(self, refresh: bool = False) -> dict[str, Any]:
        """The tenant's JSON Web Key Set, cached; `refresh=True` fetches it again. Raises Auth0Error."""
        async with self._jwks_lock:
            if self._jwks is None or refresh:
                self._jwks = await self._request("GET", "/.well-known/jwks.json")
            return self._jwks

    async def discovery(self) -> dict[str, Any]:
        """The tenant's OpenID configuration. Raises Auth0Error."""
        return await self._request("GET", "/.well-known/openid-configuration")

    # ---- grants ------------------------------------------------------------------------
    async def refresh(self, refresh_token: str, client_id: str | None = None) -> TokenSet:
        """Exchange a refresh token for an access token. Raises Auth0Error.

        A refresh token belongs to the client that obtained it: with `client_id` other
        than this client's, the request is made as that public (native) client.
        """
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return self._token_set(await self._post_token(form, as_client=client_id))

    async def exchange(
        self, subject: SubjectToken, connection: str, scopes: list[str], login_hint: str | None = None
    ) -> TokenSet:
        """Token Vault: the caller's subject token for a connection's access token (SPEC §4). Raises Auth0Error."""
        form = {
            "grant_type": TOKEN_VAULT_GRANT,
            "subject_token": subject.token,
            "subject_token_type": subject.token_type,
            "requested_token_type": FEDERATED_TOKEN_TYPE,
            "connection": connection,
            "scope": " ".join(scopes),
        }
        if login_hint:
            form["login_hint"] = login_hint
        return self._token_set(await self._post_token(form))

    async def start_device_login(self, client_id: str, scope: str, audience: str) -> DeviceAuthorization:
        """Start the device flow for the public client `client_id`. Raises Auth0Error."""
        data = await self._request(
            "POST", "/oauth/device/code", {"client_id": client_id, "scope": scope, "audience": audience}
        )
        try:
            return DeviceAuthorization(
                device_code=str(data["device_code"]),
                user_code=str(data["user_code"]),
                verification_uri=str(data["verification_uri"]),
                verification_uri_complete=data.get("verification_uri_complete"),
                expires_in=int(data.get("expires_in", 900)),
                interval=int(data.get("interval", 5)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Auth0Error("Auth0 sent a device authorization without the expected fields", status=200) from exc

    async def poll_device_login(self, client_id: str, device_code: str) -> TokenSet:
        """One poll of the device flow, as the public client `client_id` (Auth0 runs the device flow
        for Native apps only). Raises Auth0Error, e.g. `authorization_pending` or `slow_down`.
        """
        form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code, "client_id": client_id}
        return self._token_set(await self._request("POST", "/oauth/token", form))

    async def bc_authorize(
        self,
        *,
        login_sub: str,
        binding_message: str,
        authorization_details: list[dict[str, Any]],
        requested_expiry: int,
        scope: str = "openid",
    ) -> CibaRequest:
        """Ask the user `login_sub` to approve on their device (CIBA `/bc-authorize`, SPEC §9), as this
        confidential client. Empty `authorization_details` are left out. Raises Auth0Error.
        """
        hint = {"format": "iss_sub", "iss": self.issuer, "sub": login_sub}
        form = {
            "scope": scope,
            "login_hint": json.dumps(hint, separators=(",", ":")),
            "binding_message": binding_message,
            "requested_expiry": str(requested_expiry),
        }
        if authorization_details:
            form["authorization_details"] = json.dumps(authorization_details, separators=(",", ":"))
        data = await self._request("POST", "/bc-authorize", form, self._client_auth())
        try:
            return CibaRequest(
                auth_req_id=str(data["auth_req_id"]),
                expires_in=int(data.get("expires_in", requested_expiry)),
                interval=int(data.get("interval", 5)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Auth0Error("Auth0 sent a backchannel authorization without the expected fields", status=200) from exc

    async def poll_ciba(self, auth_req_id: str) -> TokenSet:
        """One poll of a CIBA request. Raises Auth0Error: `authorization_pending`, `slow_down` (with the
        new `interval` or `retry_after` when Auth0 sent one) and `access_denied` are answers for the
        poller, never retried here; network errors and 5xx are, within the deadline.
        """
        return self._token_set(await self._post_token({"grant_type": CIBA_GRANT, "auth_req_id": auth_req_id}))

    def authorize_url(
        self, *, client_id: str, redirect_uri: str, scope: str, audience: str, state: str, code_challenge: str
    ) -> str:
        """Where a browser signs in: `/authorize` for an authorization code with PKCE (S256). No request here."""
        query = {
            "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "scope": scope,
            "audience": audience, "state": state, "code_challenge": code_challenge, "code_challenge_method": "S256",
        }
        return f"{(self.browser_url or self.base_url).rstrip('/')}/authorize?{urlencode(query)}"

    async def exchange_code(
        self, *, client_id: str, code: str, redirect_uri: str, code_verifier: str, client_secret: str | None = None
    ) -> TokenSet:
        """An authorization code (with its PKCE verifier) for tokens, as `client_id`: this confidential client
        with its authentication, another confidential one with `client_secret` (the console's web app), any
        other as a public client. Raises Auth0Error."""
        form = {
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        if client_secret is not None and client_id != self.client_id:
            auth = ClientAuth(client_id, client_secret, "client_secret_post")
            return self._token_set(await self._request("POST", "/oauth/token", form, auth))
        return self._token_set(await self._post_token(form, as_client=client_id))

    async def call_api(self, method: str, path: str, body: dict[str, Any], bearer: str) -> dict[str, Any]:
        """A JSON request to one of the tenant's own APIs (the My Account API) with a user's access token.

        Retried and bounded like every operation here. Raises Auth0Error (Auth0's `{type, status, title,
        detail}` errors are read into its `error` and `description`).
        """
        return await self._request(method, path, json_body=body, bearer=bearer)

    async def revoke_refresh_token(self, refresh_token: str, client_id: str) -> None:
        """Revoke a refresh token at the tenant (`/oauth/revoke`) as the public client it was issued to.

        Raises Auth0Error.
        """
        form = {"token": refresh_token, "client_id": client_id}
        await self._request("POST", "/oauth/revoke", form, expect_json=False)

    # ---- transport ---------------------------------------------------------------------
    async def _post_token(self, form: dict[str, str], as_client: str | None = None) -> dict[str, Any]:
        if as_client is not None and as_client != self.client_id:
            return await self._request("POST", "/oauth/token", {**form, "client_id": as_client})
        return await self._request("POST", "/oauth/token", form, self._client_auth())

    def _client_auth(self) -> ClientAuth:
        if self._auth_method == "private_key_jwt":
            return ClientAuth(self.client_id, None, self._sign_assertion)
        return ClientAuth(self.client_id, self._secret or "", self._auth_method)

    def _sign_assertion(
        self, client: ClientAuth, method: str, uri: str, headers: dict[str, str], body: str
    ) -> tuple[str, dict[str, str], str]:
        if self._key is None:
            raise ConfigError("private_key_jwt needs a private key (TVM_CLIENT_KEY_FILE)")
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.issuer,
            "iat": now,
            "exp": now + 60,
            "jti": secrets.token_urlsafe(16),
        }
        assertion = jwt.encode({"alg": "RS256", "typ": "JWT"}, claims, self._key, algorithms=["RS256"])
        extra = urlencode(
            {"client_id": self.client_id, "client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}
        )
        return uri, headers, f"{body}&{extra}" if body else extra

    async def _request(
        self,
        method: str,
        path: str,
        form: dict[str, str] | None = None,
        auth: ClientAuth | None = None,
        *,
        expect_json: bool = True,
        json_body: dict[str, Any] | None = None,
        bearer: str | None = None,
    ) -> dict[str, Any]:
        """One Auth0 operation: attempts under one deadline, retried per the policy. Raises Auth0Error."""
        policy = self.retry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + policy.deadline
        attempt = 0
        while True:
            attempt += 1
            budget = min(deadline - loop.time(), policy.per_attempt)
            try:
                response = await self._attempt(method, path, form, auth, budget, json_body, bearer)
                return _parse(response, expect_json)
            except Auth0Error as exc:
                error = exc
            if not error.retryable:
                raise error
            wait = self._pause(error, attempt)
            left = deadline - loop.time()
            if error.status == 429 and (wait > policy.longest_wait or wait >= left):
                raise error  # better to say "retry in N seconds" now than to hold the call that long
            if attempt >= policy.max_attempts or wait >= left:
                raise error
            log.info(
                "Auth0 %s %s failed (%s); attempt %d of %d in %.2f s",
                method, path, error.status or "no answer", attempt + 1, policy.max_attempts, wait,
            )
            await self._sleep(wait)

    def _pause(self, error: Auth0Error, attempt: int) -> float:
        backoff = self.retry.backoff_for(attempt, self._random())
        if error.status == 429 and error.retry_after is not None:
            # Never sooner than Auth0 asked; the jitter on top keeps a crowd from returning together.
            return error.retry_after + backoff / 2
        return backoff

    async def _attempt(
        self, method: str, path: str, form: dict[str, str] | None, auth: ClientAuth | None, budget: float,
        json_body: dict[str, Any] | None = None, bearer: str | None = None,
    ) -> httpx.Response:
        if budget <= 0:
            raise Auth0Error("Auth0 did not answer in time")
        url = self.base_url + path
        headers: dict[str, str] = {}
        body: str | None = None
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        if json_body is not None:
            headers["Content-Type"] = "application/json"
            body = json.dumps(json_body, separators=(",", ":"))
        elif form is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            body = urlencode(form)
            if auth is not None:
                # Per attempt: a private_key_jwt assertion is single-use (its jti), so each try signs anew.
                url, headers, body = auth.prepare(method, url, headers, body)
        started, status = time.perf_counter(), None
        try:
            # asyncio.timeout as well as httpx's: a transport may ignore httpx timeouts (ASGI does).
            async with asyncio.timeout(budget):
                response = await self._http.request(
                    method, url, content=None if body is None else body.encode(), headers=headers, timeout=budget
                )
            status = response.status_code
            return response
        except (TimeoutError, httpx.TimeoutException):
            raise Auth0Error("Auth0 did not answer in time") from None
        except (httpx.HTTPError, OSError) as exc:
            # OSError: an in-process transport can surface a socket error without httpx's wrapping.
            raise Auth0Error(f"Auth0 could not be reached ({type(exc).__name__})") from None
        finally:
            if self._on_request is not None:
                grant = GRANT_NAMES.get((form or {}).get("grant_type", ""), "other") if path == "/oauth/token" else ""
                self._on_request(path, grant, status, time.perf_counter() - started)

    def _token_set(self, data: dict[str, Any]) -> TokenSet:
        return _token_set(data, self._clock())


def _parse(response: httpx.Response, expect_json: bool = True) -> dict[str, Any]:
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if response.is_success and not expect_json:
        return data if isinstance(data, dict) else {}
    if response.is_success:
        if not isinstance(data, dict):
            raise Auth0Error("Auth0 sent an answer that is not a JSON object", status=response.status_code)
        return data
    error = description = interval = None
    if isinstance(data, dict) and data.get("error") is None and data.get("title") is not None:
        # the My Account API's errors: {type, status, title, detail, validation_errors?}
        error = str(data.get("title"))[:100]
        description = str(data.get("detail") or "")[:300] or None
    elif isinstance(data, dict):
        error = str(data.get("error")) if data.get("error") is not None else None
        description = str(data.get("error_description", ""))[:300] or None
        value = data.get("interval")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            interval = value
    raise Auth0Error(
        f"Auth0 answered {response.status_code}" + (f" {error}" if error else ""),
        status=response.status_code,
        error=error,
        description=description,
        retry_after=retry_after(response.headers),
        interval=interval,
    )


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait, from `Retry-After` (seconds or HTTP date) or `x-ratelimit-reset` (UNIX time)."""
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(value) if value else None
            if parsed is not None:
                return max(0.0, parsed.timestamp() - time.time())
    reset = headers.get("x-ratelimit-reset")
    if reset:
        try:
            return max(0.0, float(reset) - time.time())
        except ValueError:
            return None
    return None


def _token_set(data: dict[str, Any], now: float) -> TokenSet:
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise Auth0Error("Auth0 sent a token answer without an access_token", status=200)
    try:
        expires_in = float(data.get("expires_in", 0))
    except (TypeError, ValueError):
        expires_in = 0.0
    scope = data.get("scope")
    refresh = data.get("refresh_token")
    return TokenSet(
        access_token=token,
        expires_at=now + expires_in,
        token_type=str(data.get("token_type") or "Bearer"),
        scope=scope if isinstance(scope, str) else None,
        refresh_token=refresh if isinstance(refresh, str) else None,
    )
