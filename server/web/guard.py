"""The `Host` and `Origin` checks every web listener of the broker applies (SPEC §7, §10): a `Host` outside
the allowlist → 421, an `Origin` outside it → 403 (DNS rebinding, cross-site browsers). Loopback names on
any port are always allowed, as the MCP SDK and the conformance suite do.
"""

from __future__ import annotations

from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send


class Allowlist(Protocol):
    """What a guard lets through besides loopback: `host[:port]` values and `scheme://host[:port]` origins."""

    @property
    def allowed_hosts(self) -> frozenset[str]: ...

    @property
    def allowed_origins(self) -> frozenset[str]: ...


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


def is_loopback_host(host: str) -> bool:
    """`localhost`, `127.0.0.1` or `[::1]`, with any port or none (a local reverse proxy needs no configuration).

    The port adds nothing against DNS rebinding: there the `Host` is the attacker's own name.
    """
    name, colon, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not colon:
        name = host
    elif not (port.isascii() and port.isdigit() and len(port) <= 5):
        return False
    return name in LOOPBACK_NAMES


def is_loopback_origin(origin: str) -> bool:
    """An `http` or `https` origin on a loopback name, any port (see `is_loopback_host`)."""
    scheme, sep, rest = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and "/" not in rest and "@" not in rest and is_loopback_host(rest)


class HostOriginGuard:
    """421 for a Host we do not serve, 403 for a browser Origin we do not trust."""

    def __init__(self, app: ASGIApp, settings: Allowlist) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get("host", "").lower()
        if host not in self.settings.allowed_hosts and not is_loopback_host(host):
            await _plain(send, 421, "Misdirected Request: this server does not serve that Host")
            return
        origin = headers.get("origin")
        if origin is not None and not _origin_allowed(origin.lower().rstrip("/"), self.settings.allowed_origins):
            await _plain(send, 403, "Forbidden: Origin not allowed")
            return
        await self.app(scope, receive, send)


def _origin_allowed(origin: str, allowed: frozenset[str]) -> bool:
    return origin in allowed or is_loopback_origin(origin)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
