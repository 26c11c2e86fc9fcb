"""The bench's provider API: a loopback HTTP/1.1 server both sides of `call_api` send their request to.

`GET` (or `HEAD`) of any path under `/repos/` answers one fixed small JSON body, with a few headers the
product passes on to the agent (content type and length, etag, rate limits) and one it keeps back.
Any bearer token is accepted; a request without one is answered 401, so a side that sent none would
show as a 401 in its results. Plain asyncio (no framework) so that the provider costs both sides as
little as it can; connections are kept alive, requests on one connection are answered in order.

    python -m bench.provider --port N
"""

from __future__ import annotations

import argparse
import asyncio
import json

REPO = {
    "id": 1296269,
    "full_name": "acme/widgets",
    "private": False,
    "description": "Widgets, for the bench",
    "default_branch": "main",
    "open_issues_count": 7,
    "stargazers_count": 42,
}
BODY = json.dumps(REPO, separators=(",", ":")).encode()
_MAX_HEAD = 64 * 1024


def _answer(status: str, body: bytes, *, head_only: bool, close: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {status}",
        "content-type: application/json; charset=utf-8",
        f"content-length: {len(body)}",
        'etag: W/"bench-1"',
        "x-ratelimit-limit: 5000",
        "x-ratelimit-remaining: 4999",
        "x-bench-request-id: not-passed-on",  # not in the product's header subset: dropped by both sides
        *(["connection: close"] if close else []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


_OK = _answer("200 OK", BODY, head_only=False, close=False)
_OK_HEAD = _answer("200 OK", BODY, head_only=True, close=False)
_UNAUTHORIZED = _answer("401 Unauthorized", b'{"message":"Requires authentication"}', head_only=False, close=False)
_NOT_FOUND = _answer("404 Not Found", b'{"message":"Not Found"}', head_only=False, close=False)
_BAD = _answer("400 Bad Request", b'{"message":"Bad Request"}', head_only=False, close=True)


def respond(method: str, target: str, headers: dict[str, str]) -> bytes:
    """The bytes answering one request (its method, request target and lower-cased headers)."""
    if not headers.get("authorization", "").lower().startswith("bearer "):
        return _UNAUTHORIZED
    if method in ("GET", "HEAD") and target.startswith("/repos/"):
        return _OK if method == "GET" else _OK_HEAD
    return _NOT_FOUND


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while self.buffer:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    self._fail()
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = headers.get("content-length", "0")
            if len(parts) != 3 or "transfer-encoding" in headers or not length.isdigit():
                self._fail()  # chunked bodies are not needed here: neither side sends a body
                return
            total = end + 4 + int(length)
            if len(self.buffer) < total:
                return
            del self.buffer[:total]
            self.transport.write(respond(parts[0], parts[1], headers))
            if headers.get("connection", "").lower() == "close":
                self.transport.close()
                return

    def _fail(self) -> None:
        assert self.transport is not None
        self.transport.write(_BAD)
        self.transport.close()
        self.buffer.clear()


async def serve(port: int, host: str = "127.0.0.1") -> None:
    server = await asyncio.get_running_loop().create_server(_Connection, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.provider")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
