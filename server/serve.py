"""Running the MCP server on a transport."""

from __future__ import annotations

import asyncio
import logging
import sys

from server import demo
from server.app import build_mcp, open_runtime
from server.config import Config
from server.errors import ConfigError

log = logging.getLogger(__name__)

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The
# group-commit thread needs it back the moment its fsync returns; with 5 ms, an event loop busy
# with other requests keeps every caller of that batch waiting. 0.5 ms: buy_quota at 32 clients
# from 78–84 % to 91–93 % of the floor's calls/s (bench throughput, interleaved A/B).
GIL_SWITCH_INTERVAL = 0.0005


async def serve_stdio(config: Config) -> None:
    """stdio: stdout carries JSON-RPC only; everything else goes to stderr."""
    runtime = await open_runtime(config)
    try:
        if runtime.tenant is not None:
            demo.banner(runtime.tenant.account, str(runtime.db.path))
        refunded = await runtime.broker.recover_reservations()
        if refunded:
            log.warning("refunded %d reservation(s) left by a process that died", refunded)
        runtime.serve_connect_on_loopback()  # opened by the first connect link, closed after the last
        mcp = build_mcp(runtime, runtime.identity.for_request, "stdio")
        chores = asyncio.create_task(runtime.housekeeping())
        try:
            await mcp.run_stdio_async()
        finally:
            chores.cancel()
    finally:
        await runtime.aclose()


async def serve_remote(config: Config, transport: str, host: str, port: int) -> None:
    """SSE or Streamable HTTP on `host:port` with one shared runtime for every connection."""
    import uvicorn

    from server.web.remote import build_remote_app, remote_settings

    if config.metrics_port == port:
        raise ConfigError(f"TVM_METRICS_PORT must be another port than the server's own ({port})")
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)  # many concurrent clients: see above
    runtime = await open_runtime(config)
    try:
        await runtime.broker.recover_reservations()
        app = build_remote_app(runtime, remote_settings(runtime.config, transport, host, port))
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=config.log_level.lower(),
                server_header=False,
                proxy_headers=False,
            )
        )
        if runtime.tenant is not None:
            demo.banner(runtime.tenant.account, str(runtime.db.path))
            demo.remote_banner(runtime.tenant, f"http://{host}:{port}", transport)
            if app.state.console is not None:  # the demo's console signs in with a one-time link
                app.state.console.signin.announce(f"http://{host}:{port}")
        chores = asyncio.create_task(runtime.housekeeping())
        try:
            await server.serve()
        finally:
            chores.cancel()
    finally:
        await runtime.aclose()


async def serve_console(config: Config, host: str, port: int) -> None:
    """`token-vault-mcp console`: the operator console alone, on loopback, on the configured database."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import RedirectResponse
    from starlette.routing import Mount, Route

    from server.broker import Broker
    from server.store import open_database
    from server.web.console import PREFIX, local_console
    from server.web.remote import HostOriginGuard, RemoteSettings

    db = await open_database(config.database_url or config.database)
    try:
        console = local_console(Broker(db))

        async def home(request: object) -> RedirectResponse:
            return RedirectResponse(PREFIX + "/", status_code=303)

        app = Starlette(routes=[Route("/", home), Mount(PREFIX, app=console.app())])
        own = f"{host}:{port}"
        guarded = HostOriginGuard(app, RemoteSettings("console", host, port, f"http://{own}{PREFIX}",
                                                     frozenset({own}), frozenset({f"http://{own}"})))
        server = uvicorn.Server(uvicorn.Config(guarded, host=host, port=port, log_level=config.log_level.lower(),
                                               server_header=False, proxy_headers=False, lifespan="off"))
        print(f"token-vault-mcp: operator console on http://{own}{PREFIX}/ (database {db.path})",
              file=sys.stderr, flush=True)
        console.signin.announce(f"http://{own}")  # type: ignore[union-attr]
        await server.serve()
    finally:
        await db.close()
