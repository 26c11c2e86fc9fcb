"""`token-vault-mcp emulator`: the demo tenant on a loopback port, under uvicorn."""

from __future__ import annotations

import ipaddress
import shlex
import socket
import sys
from typing import TextIO

import uvicorn

from server.emulator.app import create_app
from server.emulator.demo import DemoTenant, demo_tenant


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve a demo tenant at `http://{host}:{port}/` until interrupted (blocking).

    Port 0 picks a free port; the settings printed to stderr carry the real one.
    Raises ValueError for a host that is not loopback: the emulator hands out tokens to anyone.
    """
    if not is_loopback(host):
        raise ValueError(f"the emulator serves loopback only; {host!r} is not a loopback address")
    # Listen before printing: the issuer names the port actually bound (port 0 included), and a
    # client that acts on the printed settings at once queues instead of being refused.
    bare_host = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bare_host, port))
    sock.listen(128)
    bound_port = sock.getsockname()[1]
    url_host = f"[{bare_host}]" if ":" in bare_host else bare_host
    demo = demo_tenant(f"http://{url_host}:{bound_port}/")
    print_settings(demo, sys.stderr)
    config = uvicorn.Config(create_app(demo.state), host=bare_host, port=bound_port, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


def print_settings(demo: DemoTenant, out: TextIO) -> None:
    """Write the tenant's settings as `export NAME=value` lines a shell accepts as pasted."""
    settings = {
        "AUTH0_DOMAIN": demo.domain,
        "AUTH0_AUDIENCE": demo.audience,
        "AUTH0_CLIENT_ID": demo.client_id,
        "AUTH0_CLIENT_SECRET": demo.client_secret,
        "TVM_REFRESH_TOKEN": demo.refresh_token,
    }
    out.write(f"# Auth0 emulator (demo tenant, not a real Auth0) at {demo.issuer}\n")
    out.write(f"# demo account {demo.account}; device-flow login client {demo.login_client_id}\n")
    for name, value in settings.items():
        out.write(f"export {name}={shlex.quote(value)}\n")
    out.flush()


def is_loopback(host: str) -> bool:
    """Whether `host` is `localhost` or a loopback IP address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
