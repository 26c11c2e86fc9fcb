"""Remote mode: Streamable HTTP (`/mcp`) or legacy SSE (`/sse` + `/messages/`) as an OAuth 2.1 resource server.

Two ASGI layers wrap the SDK's transport app:
- `HostOriginGuard` (server/web/guard.py; outermost, every request): a `Host` outside the
  allowlist → 421, an `Origin` outside it → 403 (DNS rebinding, cross-site browsers). Loopback
  names on any port are always allowed (SPEC §7), as the MCP SDK and the conformance suite do.
- `BearerAuth` (the MCP endpoints): a verified Auth0 access token or 401 with
  `WWW-Authenticate` naming the RFC 9728 metadata; every refusal is audited without the token.
The verified principal rides in the ASGI scope to the tools, whose scope checks answer
`[insufficient_scope]`. The caller's token is only ever sent to Auth0's Token Vault. In demo mode the
demo tenant's sign-in and consent pages are served too, under `/demo-tenant/` (server/web/demo_tenant.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.app import Runtime, build_mcp
from server.auth0.token_verifier import InvalidToken
from server.broker import Call
from server.config import Config
from server.control import AuthFailures
from server.errors import BrokerError, RateLimited, Unauthenticated
from server.principal import Principal, SubjectToken
from server.web.connect import connect_routes
from server.web.demo_tenant import demo_pages, serve_demo_pages_at
from server.web.guard import HostOriginGuard, is_loopback_host, is_loopback_origin
from tools import ALL_TOOLS

log = logging.getLogger(__name__)

__all__ = ["HostOriginGuard", "is_loopback_host", "is_loopback_origin"]  # and the app; kept here for callers

PRINCIPAL_KEY = "tvm.principal"
METADATA_PREFIX = "/.well-known/oauth-protected-resource"
MAX_TOKEN_LENGTH = 16_384


@dataclass(frozen=True)
class RemoteSettings:
    transport: str  # "http" or "sse"
    host: str
    port: int
    resource_url: str
    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str]

    @property
    def protected_paths(self) -> tuple[str, ...]:
        return ("/mcp",) if self.transport == "http" else ("/sse", "/messages")

    @property
    def origin(self) -> str:
        """The origin this server is reached at (the resource URL's)."""
        parts = urlsplit(self.resource_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def metadata_path(self) -> str:
        path = urlsplit(self.resource_url).path.rstrip("/")
        return METADATA_PREFIX + path

    @property
    def metadata_url(self) -> str:
        parts = urlsplit(self.resource_url)
        return f"{parts.scheme}://{parts.netloc}{self.metadata_path}"


def remote_settings(config: Config, transport: str, host: str, port: int) -> RemoteSettings:
    """Allowlists beyond loopback (always allowed, see `is_loopback_host`): the resource URL's host and the extras."""
    default_path = "/mcp" if transport == "http" else "/sse"
    shown_host = f"[{host}]" if ":" in host else host
    resource = config.resource_url or f"http://{shown_host}:{port}{default_path}"
    hosts = {f"{shown_host}:{port}".lower()}
    origins: set[str] = set()
    parts = urlsplit(resource)
    hosts.add(parts.netloc.lower())
    origins.add(f"{parts.scheme}://{parts.netloc}".lower())
    hosts.update(h.lower() for h in config.allowed_hosts)
    origins.update(o.lower().rstrip("/") for o in config.allowed_origins)
    return RemoteSettings(transport, host, port, resource, frozenset(hosts), frozenset(origins))


def metadata_document(runtime: Runtime, settings: RemoteSettings) -> dict[str, Any]:
    """RFC 9728 Protected Resource Metadata."""
    return {
        "resource": settings.resource_url,
        "authorization_servers": [runtime.auth0.issuer],
        "scopes_supported": [spec.scope for spec in ALL_TOOLS],
        "bearer_methods_supported": ["header"],
        "resource_name": "token-vault-mcp",
    }


def build_remote_app(runtime: Runtime, settings: RemoteSettings) -> Starlette:
    """The whole remote ASGI app: SDK transport, health, metadata, auth and Host/Origin guards."""

    async def principals(http_scope: Mapping[str, Any] | None) -> Principal:
        principal = (http_scope or {}).get(PRINCIPAL_KEY)
        if not isinstance(principal, Principal):  # pragma: no cover - BearerAuth guards every MCP path
            raise Unauthenticated("no verified access token came with this request")
        return principal

    mcp = build_mcp(runtime, principals, settings.transport)
    document = metadata_document(runtime, settings)
    public = runtime.config.connect_public_url or settings.origin
    if runtime.connects is not None:  # /connect/* beside /mcp: no bearer token, Host checks as everywhere

        async def public_url() -> str:
            return public

        for route in connect_routes(runtime.connect_site(public_url)):
            mcp.custom_route(route.path, methods=["GET"])(route.endpoint)

    @mcp.custom_route("/healthz", methods=["GET"])
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @mcp.custom_route(settings.metadata_path, methods=["GET"])
    async def resource_metadata(request: Request) -> Response:
        return JSONResponse(document)

    if settings.metadata_path != METADATA_PREFIX:

        @mcp.custom_route(METADATA_PREFIX, methods=["GET"])
        async def resource_metadata_root(request: Request) -> Response:
            return JSONResponse(document)

    off = TransportSecuritySettings(enable_dns_rebinding_protection=False)  # HostOriginGuard does it for all paths
    if settings.transport == "http":
        app = mcp.streamable_http_app(streamable_http_path="/mcp", transport_security=off, host=settings.host)
    else:
        app = mcp.sse_app(transport_security=off, host=settings.host)
    if runtime.tenant is not None:  # demo: the tenant's sign-in and consent pages here, for a real browser
        app.router.routes.append(demo_pages(runtime.tenant))
        serve_demo_pages_at(runtime.tenant, runtime.auth0, public)
    _mount_console(app, runtime, settings)
    app.add_middleware(BearerAuth, runtime=runtime, settings=settings)
    app.add_middleware(HostOriginGuard, settings=settings)
    return app


def _mount_console(app: Starlette, runtime: Runtime, settings: RemoteSettings) -> None:
    """`/console` beside the MCP routes (SPEC §11); `app.state.console` is None without one."""
    from starlette.routing import Mount, Route

    from server.web.console import PREFIX, remote_console

    public = urlsplit(settings.resource_url)  # TVM_RESOURCE_URL: where browsers reach this server
    origin = f"{public.scheme}://{public.netloc}" if runtime.config.resource_url is not None else None
    console = remote_console(runtime, settings.allowed_origins, origin)
    app.state.console = console
    if console is None:

        async def no_console(request: Request) -> Response:
            return Response("The operator console needs TVM_CONSOLE_CLIENT_ID (an Auth0 web app) on this server.\n",
                            status_code=404, media_type="text/plain")

        app.router.routes += [Route(PREFIX, no_console), Route(PREFIX + "/{rest:path}", no_console)]
        return
    app.router.routes.append(Mount(PREFIX, app=console.app()))


class BearerAuth:
    """Verifies the Auth0 access token on the MCP endpoints; audits every refusal."""

    def __init__(self, app: ASGIApp, runtime: Runtime, settings: RemoteSettings) -> None:
        self.app = app
        self.runtime = runtime
        self.settings = settings
        self.failures = AuthFailures()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _under(scope["path"], self.settings.protected_paths):
            await self.app(scope, receive, send)
            return
        wait = self.failures.retry_after(_address(scope), time.monotonic())
        if wait is not None:  # an address that keeps failing: answered before any token is parsed
            await self._too_many(scope, send, wait)
            return
        authorization = _headers(scope).get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            await self._refuse(scope, send, "no bearer token", None, error=None)
            return
        if len(token) > MAX_TOKEN_LENGTH:
            await self._refuse(scope, send, "the bearer token is too long", None)
            return
        try:
            claims = await self.runtime.verifier.verify(token)
            principal = Principal.from_claims(claims, SubjectToken(token, "access_token"))
        except InvalidToken as exc:
            await self._refuse(scope, send, str(exc), _claimed(exc.claims))
            return
        except Unauthenticated as exc:
            await self._refuse(scope, send, exc.message, None)
            return
        scope[PRINCIPAL_KEY] = principal
        await self.app(scope, receive, send)

    async def _audit(self, scope: Scope, known: Principal | None, error: BrokerError) -> None:
        """The refusal's event, folded: at most one a second per remote address, `suppressed` counting the rest."""
        if self.runtime.metrics is not None:  # every refusal is counted; only its events are folded
            self.runtime.metrics.refused(error)
        client = scope.get("client")
        remote = f"{client[0]}:{client[1]}" if client else None
        call = Call(tool=None, scope=None, transport=self.settings.transport,
                    args={"reason": error.message, "remote": remote})
        suppressed = self.runtime.broker.control.fold(("auth", _address(scope)), time.monotonic(), (call, known, error))
        if suppressed is None:
            return
        call.args = {**call.args, "suppressed": suppressed}
        await self.runtime.broker.record(call, known, error)

    async def _too_many(self, scope: Scope, send: Send, wait: int) -> None:
        message = f"too many rejected authentications from this address; retry in {wait} s"
        await self._audit(scope, None, RateLimited(message, wait))
        await _json_error(send, 429, "too_many_requests", message, (b"retry-after", str(wait).encode()))

    async def _refuse(
        self, scope: Scope, send: Send, reason: str, known: Principal | None, error: str | None = "invalid_token"
    ) -> None:
        self.failures.failed(_address(scope), time.monotonic())
        await self._audit(scope, known, Unauthenticated(reason))
        challenge = 'Bearer realm="token-vault-mcp"'
        if error is not None:
            challenge += f', error="{error}", error_description="{_quoted(reason)}"'
        challenge += f', resource_metadata="{self.settings.metadata_url}"'
        await _json_error(
            send, 401, error or "unauthorized", reason, (b"www-authenticate", challenge.encode())
        )


def _claimed(claims: dict[str, Any] | None) -> Principal | None:
    """Who a signed-but-refused token names (expired, wrong audience, …), for the audit log."""
    if not claims:
        return None
    try:
        known = Principal.from_claims(claims)
    except Unauthenticated:
        return None
    return known if known.plain_names else None


def _address(scope: Scope) -> str:
    """The remote address a request came from (its host, not its port: one client opens many)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', "'")


async def _json_error(send: Send, status: int, error: str, description: str, header: tuple[bytes, bytes]) -> None:
    """An OAuth-style JSON error answer with one header of its own (the challenge, or when to retry)."""
    body = json.dumps({"error": error, "error_description": description}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), header, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
