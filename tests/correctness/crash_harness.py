"""Processes for the crash test: an emulated tenant with latency, and `serve --transport http` against it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

# Runs in its own process: a demo tenant with slow answers, so token requests are in flight when we kill.
EMULATOR_SCRIPT = """
import json, socket, sys, uvicorn
from server.emulator import create_app, demo_tenant
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY from asyncio
sock.bind(("127.0.0.1", 0)); port = sock.getsockname()[1]
tenant = demo_tenant(f"http://127.0.0.1:{port}/")
tenant.state.faults.latency = float(sys.argv[1])
tenant.state.ciba_mode = sys.argv[2]
tenant.state.ciba_interval = 1
print(json.dumps({"port": port, "client_id": tenant.client_id, "client_secret": tenant.client_secret,
                  "audience": tenant.audience, "account": tenant.account}), flush=True)
server = uvicorn.Server(uvicorn.Config(create_app(tenant.state), log_level="warning"))
server.run(sockets=[sock])
"""

MARKET = """
[[listing]]
id = "gh-read"
title = "GitHub read"
connection = "github"
scopes = ["repo:read"]
supply = 100000
start_price = 1
floor_price = 1
opens_at = 2026-01-01T00:00:00Z
closes_at = 2030-01-01T00:00:00Z
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH")
    return {k: v for k, v in os.environ.items() if k in keep} | {"PYTHONUNBUFFERED": "1"}


class Tenant:
    def __init__(self, latency: float, ciba: str = "approve") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", EMULATOR_SCRIPT, str(latency), ciba], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=base_env(),  # the kills make it log dropped clients
        )
        assert self.proc.stdout is not None
        self.info: dict[str, Any] = json.loads(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.info['port']}"

    def env(self, database: Path, market: Path) -> dict[str, str]:
        return base_env() | {
            "AUTH0_DOMAIN": self.url,
            "AUTH0_CLIENT_ID": self.info["client_id"],
            "AUTH0_CLIENT_SECRET": self.info["client_secret"],
            "AUTH0_AUDIENCE": self.info["audience"],
            "TVM_DATABASE": str(database),
            "TVM_MARKET_FILE": str(market),
        }

    def bearer(self, agent: str) -> str:
        answer = httpx.post(
            self.url + "/emulator/tokens",
            json={"sub": self.info["account"], "azp": agent,
                  "scopes": ["read:market", "read:balance", "buy:quota", "request:token"]},
            timeout=10,
        )
        answer.raise_for_status()
        return str(answer.json()["access_token"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Serve:
    """`token-vault-mcp serve --transport http` as a real process."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--transport", "http", "--port", str(self.port)],
            env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve did not start: " + (self.proc.stderr.read() or b"").decode())
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no cleanup of any kind
        self.proc.wait()


class RawSession:
    """A minimal Streamable HTTP client that fails fast when the server dies."""

    def __init__(self, http: httpx.AsyncClient, url: str, bearer: str) -> None:
        self.http = http
        self.url = url + "/mcp"
        self.headers = {"Authorization": f"Bearer {bearer}", "Accept": "application/json, text/event-stream"}
        self.ids = 0

    async def start(self) -> None:
        first = await self._post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "crash", "version": "0"}}})
        session = first.headers.get("mcp-session-id")
        if session:
            self.headers["mcp-session-id"] = session
        await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        self.ids += 1
        answer = await self._post({"jsonrpc": "2.0", "id": self.ids, "method": "tools/call",
                                   "params": {"name": tool, "arguments": arguments}})
        return _message(answer.text)["result"]

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        answer = await self.http.post(self.url, json=body, headers=self.headers)
        answer.raise_for_status()
        return answer


def _message(text: str) -> dict[str, Any]:
    if text.lstrip().startswith("{"):
        return dict(json.loads(text))
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    for chunk in data:
        if chunk:
            message = json.loads(chunk)
            if "result" in message or "error" in message:
                return dict(message)
    raise ValueError("no JSON-RPC answer in the stream")


def write_market(path: Path, extra: str = "") -> Path:
    path.write_text(MARKET + extra, encoding="utf-8")
    return path
