"""A loopback reverse proxy that adds `Authorization: Bearer …` and forwards everything else as it came.

The MCP conformance CLI cannot send an Authorization header, and the remote server wants a
verified Auth0 token on every MCP request. This proxy sits between them the way an operator's
would: same method, path, query, body and headers (`Host` included, so the server's Host and
Origin checks see what the client sent), responses streamed back chunk by chunk (SSE), and an
upstream stream closed as soon as the client goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import socket
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any

import httpx
import uvicorn
from starlette.types import Message, Receive, Scope, Send

# RFC 9110 §7.6.1: these describe one hop, not the message; the next hop sets its own.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)


class BearerProxy:
    """ASGI app forwarding every HTTP request to `upstream` with the bearer `token` added."""

    def __init__(self, upstream: str, token: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.authorization = f"Bearer {token}".encode()
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # No timeout: an SSE stream may stay quiet for as long as the client keeps it.
                self.client = httpx.AsyncClient(timeout=None, follow_redirects=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.client is not None, "lifespan startup has not run"
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = [
            (name, value)
            for name, value in scope["headers"]
            if name.lower() not in HOP_BY_HOP and name.lower() != b"authorization"
        ]
        headers.append((b"authorization", self.authorization))
        target = self.upstream + scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            target += "?" + scope["query_string"].decode("latin-1")
        request = self.client.build_request(scope["method"], target, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            text = f"proxy: upstream unreachable: {exc!r}".encode()
            await send({"type": "http.response.start", "status": 502, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": text})
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP],
                }
            )
            await _until_first(_pump(response, send), _disconnected(receive))
        finally:
            await response.aclose()


async def _pump(response: httpx.Response, send: Send) -> None:
    """The upstream body, byte for byte (still encoded), as it arrives."""
    with suppress(OSError):  # the client left mid-stream
        async for chunk in response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive: Receive) -> None:
    message: Message = {"type": ""}
    while message["type"] != "http.disconnect":
        message = await receive()


async def _until_first(*jobs: Coroutine[Any, Any, None]) -> None:
    """Run `jobs` until the first ends (its error raised), then cancel the others."""
    tasks = [asyncio.create_task(job) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@asynccontextmanager
async def bearer_proxy(upstream: str, token: str, port: int = 0, deadline: float = 20.0) -> AsyncIterator[int]:
    """Serve a `BearerProxy` to `upstream` on loopback `port` (0: a free one; yielded) until the block ends.

    It listens on 127.0.0.1 and, where the host has IPv6, on [::1] at the same port: clients are
    pointed at `localhost`, which resolves to either first depending on the machine.
    """
    sockets = loopback_sockets(port)
    server = uvicorn.Server(
        uvicorn.Config(
            BearerProxy(upstream, token),
            log_level="warning",
            lifespan="on",
            server_header=False,  # the upstream's headers, not the proxy's
            date_header=False,
            timeout_graceful_shutdown=2,
        )
    )
    task = asyncio.create_task(server.serve(sockets=sockets))
    try:
        until = time.monotonic() + deadline
        while not server.started:
            if task.done():
                task.result()
                raise AssertionError("the bearer proxy stopped while starting")
            assert time.monotonic() < until, f"the bearer proxy did not start within {deadline} s"
            await asyncio.sleep(0.01)
        yield int(sockets[0].getsockname()[1])
    finally:
        server.should_exit = True
        await task
        for sock in sockets:
            sock.close()


def loopback_sockets(port: int = 0, attempts: int = 20) -> list[socket.socket]:
    """Bound sockets on 127.0.0.1 and (if it exists) [::1], both on `port` (0: one free on both)."""
    for _ in range(attempts):
        v4 = _bound(socket.AF_INET, ("127.0.0.1", port))
        bound = v4.getsockname()[1]
        try:
            v6 = _bound(socket.AF_INET6, ("::1", bound))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and not port:  # someone else's on [::1]: try another port
                v4.close()
                continue
            return [v4]  # no IPv6 loopback here
        return [v4, v6]
    raise OSError(f"no port free on both 127.0.0.1 and [::1] after {attempts} attempts")


def _bound(family: socket.AddressFamily, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def main() -> None:
    """`python -m tests.server.conformance_proxy UPSTREAM TOKEN [--port N]`, for running the suite by hand."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("upstream", help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("token", help="the access token to add (an emulator's, for tests)")
    parser.add_argument("--port", type=int, default=0, help="loopback port to listen on (default: a free one)")
    args = parser.parse_args()

    async def run() -> None:
        async with bearer_proxy(args.upstream, args.token, args.port) as port:
            print(f"proxy to {args.upstream} at http://localhost:{port}/mcp", file=sys.stderr, flush=True)
            await asyncio.Event().wait()

    with suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
