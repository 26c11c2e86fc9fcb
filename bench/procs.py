"""Server processes (the product and its floor) and the SDK clients that talk to them.

Every server is a process of its own, so the measuring client never shares a GIL with it:
stdio servers are children of their client; HTTP and SSE servers are uvicorn processes on
127.0.0.1 ports picked here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

ROOT = Path(__file__).resolve().parents[1]
DEMO_ACCOUNT = "auth0|demo-user"
TIMEOUT = 60.0


class BenchError(Exception):
    """The bench could not do what it set out to (a server did not start, a call failed)."""


def child_env(workdir: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: no Auth0 settings leak in, so the product runs its demo tenant."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "SYSTEMROOT", "TMPDIR")}
    return {**keep, "PYTHONPATH": str(ROOT), **extra}


# A call_api grant as long as allowed: it still ends 30 s before its provider token (SPEC §8; the demo
# Token Vault's last an hour), which outlasts a full run, so "inside a live grant" never opens another.
GRANT_TTL = "86400"


def product_env(workdir: Path, database: Path, market_file: Path, policy_file: Path) -> dict[str, str]:
    return child_env(
        workdir, TVM_DATABASE=str(database), TVM_MARKET_FILE=str(market_file), TVM_POLICY_FILE=str(policy_file),
        TVM_GRANT_TTL=GRANT_TTL,
    )


def product_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "server", *args]


def floor_cmd(answers: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.floor", "--answers", str(answers), *args]


def provider_cmd() -> list[str]:
    return [sys.executable, "-m", "bench.provider"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(workdir: Path, env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    """Run a `token-vault-mcp` command; return its stdout. Raises BenchError when it fails."""
    done = subprocess.run(
        product_cmd(*args), env=env, cwd=workdir, input=stdin, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise BenchError(f"token-vault-mcp {' '.join(args[:2])} exited {done.returncode}: {done.stderr[-500:]}")
    return done.stdout


@dataclass
class Server:
    """One server under test: how to reach it, and its process when it is a network server."""

    label: str  # "product" or "floor"
    transport: str  # stdio, http, sse
    workdir: Path
    cmd: list[str]
    env: dict[str, str]
    url: str | None = None
    token: str | None = None
    process: subprocess.Popen[bytes] | None = None
    errlog: Path | None = None
    _errfile: TextIO | None = field(default=None, repr=False)

    def client(self) -> AbstractAsyncContextManager[Client]:
        """A fresh SDK client session to this server (a new child process over stdio)."""
        if self.transport == "stdio":
            params = StdioServerParameters(command=self.cmd[0], args=self.cmd[1:], env=self.env, cwd=str(self.workdir))
            assert self._errfile is not None
            return Client(stdio_client(params, errlog=self._errfile), read_timeout_seconds=TIMEOUT)
        assert self.url is not None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if self.transport == "http":
            http = create_mcp_http_client(headers=headers)
            return Client(streamable_http_client(self.url, http_client=http), read_timeout_seconds=TIMEOUT)
        return Client(sse_client(self.url, headers=headers, timeout=TIMEOUT), read_timeout_seconds=TIMEOUT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._errfile is not None:
            self._errfile.close()
            self._errfile = None


def start(label: str, transport: str, workdir: Path, cmd: list[str], env: dict[str, str]) -> Server:
    """Prepare a stdio server (its client launches it) or launch a network one and wait until it answers."""
    errlog = workdir / f"{label}-{transport}.stderr"
    errfile = errlog.open("a", encoding="utf-8")
    offset = errlog.stat().st_size  # this start's lines only (a workdir may be reused)
    if transport == "stdio":
        return Server(label, transport, workdir, cmd, env, errlog=errlog, _errfile=errfile)
    port = free_port()
    server = _launch(label, transport, workdir, [*cmd, "--transport", transport, "--port", str(port)], env, port,
                     "/mcp" if transport == "http" else "/sse", errlog, errfile)
    if label == "product":
        try:
            server.token = demo_bearer_token(errlog, offset)
        except BaseException:
            server.stop()
            raise
    return server


def start_provider(workdir: Path) -> Server:
    """Launch the bench's loopback provider API (bench/provider.py); its `url` is the API base."""
    errlog = workdir / "provider.stderr"
    port = free_port()
    return _launch("provider", "http", workdir, [*provider_cmd(), "--port", str(port)], child_env(workdir), port, "",
                   errlog, errlog.open("a", encoding="utf-8"))


def _launch(label: str, transport: str, workdir: Path, full: list[str], env: dict[str, str], port: int, path: str,
            errlog: Path, errfile: TextIO) -> Server:
    process = subprocess.Popen(full, env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=errfile, stderr=errfile)
    server = Server(
        label, transport, workdir, full, env, url=f"http://127.0.0.1:{port}{path}", process=process, errlog=errlog,
        _errfile=errfile,
    )
    try:
        _wait_until_listening(server, port)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_listening(server: Server, port: int, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise BenchError(f"{server.label} ({server.transport}) exited: {_tail(server.errlog)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{server.label} ({server.transport}) did not listen within {limit:.0f} s")


def demo_bearer_token(errlog: Path, offset: int, limit: float = 30.0) -> str:
    """The demo bearer token `serve --transport http|sse` prints on stderr (README: remote demo)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with errlog.open("rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", errors="replace")
        for line in text.splitlines():
            _, found, token = line.partition("Authorization: Bearer ")
            if found and token.strip():
                return token.strip()
        time.sleep(0.05)
    raise BenchError("the product printed no demo bearer token")


def _tail(path: Path | None) -> str:
    if path is None or not path.exists():
        return ""
    return path.read_text(encoding="utf-8", errors="replace")[-800:]


def structured(result: Any, tool: str) -> dict[str, Any]:
    """The structured content of a successful call. Raises BenchError for an error result."""
    if result.is_error or result.structured_content is None:
        text = "".join(getattr(block, "text", "") for block in result.content)
        raise BenchError(f"{tool} failed: {text[:300]}")
    return dict(result.structured_content)
