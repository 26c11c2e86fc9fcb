"""The emulated tenant's data: APIs, clients, users and their connected accounts, issued grants,
recorded requests, and the knobs tests turn. No HTTP here: `app.py` serves it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from joserfc.jwk import RSAKey
from joserfc.jwt import JWTClaimsRegistry

from server.emulator.faults import Faults
from server.emulator.keys import SigningKeys

OFFLINE_ACCESS = "offline_access"
# The My Account API's Connected Accounts scopes (audience `https://{domain}/me/`).
MY_ACCOUNT_SCOPES = ("create:me:connected_accounts", "read:me:connected_accounts", "delete:me:connected_accounts")
AuthMethod = Literal["client_secret_post", "client_secret_basic", "private_key_jwt", "none"]
# How the emulated user answers a CIBA request: at once yes, at once no, or only when a test says.
CibaMode = Literal["approve", "deny", "manual"]


@dataclass(frozen=True)
class Api:
    """An API (resource server) of the tenant and the scopes it defines."""

    audience: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Client:
    """An application. Native clients are public: no secret, device flow, no Token Vault.

    `callbacks` are its Allowed Callback URLs (exact match, as Auth0 compares them);
    `loopback_callbacks` also allows any `http://127.0.0.1|localhost|[::1]:<any port>/<path>`
    (a native or loopback client's redirect, RFC 8252 §7.3). `my_account_scopes` are the My
    Account API scopes its client grant allows (Auth0: "allow the application to use the My
    Account API").
    """

    client_id: str
    secret: str | None = None
    native: bool = False
    public_key_pem: str | None = None
    callbacks: tuple[str, ...] = ()
    loopback_callbacks: bool = False
    my_account_scopes: tuple[str, ...] = ()


@dataclass
class ConnectedAccount:
    """A user's account at a provider (a Token Vault connection) and the provider scopes it granted.

    `id` is the My Account API's `cac_…`; `created_at` and `expires_at` are state.clock seconds
    (`expires_at` None: it does not expire).
    """

    connection: str
    scopes: tuple[str, ...]
    revoked: bool = False
    id: str = field(default_factory=lambda: "cac_" + secrets.token_urlsafe(16))
    created_at: float = 0.0
    expires_at: float | None = None

    def live(self, now: float) -> bool:
        """Whether Token Vault still holds a usable token set for it."""
        return not self.revoked and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class PendingLogin:
    """A validated `/authorize` request waiting on the sign-in page (the page's `txn`)."""

    txn: str
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    audience: str | None
    state: str | None
    code_challenge: str
    nonce: str | None
    expires_at: float


@dataclass
class ConnectSession:
    """One My Account `connect` request, from its ticket through the provider's consent to `complete`."""

    auth_session: str
    ticket: str
    sub: str
    client_id: str
    connection: str
    redirect_uri: str
    state: str | None
    scopes: tuple[str, ...]
    code_challenge: str | None
    expires_at: float
    connect_code: str | None = None
    status: Literal["pending", "approved", "denied", "completed"] = "pending"


@dataclass(frozen=True)
class AuthorizationCode:
    """One authorization code from `/authorize`, redeemable once at `/oauth/token` before `expires_at`."""

    code: str
    client_id: str
    redirect_uri: str
    sub: str
    scopes: tuple[str, ...]
    audience: str | None
    code_challenge: str
    expires_at: float
    nonce: str | None = None


@dataclass(frozen=True)
class RefreshGrant:
    """What a refresh token stands for: it belongs to the client it was issued to."""

    token: str
    sub: str
    client_id: str
    scopes: tuple[str, ...]
    audience: str


@dataclass
class DeviceGrant:
    """One device authorization, from `/oauth/device/code` to approval, denial or expiry."""

    device_code: str
    user_code: str
    client_id: str
    scopes: tuple[str, ...]
    audience: str
    expires_at: float
    interval: int
    last_poll: float
    status: Literal["pending", "approved", "denied", "consumed"] = "pending"
    sub: str | None = None


@dataclass
class CibaGrant:
    """One backchannel authentication request (CIBA), from `/bc-authorize` to approval, denial or expiry.

    `approve_at` (state.clock seconds) is when the emulated user taps "approve" by themself
    (mode `approve`); None leaves the decision to `approve_ciba` / `deny_ciba`.
    """

    auth_req_id: str
    client_id: str
    sub: str
    scopes: tuple[str, ...]
    audience: str
    binding_message: str
    authorization_details: list[dict[str, Any]] | None
    expires_at: float
    interval: int
    last_poll: float
    approve_at: float | None = None
    status: Literal["pending", "approved", "denied", "consumed"] = "pending"

    def settle(self, now: float) -> None:
        """Apply the user's scheduled approval if its time has come (and the request has not expired)."""
        if self.status == "pending" and self.approve_at is not None and self.approve_at <= now < self.expires_at:
            self.status = "approved"


@dataclass(frozen=True)
class VaultIssue:
    """One provider token handed out, so tests can trace a token back to its exchange."""

    access_token: str
    sub: str
    connection: str
    scopes: tuple[str, ...]
    client_id: str
    expires_at: float = float("inf")  # state.clock seconds; the provider API refuses the token after it


@dataclass(frozen=True)
class ProviderRequestSeen:
    """One request to the provider API (`/provider/{connection}/…`), as the provider saw it."""

    connection: str
    method: str
    path: str
    token: str | None = field(repr=False)
    accepted: bool


@dataclass(frozen=True)
class RecordedRequest:
    """One request to `/oauth/token`, `/oauth/device/code`, `/oauth/revoke` or `/bc-authorize`, as the
    emulator received it."""

    path: str
    grant_type: str | None
    fields: dict[str, str]
    client_id: str | None  # the authenticated client; None when authentication failed or was not tried
    headers: dict[str, str]
    auth_method: AuthMethod | None = None


class EmulatorState:
    """An Auth0 tenant in memory.

    `issuer` is the tenant's base URL with a trailing slash (one is added when missing).
    `clock` gives UNIX seconds; tests pass their own to expire tokens and device codes
    without sleeping.
    """

    def __init__(
        self,
        issuer: str,
        *,
        clock: Callable[[], float] = time.time,
        signing_key: RSAKey | Future[RSAKey] | None = None,
    ) -> None:
        self.issuer = issuer if issuer.endswith("/") else issuer + "/"
        self.clock = clock
        self.keys = SigningKeys(signing_key)
        self.apis: dict[str, Api] = {}
        self.clients: dict[str, Client] = {}
        self.users: set[str] = set()
        self.user_names: dict[str, str] = {}  # sub -> display name (the sign-in page, the id_token `name`)
        # sub -> audience -> the user's RBAC permissions at that API; no entry: every scope of the API
        self.permissions: dict[str, dict[str, tuple[str, ...]]] = {}
        # Connections of the tenant (Connected Accounts enabled) and the provider scopes each offers.
        self.connections: dict[str, tuple[str, ...]] = {}
        self.codes: dict[str, AuthorizationCode] = {}  # by code; used codes are removed
        self.pending_logins: dict[str, PendingLogin] = {}  # by txn; removed once signed in
        self.connect_sessions: dict[str, ConnectSession] = {}  # by auth_session
        self.connect_expires_in = 300  # seconds a connect ticket and its auth_session live
        self.accounts: dict[str, dict[str, ConnectedAccount]] = {}
        self.refresh_tokens: dict[str, RefreshGrant] = {}
        self.devices: dict[str, DeviceGrant] = {}
        self.ciba_requests: dict[str, CibaGrant] = {}  # by auth_req_id
        self.used_assertions: set[tuple[str, str]] = set()
        self.requests: list[RecordedRequest] = []
        self.vault_issues: list[VaultIssue] = []
        self.vault_tokens: dict[str, VaultIssue] = {}  # by access token, for the provider API
        self.provider_requests: list[ProviderRequestSeen] = []
        self.faults = Faults()
        # Knobs: lifetimes (Auth0's defaults), device polling, and Token Vault answer shapes.
        self.access_token_expires_in = 86400
        self.vault_token_expires_in = 3600
        self.device_interval = 5
        self.device_expires_in = 900
        self.omit_scope_in_exchange = False
        self.overgrant = False
        # When set, device authorizations are approved at once as this user (a headless `login`).
        self.auto_approve_sub: str | None = None
        # CIBA: polling interval, how the user answers, and (mode approve) after how many seconds.
        self.ciba_interval = 5
        self.ciba_mode: CibaMode = "approve"
        self.ciba_approve_after: float | None = None
        # /authorize: when set, this user is signed in at once (no sign-in page); codes live this long.
        self.auto_login_sub: str | None = None
        self.code_expires_in = 300
        # Connected accounts made through the My Account API expire after this (None: never).
        self.connected_account_lifetime: int | None = None

    @property
    def my_account_audience(self) -> str:
        """The My Account API's audience: `https://{domain}/me/` (the issuer plus `me/`)."""
        return self.issuer + "me/"

    # --- tenant setup -------------------------------------------------------------------------
    def record_vault_issue(self, issue: VaultIssue) -> None:
        self.vault_issues.append(issue)
        self.vault_tokens[issue.access_token] = issue

    def provider_token(self, token: str, connection: str) -> VaultIssue | None:
        """The live Token Vault issue behind `token` if it was issued for `connection` (the provider's check)."""
        issue = self.vault_tokens.get(token)
        if issue is None or issue.connection != connection or self.clock() >= issue.expires_at:
            return None
        return issue

    def add_api(self, audience: str, scopes: list[str]) -> None:
        """Register an API; the first one registered is the audience `/emulator/tokens` defaults to."""
        self.apis[audience] = Api(audience, tuple(scopes))

    def add_client(
        self,
        client_id: str,
        secret: str | None = None,
        *,
        native: bool = False,
        public_key_pem: str | None = None,
        callbacks: tuple[str, ...] = (),
        loopback_callbacks: bool = False,
        my_account_scopes: tuple[str, ...] = (),
    ) -> None:
        """Register an application (see `Client` for the callback and My Account settings).

        A confidential client needs a secret, a public key (for private_key_jwt), or both;
        a native client has neither. Raises ValueError otherwise.
        """
        if native and (secret or public_key_pem):
            raise ValueError("a native client is public: no secret, no key")
        if not native and not (secret or public_key_pem):
            raise ValueError("a confidential client needs a secret or a public key")
        self.clients[client_id] = Client(
            client_id, secret, native, public_key_pem, callbacks, loopback_callbacks, my_account_scopes
        )

    def add_user(self, sub: str, *, name: str | None = None) -> None:
        """Register a user by `sub` (e.g. `auth0|abc`), with a display name when given."""
        self.users.add(sub)
        self.accounts.setdefault(sub, {})
        if name is not None:
            self.user_names[sub] = name

    def set_permissions(self, sub: str, audience: str, permissions: list[str]) -> None:
        """Assign the user exactly `permissions` at the API `audience` (RBAC). Raises ValueError."""
        self._require_user(sub)
        if audience not in self.apis:
            raise ValueError(f"unknown audience {audience}")
        self.permissions.setdefault(sub, {})[audience] = tuple(permissions)

    def user_permissions(self, sub: str, audience: str) -> tuple[str, ...]:
        """The scopes of `audience` the user may be given: their assigned permissions, else all the API's."""
        assigned = self.permissions.get(sub, {}).get(audience)
        return self.apis[audience].scopes if assigned is None else assigned

    def add_connection(self, connection: str, scopes: list[str]) -> None:
        """Enable Connected Accounts for `connection`, offering `scopes` (merged with earlier ones)."""
        known = self.connections.get(connection, ())
        self.connections[connection] = tuple(dict.fromkeys([*known, *scopes]))

    def add_callback(self, client_id: str, url: str) -> None:
        """Add `url` to the client's Allowed Callback URLs. Raises ValueError for an unknown client."""
        client = self.clients.get(client_id)
        if client is None:
            raise ValueError(f"unknown client {client_id}")
        if url not in client.callbacks:
            self.clients[client_id] = replace(client, callbacks=(*client.callbacks, url))

    def connect_account(
        self, sub: str, connection: str, scopes: list[str], *, expires_at: float | None = None
    ) -> ConnectedAccount:
        """Give the user a connected account at `connection` that granted `scopes` (replaces an old one).

        The connection is enabled for Connected Accounts if it was not. Raises ValueError for an
        unknown user.
        """
        self._require_user(sub)
        self.add_connection(connection, scopes)
        account = ConnectedAccount(connection, tuple(scopes), created_at=self.clock(), expires_at=expires_at)
        self.accounts[sub][connection] = account
        return account

    def require_connect(self, sub: str, connection: str) -> None:
        """The user has no connected account at `connection` (Token Vault answers 401 until they connect).

        Raises ValueError for an unknown user.
        """
        self._require_user(sub)
        self.accounts[sub].pop(connection, None)

    def expire_connection(self, sub: str, connection: str) -> None:
        """Make the user's connected account at `connection` expire now. Raises ValueError when there is none."""
        account = self.accounts.get(sub, {}).get(connection)
        if account is None:
            raise ValueError(f"{sub} has no connected account at {connection}")
        account.expires_at = self.clock()

    def delete_connected_account(self, sub: str, account_id: str) -> bool:
        """Forget the user's connected account `account_id` (My Account DELETE); whether there was one."""
        for connection, account in list(self.accounts.get(sub, {}).items()):
            if account.id == account_id:
                del self.accounts[sub][connection]
                return True
        return False

    def revoke_connection(self, sub: str, connection: str) -> None:
        """Make the user's connected account stale, as when the provider revoked it.

        Raises ValueError when there is no such account.
        """
        account = self.accounts.get(sub, {}).get(connection)
        if account is None:
            raise ValueError(f"{sub} has no connected account at {connection}")
        account.revoked = True

    def connected_account(self, sub: str, connection: str) -> ConnectedAccount | None:
        """The user's live connected account at `connection`, if any."""
        account = self.accounts.get(sub, {}).get(connection)
        return account if account is not None and account.live(self.clock()) else None

    @property
    def default_audience(self) -> str:
        """The first API registered (the OAuth grants still require an explicit `audience`).

        Raises LookupError when there is none.
        """
        if not self.apis:
            raise LookupError("the tenant has no API")
        return next(iter(self.apis))

    # --- tokens -------------------------------------------------------------------------------

    def issue_refresh_token(self, sub: str, client_id: str, scopes: list[str], audience: str) -> str:
        """A refresh token of `sub` for `client_id` (no rotation: it stays valid).

        Raises ValueError for an unknown user, client or audience.
        """
        self._require_user(sub)
        if client_id not in self.clients:
            raise ValueError(f"unknown client {client_id}")
        if audience not in self.apis:
            raise ValueError(f"unknown audience {audience}")
        token = "v1." + secrets.token_urlsafe(48)
        self.refresh_tokens[token] = RefreshGrant(token, sub, client_id, tuple(scopes), audience)
        return token

    def mint_access_token(
        self,
        sub: str,
        *,
        audience: str | list[str],
        scopes: list[str],
        azp: str | None = None,
        expires_in: int = 3600,
        permissions: list[str] | None = None,
        kid: str | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """An RS256 access token signed with the tenant key.

        `scope` is omitted when `scopes` is empty, `permissions` when None; `extra_claims`
        are applied last, so they can override any claim (e.g. `exp` in the past, `iss`).
        `kid` overrides the header's key id.
        """
        now = int(self.clock())
        claims: dict[str, Any] = {"iss": self.issuer, "sub": sub, "aud": audience, "iat": now}
        claims["exp"] = now + expires_in
        if azp is not None:
            claims["azp"] = azp
        if scopes:
            claims["scope"] = " ".join(scopes)
        if permissions is not None:
            claims["permissions"] = list(permissions)
        claims.update(extra_claims or {})
        return self.keys.sign(claims, kid=kid)

    def verify_access_token(self, token: str) -> dict[str, Any]:
        """The claims of an unexpired access token of this tenant (signature, `iss`, `exp`, `sub`).

        The audience is the caller's to check. Raises keys.InvalidJWT.
        """
        registry = JWTClaimsRegistry(
            now=int(self.clock()),
            iss={"essential": True, "value": self.issuer},
            sub={"essential": True},
            exp={"essential": True},
        )
        return self.keys.verify(token, registry)

    def public_jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The JWKS served at `/.well-known/jwks.json`."""
        return self.keys.public_jwks()

    def rotate_signing_key(self) -> str:
        """Sign from now on with a new key (the old stays in the JWKS); return its kid."""
        return self.keys.rotate()

    # --- device flow (the user's side, which Auth0 runs in a browser) --------------------------

    def approve_device(self, user_code: str, sub: str) -> None:
        """The user `sub` approves the pending device authorization `user_code`.

        Raises ValueError for an unknown user or a code that is not pending.
        """
        self._require_user(sub)
        grant = self._pending_device(user_code)
        grant.status = "approved"
        grant.sub = sub

    def deny_device(self, user_code: str) -> None:
        """The user denies the pending device authorization `user_code`. Raises ValueError."""
        self._pending_device(user_code).status = "denied"

    def pending_user_codes(self) -> list[str]:
        """User codes of device authorizations still waiting for the user, oldest first."""
        now = self.clock()
        return [g.user_code for g in self.devices.values() if g.status == "pending" and now < g.expires_at]

    # --- CIBA (the user's side, which Auth0 runs in Guardian or by email) -----------------------

    def approve_ciba(self, auth_req_id: str) -> None:
        """The user approves the pending CIBA request `auth_req_id`. Raises ValueError when it is not pending."""
        self._pending_ciba(auth_req_id).status = "approved"

    def deny_ciba(self, auth_req_id: str) -> None:
        """The user denies the pending CIBA request `auth_req_id`. Raises ValueError when it is not pending."""
        self._pending_ciba(auth_req_id).status = "denied"

    def pending_ciba(self) -> list[CibaGrant]:
        """CIBA requests still waiting for the user (not decided, not expired), oldest first."""
        now = self.clock()
        for grant in self.ciba_requests.values():
            grant.settle(now)
        return [g for g in self.ciba_requests.values() if g.status == "pending" and now < g.expires_at]

    # --- helpers ------------------------------------------------------------------------------

    def _require_user(self, sub: str) -> None:
        if sub not in self.users:
            raise ValueError(f"unknown user {sub}")

    def _pending_device(self, user_code: str) -> DeviceGrant:
        normalized = user_code.upper().replace(" ", "")
        now = self.clock()
        for grant in self.devices.values():
            if grant.user_code == normalized and grant.status == "pending" and now < grant.expires_at:
                return grant
        raise ValueError(f"no pending device authorization with user code {user_code}")

    def _pending_ciba(self, auth_req_id: str) -> CibaGrant:
        grant = self.ciba_requests.get(auth_req_id)
        now = self.clock()
        if grant is not None:
            grant.settle(now)
        if grant is None or grant.status != "pending" or now >= grant.expires_at:
            raise ValueError(f"no pending CIBA request {auth_req_id}")
        return grant
