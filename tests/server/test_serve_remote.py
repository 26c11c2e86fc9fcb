"""`token-vault-mcp serve --transport http|sse` as a real process: demo bearer token, loopback only."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.conftest import held, ok
from tests.server.test_serve_stdio import server_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("transport", ["http", "sse"])
async def test_demo_server_serves_the_tools_to_a_bearer_from_its_banner(tmp_path: Path, transport: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--transport", transport, "--port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server_env(tmp_path),
        cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        token = None
        seen = []
        while token is None:
            line = proc.stderr.readline().decode()
            assert line, "server exited: " + "".join(seen)
            seen.append(line)
            match = re.search(r"Authorization: Bearer (\S+)", line)
            token = match.group(1) if match else None
        url = f"http://127.0.0.1:{port}" + ("/mcp" if transport == "http" else "/sse")
        headers = {"Authorization": f"Bearer {token}"}
        connect = (
            streamable_http_client(url, http_client=create_mcp_http_client(headers=headers))
            if transport == "http"
            else sse_client(url, headers=headers)
        )
        async with held(Client(connect)) as client:
            wallet = await ok(client, "check_balance", {})
            assert wallet["account"] == "auth0|demo-user"
            assert (await ok(client, "list_market", {"limit": 1}))["listings"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.stdout is not None and proc.stdout.read() == b""


def test_demo_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--transport", "http", "--host", "0.0.0.0"],
        capture_output=True, env=server_env(tmp_path), cwd=tmp_path, timeout=60,
    )
    assert done.returncode == 2
    assert b"loopback" in done.stderr
