"""An ASGI app served by uvicorn on a loopback socket for the length of a block.

Used where the broker serves pages on a port it picks itself (the console screenshots) and by the tests and
benchmarks that put a real HTTP server on 127.0.0.1 in front of an app.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import uvicorn


def tcp_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound to `host:port` (0: any free port), for `serving`.

    IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP, and
    with Nagle on every small answer waits ~40 ms for the client's delayed ACK.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


@asynccontextmanager
async def serving(
    app: Any, sock: socket.socket, *, lifespan: Literal["on", "off", "auto"] = "on", force_exit: bool = False
) -> AsyncIterator[uvicorn.Server]:
    """`app` on uvicorn over `sock` (logging only warnings, to stderr) until the block ends; the socket is
    closed afterwards. `force_exit` ends requests still open at the end (a test's endless answers).
    Raises what the server raised if it could not start."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped before it started")
            await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        server.force_exit = server.force_exit or force_exit
        try:
            await task
        finally:
            sock.close()
