"""Configuration from the environment (and a `.env` file), checked once at start (SPEC §6).

A wrong value raises ConfigError with one line naming the variable.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from platformdirs import user_config_dir, user_data_dir

from server.errors import ConfigError
from server.store.base import is_database_url, shown_url

APP_NAME = "token-vault-mcp"
CLIENT_AUTH_METHODS = ("client_secret_post", "client_secret_basic", "private_key_jwt")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_AUTH0_TIMEOUT = 10.0
MAX_AUTH0_TIMEOUT = 120.0
DEFAULT_GRANT_TTL = 300  # seconds a call_api grant lasts (SPEC §8)
MAX_GRANT_TTL = 86_400
DEFAULT_API_TIMEOUT = 30.0  # seconds one provider call may take
MAX_API_TIMEOUT = 600.0
DEFAULT_API_MAX_BYTES = 262_144  # a provider answer's body is cut beyond this
MAX_API_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_RESERVATION_LEASE = 60  # seconds a reservation's holder has it before others may refund it (SPEC §12)
MAX_RESERVATION_LEASE = 3600
DEFAULT_APPROVAL_TIMEOUT = 300  # seconds the account's owner has to approve (SPEC §9)
MAX_APPROVAL_TIMEOUT = 900


@dataclass(frozen=True)
class Config:
    auth0_base_url: str | None  # e.g. https://tenant.us.auth0.com ; None = demo mode
    client_id: str | None
    client_secret: str | None = field(repr=False)
    audience: str | None
    login_client_id: str | None
    refresh_token: str | None = field(repr=False)
    database: Path  # the SQLite file (TVM_DATABASE, or the default; unused when database_url is set)
    market_file: Path | None
    resource_url: str | None
    allowed_hosts: tuple[str, ...]
    allowed_origins: tuple[str, ...]
    log_level: str
    client_auth_method: str
    client_key_file: Path | None
    credentials_file: Path
    auth0_timeout: float = DEFAULT_AUTH0_TIMEOUT  # seconds: the deadline of one Auth0 operation, retries included
    grant_ttl: int = DEFAULT_GRANT_TTL  # TVM_GRANT_TTL
    api_timeout: float = DEFAULT_API_TIMEOUT  # TVM_API_TIMEOUT
    api_max_bytes: int = DEFAULT_API_MAX_BYTES  # TVM_API_MAX_BYTES
    policy_file: Path | None = None  # TVM_POLICY_FILE
    approval_timeout: int = DEFAULT_APPROVAL_TIMEOUT  # TVM_APPROVAL_TIMEOUT
    reservation_lease: int = DEFAULT_RESERVATION_LEASE  # TVM_RESERVATION_LEASE
    # TVM_DATABASE=postgresql://…: PostgreSQL (SPEC §12) instead of the file (it may hold a password: no repr)
    database_url: str | None = field(default=None, repr=False)
    metrics_port: int | None = None  # TVM_METRICS_PORT: /metrics on 127.0.0.1 (SPEC §12); None = no metrics
    # SPEC §10: where browsers reach /connect/* (None: the origin of TVM_RESOURCE_URL, else the loopback address
    # served), the Auth0 client that signs the user in for the My Account API, and the keys that seal states
    public_url: str | None = None  # TVM_PUBLIC_URL
    connect_client_id_set: str | None = None  # TVM_CONNECT_CLIENT_ID
    state_keys: tuple[bytes, ...] = field(default=(), repr=False)  # TVM_STATE_KEYS (empty: made at start)
    console_client_id: str | None = None  # TVM_CONSOLE_CLIENT_ID: the console's Auth0 web app (SPEC §11)
    console_client_secret: str | None = field(default=None, repr=False)  # TVM_CONSOLE_CLIENT_SECRET

    @property
    def demo(self) -> bool:
        return self.auth0_base_url is None

    @property
    def issuer(self) -> str | None:
        return None if self.auth0_base_url is None else self.auth0_base_url + "/"

    @property
    def connect_client_id(self) -> str | None:
        """The client of the connect flow's sign-in: TVM_CONNECT_CLIENT_ID, else TVM_LOGIN_CLIENT_ID, else
        AUTH0_CLIENT_ID."""
        return self.connect_client_id_set or self.login_client_id or self.client_id

    @property
    def connect_public_url(self) -> str | None:
        """TVM_PUBLIC_URL, else the origin of TVM_RESOURCE_URL; None: the loopback address this process serves."""
        if self.public_url is not None:
            return self.public_url
        if self.resource_url is not None:
            parts = urlsplit(self.resource_url)
            return f"{parts.scheme}://{parts.netloc}"
        return None

    @property
    def refresh_client_id(self) -> str | None:
        """The client a stored refresh token belongs to (the login client, else the main client)."""
        return self.login_client_id or self.client_id


def load_config(environ: Mapping[str, str] | None = None, dotenv: bool = True) -> Config:
    """Read and check the configuration. Raises ConfigError naming the bad variable."""
    if environ is None:
        if dotenv:
            _load_dotenv()
        environ = os.environ
    env = {k: v.strip() for k, v in environ.items() if v is not None and v.strip() != ""}

    base_url = _auth0_base_url(env["AUTH0_DOMAIN"]) if "AUTH0_DOMAIN" in env else None
    if base_url is not None:
        for name in ("AUTH0_CLIENT_ID", "AUTH0_AUDIENCE"):
            if name not in env:
                raise ConfigError(f"{name} is required when AUTH0_DOMAIN is set")
    method = env.get("TVM_CLIENT_AUTH_METHOD", "client_secret_post")
    if method not in CLIENT_AUTH_METHODS:
        raise ConfigError(f"TVM_CLIENT_AUTH_METHOD must be one of {', '.join(CLIENT_AUTH_METHODS)}, not {method!r}")
    key_file = Path(env["TVM_CLIENT_KEY_FILE"]).expanduser() if "TVM_CLIENT_KEY_FILE" in env else None
    if method == "private_key_jwt" and key_file is None and base_url is not None:
        raise ConfigError("TVM_CLIENT_KEY_FILE (a PEM private key) is required with private_key_jwt")
    if key_file is not None and not key_file.is_file():
        raise ConfigError(f"TVM_CLIENT_KEY_FILE points to {key_file}, which is not a readable file")
    auth0_timeout = _seconds(env, "TVM_AUTH0_TIMEOUT", DEFAULT_AUTH0_TIMEOUT, MAX_AUTH0_TIMEOUT)
    grant_ttl = int(_seconds(env, "TVM_GRANT_TTL", DEFAULT_GRANT_TTL, MAX_GRANT_TTL, whole=True))
    api_timeout = _seconds(env, "TVM_API_TIMEOUT", DEFAULT_API_TIMEOUT, MAX_API_TIMEOUT)
    api_max_bytes = _whole(env, "TVM_API_MAX_BYTES", DEFAULT_API_MAX_BYTES, MAX_API_MAX_BYTES)
    approval_timeout = _whole(env, "TVM_APPROVAL_TIMEOUT", DEFAULT_APPROVAL_TIMEOUT, MAX_APPROVAL_TIMEOUT)
    reservation_lease = _whole(env, "TVM_RESERVATION_LEASE", DEFAULT_RESERVATION_LEASE, MAX_RESERVATION_LEASE)
    metrics_port = _whole(env, "TVM_METRICS_PORT", 0, 65_535) or None  # 0: not set
    policy_file = Path(env["TVM_POLICY_FILE"]).expanduser() if "TVM_POLICY_FILE" in env else None
    if policy_file is not None and not policy_file.is_file():
        raise ConfigError(f"TVM_POLICY_FILE points to {policy_file}, which is not a readable file")
    level = env.get("TVM_LOG_LEVEL", "WARNING").upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"TVM_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {env['TVM_LOG_LEVEL']!r}")
    resource_url = env.get("TVM_RESOURCE_URL")
    if resource_url is not None:
        parts = urlsplit(resource_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"TVM_RESOURCE_URL must be an absolute http(s) URL, not {resource_url!r}")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
            raise ConfigError("TVM_RESOURCE_URL must use https unless it is on loopback")
    public_url = _public_url(env["TVM_PUBLIC_URL"]) if "TVM_PUBLIC_URL" in env else None
    state_keys = state_keys_from(env["TVM_STATE_KEYS"]) if "TVM_STATE_KEYS" in env else ()
    market = Path(env["TVM_MARKET_FILE"]).expanduser() if "TVM_MARKET_FILE" in env else None
    if market is not None and not market.is_file():
        raise ConfigError(f"TVM_MARKET_FILE points to {market}, which is not a readable file")
    data_dir = Path(user_data_dir(APP_NAME, appauthor=False))
    database_url = _database_url(env["TVM_DATABASE"]) if is_database_url(env.get("TVM_DATABASE", "")) else None
    return Config(
        auth0_base_url=base_url,
        client_id=env.get("AUTH0_CLIENT_ID"),
        client_secret=env.get("AUTH0_CLIENT_SECRET"),
        audience=env.get("AUTH0_AUDIENCE"),
        login_client_id=env.get("TVM_LOGIN_CLIENT_ID"),
        refresh_token=env.get("TVM_REFRESH_TOKEN"),
        database=Path(env["TVM_DATABASE"]).expanduser()
        if "TVM_DATABASE" in env and database_url is None
        else data_dir / ("vault.db" if base_url else "demo.db"),
        database_url=database_url,
        market_file=market,
        resource_url=resource_url,
        allowed_hosts=_csv(env.get("TVM_ALLOWED_HOSTS")),
        allowed_origins=_csv(env.get("TVM_ALLOWED_ORIGINS")),
        log_level=level,
        client_auth_method=method,
        client_key_file=key_file,
        auth0_timeout=auth0_timeout,
        grant_ttl=grant_ttl,
        api_timeout=api_timeout,
        api_max_bytes=api_max_bytes,
        policy_file=policy_file,
        approval_timeout=approval_timeout,
        reservation_lease=reservation_lease,
        metrics_port=metrics_port,
        public_url=public_url,
        connect_client_id_set=env.get("TVM_CONNECT_CLIENT_ID"),
        state_keys=state_keys,
        console_client_id=env.get("TVM_CONSOLE_CLIENT_ID") or None,
        console_client_secret=env.get("TVM_CONSOLE_CLIENT_SECRET") or None,
        credentials_file=Path(
            env.get("TVM_CREDENTIALS_FILE", str(Path(user_config_dir(APP_NAME, appauthor=False)) / "credentials.json"))
        ).expanduser(),
    )


def _seconds(env: Mapping[str, str], name: str, default: float, most: float, whole: bool = False) -> float:
    """A duration variable: seconds, more than 0 and at most `most` (`whole`: an integer). Raises ConfigError."""
    value = env.get(name)
    if value is None:
        return default
    try:
        seconds = float(int(value)) if whole else float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= most:  # also refuses nan
        kind = "whole seconds" if whole else "seconds"
        raise ConfigError(f"{name} must be {kind} between 0 and {most:g}, not {value!r}")
    return seconds


def _whole(env: Mapping[str, str], name: str, default: int, most: int) -> int:
    """A positive whole number of at most `most`. Raises ConfigError."""
    value = env.get(name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= most:
        raise ConfigError(f"{name} must be a whole number between 1 and {most}, not {value!r}")
    return int(value)


def _database_url(url: str) -> str:
    """A PostgreSQL URL, checked: postgresql://user@host:5432/db (libpq's parameters may follow). Raises ConfigError
    (naming the URL without its password)."""
    shown = shown_url(url)
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(f"TVM_DATABASE: the port of {shown} is not a number") from None
    if not parts.path.strip("/"):
        raise ConfigError(f"TVM_DATABASE must name the database, as in postgresql://user@host:5432/db, not {shown}")
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except ProgrammingError as exc:
        reason = " ".join(str(exc).replace(url, shown).split())
        raise ConfigError(f"TVM_DATABASE is not a PostgreSQL URL libpq accepts ({reason}): {shown}") from None
    return url


def _public_url(value: str) -> str:
    """TVM_PUBLIC_URL: an absolute http(s) URL, https unless on loopback, no query; no trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"TVM_PUBLIC_URL must be an absolute http(s) URL like https://broker.example, not {value!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError("TVM_PUBLIC_URL must use https unless it is on loopback")
    return value.rstrip("/")


