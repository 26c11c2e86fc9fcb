"""Real servers on 127.0.0.1 for the console's browser tests: the demo's remote app (console mounted,
one-time links), an Auth0-backed one against the emulator as a real HTTP server, and a canary that
counts every request it gets (what hostile agent text would call home to)."""

from __future__ import annotations

import io
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from server.app import Runtime, open_runtime
from server.clock import ManualClock
from server.config import load_config
from server.emulator import create_app, demo_tenant
from server.emulator.demo import DEMO_ACCOUNT, DEMO_CLIENT_ID, DemoTenant
from server.web.console.signin import LinkSignIn
from server.web.loopback import port_of, serving, tcp_socket
from server.web.remote import build_remote_app, remote_settings


def _socket() -> tuple[socket.socket, int]:
    sock = tcp_socket()
    return sock, port_of(sock)


@dataclass
class Console:
    runtime: Runtime
    base_url: str
    printed: io.StringIO
    tenant: DemoTenant | None = None

    def link(self) -> str:
        """A fresh one-time sign-in URL, as the server prints it on stderr."""
        signin = self.runtime_console.signin
        assert isinstance(signin, LinkSignIn)
        return signin.announce(self.base_url)

    runtime_console: Any = None

    @property
    def endpoint(self) -> str:
        return self.base_url + "/mcp"


@asynccontextmanager
async def demo_console(database: str | Path, clock: ManualClock) -> AsyncIterator[Console]:
    """`serve --transport http` in demo mode (the console signs in with one-time links)."""
    runtime = await open_runtime(load_config({"TVM_DATABASE": str(database)}, dotenv=False), clock=clock)
    sock, port = _socket()
    try:
        app = build_remote_app(runtime, remote_settings(runtime.config, "http", "127.0.0.1", port))
        printed = io.StringIO()
        app.state.console.signin.out = printed
        app.state.console.live_ms = 300  # the tests wait for live refreshes: a tenth of the real interval
        async with serving(app, sock):
            yield Console(runtime, f"http://127.0.0.1:{port}", printed, runtime.tenant, app.state.console)
    finally:
        await runtime.aclose()


@asynccontextmanager
async def auth0_console(database: Path, clock: ManualClock) -> AsyncIterator[Console]:
    """A remote server with a tenant (the emulator as a real HTTP server on loopback): Auth0 sign-in."""
    esock, eport = _socket()
    tenant = demo_tenant(f"http://127.0.0.1:{eport}/", auto_login=DEMO_ACCOUNT)
    async with serving(create_app(tenant.state), esock):
        config = load_config({
            "AUTH0_DOMAIN": tenant.domain, "AUTH0_CLIENT_ID": tenant.client_id,
            "AUTH0_CLIENT_SECRET": tenant.client_secret, "AUTH0_AUDIENCE": tenant.audience,
            "TVM_DATABASE": str(database), "TVM_CONSOLE_CLIENT_ID": DEMO_CLIENT_ID,
            "TVM_CONSOLE_CLIENT_SECRET": tenant.client_secret,
        }, dotenv=False)
        runtime = await open_runtime(config, clock=clock)
        sock, port = _socket()
        try:
            app = build_remote_app(runtime, remote_settings(runtime.config, "http", "127.0.0.1", port))
            app.state.console.live_ms = 300
            async with serving(app, sock):
                yield Console(runtime, f"http://127.0.0.1:{port}", io.StringIO(), tenant, app.state.console)
        finally:
            await runtime.aclose()


@dataclass
class Canary:
    """A loopback HTTP server that counts what reaches it (and serves an attacker's page on request)."""

    url: str
    hits: list[str] = field(default_factory=list)
    page: str = ""


@asynccontextmanager
async def canary() -> AsyncIterator[Canary]:
    sock, port = _socket()
    bird = Canary(f"http://127.0.0.1:{port}")

    async def hit(request: Request) -> Response:
        if request.url.path == "/attack":
            return HTMLResponse(bird.page)
        bird.hits.append(request.url.path)
        return Response("", status_code=204)

    app = Starlette(routes=[Route("/{path:path}", hit, methods=["GET", "POST"])])
    async with serving(app, sock):
        yield bird
