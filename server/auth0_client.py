"""The one place the broker talks to Auth0 (or the emulator: it cannot tell the difference).

Every request goes through `Auth0Client._post_token` / `_get_json` on one `httpx.AsyncClient`,
whose transport tests and the demo swap for `httpx.ASGITransport(emulator_app)`.
Client authentication (`client_secret_post`, `client_secret_basic`, `private_key_jwt`)
is applied by authlib's `ClientAuth`, with the JWT assertion signed by joserfc.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from authlib.oauth2.auth import ClientAuth
from joserfc import jwt
from joserfc.jwk import RSAKey

from server.principal import SubjectToken

TOKEN_VAULT_GRANT = "urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token"
FEDERATED_TOKEN_TYPE = "http://auth0.com/oauth/token-type/federated-connection-access-token"
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
USER_AGENT = "token-vault-mcp/0.1"


class Auth0Error(Exception):
    """Auth0 answered with an error, or could not be reached (status None).

    Carries Auth0's `error` code and description, never a token.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        description: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.description = description
        self.retry_after = retry_after

    @property
    def unreachable(self) -> bool:
        return self.status is None


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
    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int


class Auth0Client:
    """An Auth0 tenant's Authentication API, as one confidential client (plus public ones for login)."""

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
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id
        self._secret = client_secret
        self._auth_method = auth_method
        self._key = RSAKey.import_key(private_key_pem) if private_key_pem else None
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            transport=transport,
            timeout=timeout,
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
        """The tenant's JSON Web Key Set, cached; `refresh=True` fetches it again."""
        async with self._jwks_lock:
            if self._jwks is None or refresh:
                self._jwks = await self._get_json("/.well-known/jwks.json")
            return self._jwks

    async def discovery(self) -> dict[str, Any]:
        return await self._get_json("/.well-known/openid-configuration")

    # ---- grants ------------------------------------------------------------------------
    async def refresh(self, refresh_token: str, client_id: str | None = None) -> TokenSet:
        """Exchange a refresh token for an access token.

        A refresh token belongs to the client that obtained it: with `client_id` other
        than this client's, the request is made as that public (native) client.
        """
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return _token_set(await self._post_token(form, as_client=client_id))

    async def client_credentials(self, audience: str) -> TokenSet:
        return _token_set(await self._post_token({"grant_type": "client_credentials", "audience": audience}))

    async def exchange(
        self, subject: SubjectToken, connection: str, scopes: list[str], login_hint: str | None = None
    ) -> TokenSet:
        """Token Vault: the caller's subject token for a connection's access token (SPEC §4)."""
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
        return _token_set(await self._post_token(form))

    async def start_device_login(self, client_id: str, scope: str, audience: str) -> DeviceAuthorization:
        data = await self._post(
            "/oauth/device/code", {"client_id": client_id, "scope": scope, "audience": audience}, None
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
        form = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code}
        return _token_set(await self._post_token(form, as_client=client_id))

    # ---- transport ---------------------------------------------------------------------
    async def _post_token(self, form: dict[str, str], as_client: str | None = None) -> dict[str, Any]:
        if as_client is not None and as_client != self.client_id:
            return await self._post("/oauth/token", {**form, "client_id": as_client}, None)
        return await self._post("/oauth/token", form, self._client_auth())

    def _client_auth(self) -> ClientAuth:
        if self._auth_method == "private_key_jwt":
            return ClientAuth(self.client_id, None, self._sign_assertion)
        return ClientAuth(self.client_id, self._secret or "", self._auth_method)

    def _sign_assertion(
        self, client: ClientAuth, method: str, uri: str, headers: dict[str, str], body: str
    ) -> tuple[str, dict[str, str], str]:
        if self._key is None:
            raise Auth0Error("private_key_jwt needs a private key (TVM_CLIENT_KEY_FILE)")
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

    async def _post(self, path: str, form: dict[str, str], auth: ClientAuth | None) -> dict[str, Any]:
        url = self.base_url + path
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        body = urlencode(form)
        if auth is not None:
            url, headers, body = auth.prepare("POST", url, headers, body)
        try:
            response = await self._http.post(url, content=body.encode(), headers=headers)
        except httpx.TimeoutException as exc:
            raise Auth0Error("Auth0 did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise Auth0Error(f"Auth0 could not be reached ({type(exc).__name__})") from exc
        return _parse(response)

    async def _get_json(self, path: str) -> dict[str, Any]:
        try:
            response = await self._http.get(path)
        except httpx.TimeoutException as exc:
            raise Auth0Error("Auth0 did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise Auth0Error(f"Auth0 could not be reached ({type(exc).__name__})") from exc
        return _parse(response)


def _parse(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if response.is_success:
        if not isinstance(data, dict):
            raise Auth0Error("Auth0 sent an answer that is not a JSON object", status=response.status_code)
        return data
    error = description = None
    if isinstance(data, dict):
        error = str(data.get("error")) if data.get("error") is not None else None
        description = str(data.get("error_description", ""))[:300] or None
    raise Auth0Error(
        f"Auth0 answered {response.status_code}" + (f" {error}" if error else ""),
        status=response.status_code,
        error=error,
        description=description,
        retry_after=retry_after(response.headers),
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


def _token_set(data: dict[str, Any]) -> TokenSet:
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
        expires_at=time.time() + expires_in,
        token_type=str(data.get("token_type") or "Bearer"),
        scope=scope if isinstance(scope, str) else None,
        refresh_token=refresh if isinstance(refresh, str) else None,
    )
