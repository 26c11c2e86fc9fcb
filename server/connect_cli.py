"""`token-vault-mcp connect CONNECTION [--scopes S…]`: the connect flow of SPEC §10 from a terminal.

Signs in as the stdio user (TVM_REFRESH_TOKEN or the stored login), makes a connect link for that account
(agent `cli`), opens the pages on loopback, prints the URL and waits until the flow ends: 0 connected,
1 refused or expired.
"""

from __future__ import annotations

from typing import TextIO

from server.app import open_runtime
from server.broker import Call
from server.config import Config
from server.principal import Principal

AGENT = "cli"  # the links this command makes are bound to this agent name


async def connect(config: Config, connection: str, scopes: list[str], out: TextIO) -> bool:
    """Run one connect flow; True when the account got connected. Raises BrokerError (no login, Auth0 down)."""
    runtime = await open_runtime(config)
    try:
        assert runtime.connects is not None
        runtime.serve_connect_on_loopback()
        user = await runtime.identity.principal()
        principal = Principal(user.account, AGENT, user.scopes)
        call = Call(tool="connect", scope=None, transport="cli", args={"connection": connection, "scopes": scopes})
        needed = await runtime.connects.start(call, principal, connection, scopes)
        print(f"Open this link in your browser to connect your {connection} account (valid 10 minutes):\n"
              f"  {needed.url}", file=out, flush=True)
        ttl = runtime.connects.ttl.total_seconds()
        link = await runtime.connects.wait(needed.link.id, ttl + 5)
        connected = link is not None and link.status == "connected"
        print("connected" if connected else "not connected (refused or expired)", file=out, flush=True)
        return connected
    finally:
        await runtime.aclose()
