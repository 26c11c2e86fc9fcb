"""`token-vault-mcp console` and the demo's `serve --transport http` print a one-time console link on
stderr (never stdout) that signs a browser in once; the local console listens on loopback only."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.server.test_cli import environment, run

LINK = re.compile(r"(http://127\.0\.0\.1:\d+/console/signin\?token=[A-Za-z0-9_-]+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(tmp_path: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start `python -m server ARGS`; yield the first console link it printed on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "server", *args], cwd=tmp_path, env=environment(tmp_path, {}),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        printed, deadline = "", time.monotonic() + 30
        while not LINK.search(printed):
            line = proc.stderr.readline().decode()
            assert line or proc.poll() is None, f"exited early: {printed}"
            printed += line
            assert time.monotonic() < deadline, printed
        yield LINK.search(printed).group(1), proc  # type: ignore[union-attr]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
        assert b"/console/signin" not in out  # the link is on stderr only


def sign_in_once(link: str) -> None:
    base = link.split("/console/", 1)[0]
    deadline = time.monotonic() + 20
    while True:  # the link is printed as the server starts listening
        try:
            first = httpx.get(link)
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert first.status_code == 200 and "tvm_console" in first.cookies
    cookie = first.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "max-age=" in cookie and "path=/console" in cookie
    page = httpx.get(base + "/console/market", cookies=first.cookies)
    assert page.status_code == 200 and "github-repo-read" in page.text
    assert httpx.get(link).status_code == 401  # one visit only


def test_the_local_console_prints_a_one_time_link_that_signs_in_once(tmp_path: Path) -> None:
    assert run(tmp_path, "wallet", "credit", "auth0|alice", "5").code == 0  # the database exists
    assert run(tmp_path, "market", "load", str(_market(tmp_path))).code == 0
    with running(tmp_path, "console", "--port", str(free_port())) as (link, _):
        sign_in_once(link)


def test_the_demo_http_server_serves_the_console_and_prints_its_link(tmp_path: Path) -> None:
    with running(tmp_path, "serve", "--transport", "http", "--port", str(free_port())) as (link, _):
        sign_in_once(link)


def test_the_local_console_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    done = run(tmp_path, "console", "--host", "0.0.0.0")
    assert done.code == 2 and "loopback only" in done.err


def _market(tmp_path: Path) -> Path:
    path = tmp_path / "market.toml"
    path.write_text(
        '[[listing]]\nid = "github-repo-read"\ntitle = "GitHub: read"\nconnection = "github"\n'
        'scopes = ["repo:read"]\nsupply = 10\nstart_price = 10\nfloor_price = 1\n'
        "opens_at = 2026-01-01T00:00:00Z\ncloses_at = 2030-01-01T00:00:00Z\n",
        encoding="utf-8",
    )
    return path
