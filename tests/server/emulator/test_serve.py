"""`serve`: loopback only, settings on stderr, a real server a broker can reach."""

from __future__ import annotations

import asyncio
import io
import sys

import httpx
import pytest

from server.emulator import demo_tenant, serve
from server.emulator.serve import is_loopback, print_settings
from tests.server.emulator.helpers import parse_exports

SETTINGS = {"AUTH0_DOMAIN", "AUTH0_AUDIENCE", "AUTH0_CLIENT_ID", "AUTH0_CLIENT_SECRET", "TVM_REFRESH_TOKEN"}


def test_loopback_hosts_are_recognised() -> None:
    assert all(is_loopback(host) for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"))


def test_serve_refuses_a_non_loopback_host() -> None:
    with pytest.raises(ValueError, match="loopback"):
        serve(8123, host="0.0.0.0")


def test_settings_are_pasteable_export_lines() -> None:
    demo = demo_tenant("http://127.0.0.1:8123/")
    out = io.StringIO()

    print_settings(demo, out)

    assert parse_exports(out.getvalue()) == {
        "AUTH0_DOMAIN": "http://127.0.0.1:8123",
        "AUTH0_AUDIENCE": demo.audience,
        "AUTH0_CLIENT_ID": demo.client_id,
        "AUTH0_CLIENT_SECRET": demo.client_secret,
        "TVM_REFRESH_TOKEN": demo.refresh_token,
    }


async def test_served_emulator_answers_on_loopback_with_the_printed_settings() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from server.emulator import serve; serve(0)", stderr=asyncio.subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        printed = ""
        while not SETTINGS <= set(parse_exports(printed)):
            line = await asyncio.wait_for(process.stderr.readline(), timeout=15)
            assert line, f"emulator exited early: {printed}"
            printed += line.decode()
        env = parse_exports(printed)

        async with httpx.AsyncClient(base_url=env["AUTH0_DOMAIN"], timeout=5) as http:
            discovery = (await http.get("/.well-known/openid-configuration")).json()
            token = await http.post(
                "/oauth/token",
                data={"grant_type": "refresh_token", "refresh_token": env["TVM_REFRESH_TOKEN"]},
                auth=(env["AUTH0_CLIENT_ID"], env["AUTH0_CLIENT_SECRET"]),
            )
    finally:
        process.terminate()
        await process.wait()

    assert discovery["issuer"] == env["AUTH0_DOMAIN"] + "/"
    assert token.status_code == 200
    assert token.json()["scope"] == "read:market read:balance buy:quota request:token call:api"


async def test_the_served_socket_turns_nagle_off_so_answers_do_not_wait_for_delayed_acks() -> None:
    import socket as sockets

    from server.emulator.serve import listening_socket

    sock = listening_socket("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket")
        accepted.set_result(raw.getsockopt(sockets.IPPROTO_TCP, sockets.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(connected, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_serve_refuses_an_unknown_auto_login_user() -> None:
    with pytest.raises(ValueError, match="auto-login"):
        serve(0, auto_login="auth0|nobody")
