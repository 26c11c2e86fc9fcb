"""Running the MCP server on a transport."""

from __future__ import annotations

import logging

from server import demo
from server.app import build_mcp, open_runtime
from server.config import Config

log = logging.getLogger(__name__)


async def serve_stdio(config: Config) -> None:
    """stdio: stdout carries JSON-RPC only; everything else goes to stderr."""
    runtime = await open_runtime(config)
    try:
        if runtime.tenant is not None:
            demo.banner(runtime.tenant.account, str(config.database))
        refunded = await runtime.broker.recover_reservations()
        if refunded:
            log.warning("refunded %d reservation(s) left by a process that died", refunded)
        mcp = build_mcp(runtime, runtime.identity.principal, "stdio")
        await mcp.run_stdio_async()
    finally:
        await runtime.aclose()
