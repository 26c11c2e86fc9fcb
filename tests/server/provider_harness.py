"""A real provider API on an ephemeral 127.0.0.1 port, with misbehaviours chosen by path.

    /echo/…             200 JSON of what it saw (method, path, query, body, the bearer token)
    /token-in-header    echoes the bearer token in `x-echo`, `link` and `etag` headers
    /token-in-body      echoes the bearer token in a text body
    /big?n=N            N bytes of text; `&token=1` puts the token across the byte at N/2
    /binary             bytes 0..255
    /gzip               a gzip-encoded text body carrying the token
    /redirect?to=URL    302 to URL
    /hang               never answers
    /unauthorized-once  401 for the first token it sees, 200 for any other
    /status/N           answers status N with a JSON body
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from server.web.loopback import port_of, serving, tcp_socket


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    @property
    def token(self) -> str | None:
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" else None


@dataclass
class Provider:
    base_url: str
    seen: list[Seen] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)

    @property
    def tokens(self) -> list[str | None]:
        return [s.token for s in self.seen]


def _app(provider: Provider) -> Starlette:
    async def handle(request: Request) -> Response:
        body = await request.body()
        seen = Seen(request.method, request.url.path, request.url.query, dict(request.headers), body)
        provider.seen.append(seen)
        token = seen.token or ""
        path = request.url.path
        if path.startswith("/echo"):
            return JSONResponse(
                {"method": seen.method, "path": path, "query": seen.query, "body": body.decode(errors="replace"),
                 "content_type": seen.headers.get("content-type")},
                headers={"x-ratelimit-remaining": "42", "x-internal-secret": "hidden", "etag": '"v1"'},
            )
        if path == "/token-in-header":
            return PlainTextResponse(
                "ok", headers={"x-echo": token, "link": f"<https://p.example/?t={token}>", "etag": token}
            )
        if path == "/token-in-body":
            return PlainTextResponse(f"you sent {token} and again {token}.")
        if path == "/big":
            n = int(request.query_params["n"])
            if request.query_params.get("token"):
                half = max(0, n // 2 - len(token) // 2)
                return PlainTextResponse("a" * half + token + "b" * (n - half - len(token)))
            return PlainTextResponse("a" * n)
        if path == "/binary":
            return Response(bytes(range(256)), media_type="application/octet-stream")
        if path == "/gzip":
            packed = gzip.compress(f"zipped {token}".encode())
            return Response(packed, media_type="text/plain", headers={"content-encoding": "gzip"})
        if path == "/redirect":
            return RedirectResponse(request.query_params["to"], status_code=302)
        if path == "/hang":
            await asyncio.sleep(3600)
        if path == "/unauthorized-once":
            if not provider.refused:
                provider.refused.add(token)
            if token in provider.refused:
                return JSONResponse({"message": "Bad credentials"}, status_code=401)
            return JSONResponse({"ok": True})
        if path.startswith("/status/"):
            return JSONResponse({"status": int(path.rsplit("/", 1)[1])}, status_code=int(path.rsplit("/", 1)[1]))
        return JSONResponse({"message": "Not Found"}, status_code=404)

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", handle, methods=methods)])


@asynccontextmanager
async def provider_api() -> AsyncIterator[Provider]:
    """Serve a Provider on 127.0.0.1 until the block ends."""
    sock = tcp_socket()
    provider = Provider(f"http://127.0.0.1:{port_of(sock)}")
    # force_exit: a /hang request never finishes on its own
    async with serving(_app(provider), sock, lifespan="off", force_exit=True):
        yield provider


def body_json(text: str) -> dict[str, object]:
    value = json.loads(text)
    assert isinstance(value, dict)
    return value
