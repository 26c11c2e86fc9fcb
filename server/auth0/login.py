"""`token-vault-mcp login`, `login --status` and `logout`: the stdio user's Auth0 login (SPEC §3).

`login` runs the device authorization flow (RFC 8628 as Auth0 runs it: Native apps only)
with `TVM_LOGIN_CLIENT_ID` (default `AUTH0_CLIENT_ID`), asking for `offline_access`, the
four tool scopes and `AUTH0_AUDIENCE`. It shows the verification URL and code on stderr,
polls at Auth0's `interval` (5 s more after each `slow_down`), verifies the access token it
gets, and stores the refresh token with the client it belongs to in `TVM_CREDENTIALS_FILE`:
written atomically, mode 0600, in a directory of mode 0700 when it creates one. `serve` in
stdio mode then signs in with it (unless `TVM_REFRESH_TOKEN` is set).

Nothing here prints, logs or raises a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx

from server.auth0.client import Auth0Client, Auth0Error, TokenSet
from server.auth0.token_verifier import InvalidToken, JwtVerifier
from server.config import Config
from server.errors import ConfigError

log = logging.getLogger(__name__)

LOGIN_SCOPES = (
    "openid", "offline_access", "read:market", "read:balance", "buy:quota", "request:token", "call:api"
)
SLOW_DOWN_STEP = 5  # RFC 8628 §3.5: a slow_down adds 5 seconds to the polling interval for good
FILE_MODE = 0o600
DIR_MODE = 0o700
EXPIRED = "the code expired before it was confirmed; run `token-vault-mcp login` again"


class LoginError(Exception):
    """The login did not complete; the message says why and what to do (never a token)."""


@dataclass(frozen=True)
class StoredLogin:
    """What `login` keeps: the refresh token, the client it belongs to, and who it signs in."""

    refresh_token: str = field(repr=False)
    client_id: str | None = None
    issuer: str | None = None
    audience: str | None = None
    account: str | None = None
    scope: str | None = None
    created_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "issuer": self.issuer,
            "audience": self.audience,
            "client_id": self.client_id,
            "account": self.account,
            "scope": self.scope,
            "created_at": self.created_at,
            "refresh_token": self.refresh_token,
        }


# ---- the credentials file ---------------------------------------------------------------------

def read_credentials(path: Path) -> StoredLogin | None:
    """The stored login, or None when there is none (or it cannot be read).

    Logs a warning (naming the file, not its content) when others may read it.
    """
    try:
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = json.loads(file.read())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("refresh_token"), str) or not data["refresh_token"]:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the credentials file %s can be read by others; run: chmod 600 %s", path, path)

    def text(name: str) -> str | None:
        value = data.get(name)
        return value if isinstance(value, str) and value else None

    return StoredLogin(
        refresh_token=data["refresh_token"],
        client_id=text("client_id"),
        issuer=text("issuer"),
        audience=text("audience"),
        account=text("account"),
        scope=text("scope"),
        created_at=text("created_at"),
    )


def write_credentials(path: Path, login: StoredLogin) -> None:
    """Store `login` atomically in a file only its owner can read or write (0600).

    The directory is created with mode 0700 when missing (an existing one is left as it is).
    A reader sees the old file or the new one, never a part. Raises OSError.
    """
    directory = path.parent
    if not directory.exists():
        directory.mkdir(parents=True, mode=DIR_MODE)
        os.chmod(directory, DIR_MODE)  # mkdir's mode is cut by the umask
    payload = (json.dumps(login.to_json(), indent=2) + "\n").encode()
    temporary = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # Created 0600 from the first byte: never a moment where the token sits in a readable file.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), FILE_MODE)  # whatever the umask
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- the device flow --------------------------------------------------------------------------

Sleep = Callable[[float], Awaitable[None]]


async def device_login(
    auth0: Auth0Client,
    *,
    client_id: str,
    audience: str,
    out: TextIO,
    sleep: Sleep = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> TokenSet:
    """Run the device flow to its end and return the tokens (with a refresh token).

    Shows the user where to confirm on `out`; polls every `interval` seconds, slowing down
    when asked. Raises LoginError when the user declines, the code expires, or Auth0 refuses.
    """
    try:
        start = await auth0.start_device_login(client_id, " ".join(LOGIN_SCOPES), audience)
    except Auth0Error as exc:
        raise LoginError(_refusal(exc, client_id)) from None
    out.write(
        "To sign in to token-vault-mcp, open this page in a browser:\n"
        f"  {start.verification_uri_complete or start.verification_uri}\n"
        f"and check that it shows the code  {start.user_code}\n"
        f"(or open {start.verification_uri} and enter the code). Waiting for you to confirm…\n"
    )
    out.flush()
    interval = max(0, start.interval)
    expires = clock() + start.expires_in
    warned = False
    while True:
        await sleep(interval)
        if clock() >= expires:
            raise LoginError(EXPIRED)
        try:
            tokens = await auth0.poll_device_login(client_id, start.device_code)
        except Auth0Error as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if exc.error == "expired_token":
                raise LoginError(EXPIRED) from None
            if exc.error == "access_denied":
                raise LoginError("the sign-in was declined in the browser; nothing was stored") from None
            if exc.retryable:  # Auth0 had a bad moment (already retried): keep polling until the code expires
                if not warned:
                    out.write("Auth0 is not answering right now; still waiting…\n")
                    out.flush()
                    warned = True
                continue
            raise LoginError(_refusal(exc, client_id)) from None
        if not tokens.refresh_token:
            raise LoginError(
                "Auth0 issued no refresh token: enable Allow Offline Access on the API "
                f"{audience} and the Refresh Token grant on the login application"
            )
        return tokens


def _refusal(exc: Auth0Error, client_id: str) -> str:
    if exc.error == "unauthorized_client":
        return (
            f"Auth0 does not allow the device flow for client {client_id}: set TVM_LOGIN_CLIENT_ID to a Native "
            "application with the Device Code grant enabled"
        )
    if exc.unreachable or (exc.status or 0) >= 500 or exc.status == 429:
        return "Auth0 could not be reached; check AUTH0_DOMAIN and your network, then try again"
    return f"Auth0 refused the login ({exc.error or exc.status}); check TVM_LOGIN_CLIENT_ID and AUTH0_AUDIENCE"


# ---- the commands -----------------------------------------------------------------------------

def login_client_id(config: Config) -> str:
    """The client `login` signs in with: TVM_LOGIN_CLIENT_ID, else AUTH0_CLIENT_ID. Raises ConfigError."""
    client_id = config.login_client_id or config.client_id
    if config.auth0_base_url is None or client_id is None or config.audience is None:
        raise ConfigError(
            "login needs AUTH0_DOMAIN, AUTH0_AUDIENCE and TVM_LOGIN_CLIENT_ID (or AUTH0_CLIENT_ID); "
            "demo mode signs in as its demo user without a login"
        )
    return client_id


async def login(
    config: Config,
    *,
    out: TextIO,
    transport: httpx.AsyncBaseTransport | None = None,
    sleep: Sleep = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> StoredLogin:
    """Sign the user in with the device flow and store the login. Raises LoginError, ConfigError, OSError."""
    client_id = login_client_id(config)
    assert config.auth0_base_url is not None and config.audience is not None  # login_client_id checked
    # The login client is public: no secret or key of the server's own client is involved.
    auth0 = Auth0Client(config.auth0_base_url, client_id, transport=transport, timeout=config.auth0_timeout)
    try:
        tokens = await device_login(
            auth0, client_id=client_id, audience=config.audience, out=out, sleep=sleep, clock=clock
        )
        try:
            claims = await JwtVerifier(auth0, config.audience).verify(tokens.access_token)
        except InvalidToken as exc:
            raise LoginError(f"the access token Auth0 issued was refused ({exc}); nothing was stored") from None
    finally:
        await auth0.aclose()
    assert tokens.refresh_token is not None  # device_login guarantees it
    stored = StoredLogin(
        refresh_token=tokens.refresh_token,
        client_id=client_id,
        issuer=config.issuer,
        audience=config.audience,
        account=str(claims.get("sub")),
        scope=tokens.scope,
        created_at=datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
    )
    write_credentials(config.credentials_file, stored)
    return stored


def status(config: Config) -> tuple[bool, str]:
    """Whether a login is stored, and a few lines saying whose (never the token)."""
    path = config.credentials_file
    stored = read_credentials(path)
    lines: list[str] = []
    if config.refresh_token:
        lines.append("TVM_REFRESH_TOKEN is set: `serve` uses it rather than a stored login")
    if stored is None:
        lines.insert(0, f"not logged in (no login stored in {path}); run `token-vault-mcp login`")
        return False, "\n".join(lines)
    lines.insert(
        0,
        f"logged in as {stored.account or '(unknown account)'} at {stored.issuer or '(unknown tenant)'} "
        f"with client {stored.client_id or '(unknown)'} since {stored.created_at or '(unknown)'}",
    )
    lines.insert(1, f"credentials: {path}")
    if stored.scope:
        lines.insert(2, f"scopes: {stored.scope}")
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = FILE_MODE
    if mode & 0o077:
        lines.append(f"warning: the file has mode {mode:04o}, others may read it; run: chmod 600 {path}")
    if config.issuer is not None and stored.issuer is not None and stored.issuer != config.issuer:
        lines.append(f"warning: AUTH0_DOMAIN now names {config.issuer}; this login is for another tenant")
    return True, "\n".join(lines)


async def logout(config: Config, *, transport: httpx.AsyncBaseTransport | None = None) -> str:
    """Revoke the stored refresh token at Auth0 (best effort) and delete the file; say what was done."""
    path = config.credentials_file
    stored = read_credentials(path)
    if stored is None:
        if path.exists():
            path.unlink()
            return f"removed {path} (it held no usable login)"
        return "not logged in; nothing to remove"
    revoked = "the refresh token could not be revoked at Auth0 (it stays valid until it expires or is revoked)"
    if stored.issuer and stored.client_id:
        auth0 = Auth0Client(stored.issuer, stored.client_id, transport=transport, timeout=config.auth0_timeout)
        try:
            await auth0.revoke_refresh_token(stored.refresh_token, stored.client_id)
            revoked = "the refresh token was revoked at Auth0"
        except Auth0Error as exc:
            log.warning("revoking the refresh token failed: %s", exc)
        finally:
            await auth0.aclose()
    path.unlink(missing_ok=True)
    who = f" {stored.account}" if stored.account else ""
    return f"logged out{who}: removed {path}; {revoked}"