MIN_STATE_KEY = 32  # bytes: the SDK's requestState codec and our sealing both want at least this much


def state_keys_from(value: str) -> tuple[bytes, ...]:
    """TVM_STATE_KEYS: comma-separated base64 (standard or URL-safe, padded or not) keys of at least 32 bytes.

    The first one seals, all of them open (rotation). Raises ConfigError naming the variable and the key's
    position (never the key).
    """
    keys: list[bytes] = []
    for n, text in enumerate((p.strip() for p in value.split(",")), start=1):
        if not text:
            continue
        try:
            raw = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"TVM_STATE_KEYS: key {n} is not base64") from None
        if len(raw) < MIN_STATE_KEY:
            raise ConfigError(f"TVM_STATE_KEYS: key {n} has {len(raw)} bytes; each key needs at least {MIN_STATE_KEY} "
                              "(make one with: openssl rand -base64 32)")
        keys.append(raw)
    if not keys:
        raise ConfigError("TVM_STATE_KEYS holds no key")
    return tuple(keys)


def _auth0_base_url(value: str) -> str:
    """`tenant.auth0.com` → `https://tenant.auth0.com`; `http://` only for loopback."""
    text = value.rstrip("/")
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
        raise ConfigError(f"AUTH0_DOMAIN must be a host name like your-tenant.us.auth0.com, not {value!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise ConfigError("AUTH0_DOMAIN may use http:// only for a loopback address (an emulator)")
    return f"{parts.scheme}://{parts.netloc}"


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip()) if value else ()


def _load_dotenv() -> None:
    try:
        from dotenv import load_dotenv
    except ImportError:  # pragma: no cover - a declared dependency
        return
    load_dotenv(Path.cwd() / ".env", override=False)


def configure_logging(level: str) -> None:
    """Logs go to stderr only: in stdio mode stdout carries JSON-RPC."""
    logging.basicConfig(
        level=getattr(logging, level, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=__import__("sys").stderr,
        force=True,
    )
