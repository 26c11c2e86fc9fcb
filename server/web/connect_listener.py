"""The connect pages on loopback, opened on demand (stdio server, `token-vault-mcp connect`; SPEC §10).

A stdio server has no HTTP port of its own. The first connect link it makes opens a listener on 127.0.0.1
(the port of TVM_PUBLIC_URL when that is a loopback URL, so it can be registered at Auth0; else any free
port); it stays open while a link it made is live and closes once every one has ended or expired.
uvicorn logs nothing to stdout here (stdout carries JSON-RPC). The `Host` and `Origin` checks of the remote
server apply (server/web/guard.py: loopback, or the public URL's name): a page on another site that a
rebinding DNS points at 127.0.0.1 gets 421. In demo mode the demo tenant's pages are served here too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from datetime import datetime
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from server.clock import Clock
from server.config import is_loopback_host
from server.models import ConnectLink
from server.web.connect import ConnectSite, connect_routes
from server.web.guard import HostOriginGuard

log = logging.getLogger(__name__)


class LoopbackListener:
    """Serves `site` on 127.0.0.1 while flows are live. `ensure()` is the flows' public URL."""

    def __init__(
        self, site: ConnectSite, clock: Clock, public_url: str | None = None, *,
        routes: Sequence[BaseRoute] = (), on_open: Callable[[str], None] | None = None,
    ) -> None:
        self.site = site
        self.clock = clock
        self.fixed = public_url  # a loopback TVM_PUBLIC_URL: listen on its port, name it in links
        self.routes = list(routes)  # served beside the flow's pages (the demo tenant's, in demo mode)
        self.on_open = on_open  # told the listener's URL each time it opens (the demo names its pages there)
        hosts, origins = set(), set()
        if public_url is not None:  # Host and Origin: loopback, and the public URL's when it is another name
            parts = urlsplit(public_url)
            hosts.add(parts.netloc.lower())
            origins.add(f"{parts.scheme}://{parts.netloc}".lower())
        self.allowed_hosts, self.allowed_origins = frozenset(hosts), frozenset(origins)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._url: str | None = None
        self._live: dict[str, datetime] = {}  # link id → expiry
        self._lock = asyncio.Lock()
        self._closer: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str | None:
        return self._url

    async def ensure(self) -> str:
        """The listener's URL, opening it first if it is closed."""
        async with self._lock:
            if self._server is None:
                await self._open()
            assert self._url is not None
            return self._url

    def hold(self, link: ConnectLink) -> None:
        """Stay open for `link` until it ends or expires."""
        self._live[link.id] = link.expires_at
        self._schedule()

    def release(self, link: ConnectLink) -> None:
        """`link` ended; close if nothing else is live."""
        self._live.pop(link.id, None)
        self._schedule()

    async def aclose(self) -> None:
        if self._closer is not None:
            self._closer.cancel()
        async with self._lock:
            await self._close()

    async def _open(self) -> None:
        host, port = "127.0.0.1", 0
        if self.fixed is not None:
            parts = urlsplit(self.fixed)
            if parts.hostname and is_loopback_host(parts.hostname):
                port = parts.port or 80
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        app = HostOriginGuard(Starlette(routes=[*connect_routes(self.site), *self.routes]), self)
        server = uvicorn.Server(uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", server_header=False, log_level="warning",
        ))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                sock.close()
                task.result()  # raises why it could not start
            await asyncio.sleep(0.01)
        self._server, self._task, self._sock = server, task, sock
        bound = sock.getsockname()[1]
        self._url = self.fixed if self.fixed is not None and port else f"http://127.0.0.1:{bound}"
        if self.on_open is not None:
            self.on_open(self._url)
        log.info("connect pages open at %s", self._url)

    async def _close(self) -> None:
        server, task, sock = self._server, self._task, self._sock
        self._server = self._task = self._sock = None
        self._url = None
        if server is None or task is None:
            return
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        if sock is not None:
            sock.close()
        log.info("connect pages closed")

    def _schedule(self) -> None:
        """Close when no link is live: now if none is, else look again when the next one expires."""
        if self._closer is not None and not self._closer.done():
            self._closer.cancel()
        self._closer = asyncio.get_running_loop().create_task(self._close_when_idle())

    async def _close_when_idle(self) -> None:
        while True:
            now = self.clock.now()
            self._live = {k: v for k, v in self._live.items() if v > now}
            if not self._live:
                async with self._lock:
                    if not self._live:
                        await self._close()
                return
            await asyncio.sleep(min(60.0, (min(self._live.values()) - now).total_seconds()))
