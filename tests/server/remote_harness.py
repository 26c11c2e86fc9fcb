"""A real remote server on an ephemeral 127.0.0.1 port, backed by an emulated (non-demo) tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from server import market
from server.app import Runtime, open_runtime
from server.clock import ManualClock
from server.config import load_config
from server.demo import demo_listings
from server.emulator import DemoTenant, create_app, demo_tenant
from server.web.loopback import port_of, serving, tcp_socket
from server.web.remote import build_remote_app, remote_settings

ISSUER = "https://tenant.test/"
ALL_SCOPES = ["read:market", "read:balance", "buy:quota", "request:token", "call:api"]


@dataclass
class Remote:
    runtime: Runtime
    tenant: DemoTenant
    transport: str
    base_url: str

    @property
    def endpoint(self) -> str:
        return self.base_url + ("/mcp" if self.transport == "http" else "/sse")

    def token(self, sub: str, scopes: list[str] | None = None, azp: str = "agent-1", **kw: Any) -> str:
        return self.tenant.state.mint_access_token(
            sub, audience=self.tenant.audience, scopes=ALL_SCOPES if scopes is None else scopes, azp=azp, **kw
        )

    def client(self, token: str | None) -> Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if self.transport == "http":
            return Client(streamable_http_client(self.endpoint, http_client=create_mcp_http_client(headers=headers)))
        return Client(sse_client(self.endpoint, headers=headers))


@asynccontextmanager
async def remote_server(tmp_path: Path, transport: str, clock: ManualClock) -> AsyncIterator[Remote]:
    tenant = demo_tenant(ISSUER)
    for sub in ("auth0|alice", "auth0|bob"):
        tenant.state.add_user(sub)
        tenant.state.connect_account(sub, "github", ["repo:read", "repo:write"])
    config = load_config(
        {
            "AUTH0_DOMAIN": "tenant.test",
            "AUTH0_CLIENT_ID": tenant.client_id,
            "AUTH0_CLIENT_SECRET": tenant.client_secret,
            "AUTH0_AUDIENCE": tenant.audience,
            "TVM_DATABASE": str(tmp_path / f"remote-{transport}.db"),
        },
        dotenv=False,
    )
    runtime = await open_runtime(config, clock=clock, auth0_transport=httpx.ASGITransport(app=create_app(tenant.state)))
    specs = demo_listings()
    await runtime.db.write(lambda tx: market.load(tx, specs))
    for sub in ("auth0|alice", "auth0|bob"):
        await runtime.broker.credit(sub, 1000)
    sock = tcp_socket()
    port = port_of(sock)
    app = build_remote_app(runtime, remote_settings(runtime.config, transport, "127.0.0.1", port))
    try:
        async with serving(app, sock):
            yield Remote(runtime, tenant, transport, f"http://127.0.0.1:{port}")
    finally:
        await runtime.aclose()
