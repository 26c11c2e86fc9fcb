"""`token-vault-mcp emulator`: the demo tenant on a loopback port, under uvicorn."""

from __future__ import annotations

import ipaddress
import shlex
import socket
import sys
from collections.abc import Sequence
from typing import TextIO

from server.emulator.app import create_app
from server.emulator.demo import DemoTenant, demo_tenant
from server.emulator.faults import FaultSettings
from server.emulator.state import CibaMode


def serve(
    port: int,
    host: str = "127.0.0.1",
    *,
    faults: FaultSettings | None = None,
    revoke: Sequence[str] = (),
    auto_approve: bool = False,
    device_interval: int | None = None,
    ciba: CibaMode = "approve",
    auto_login: str | None = None,
) -> None:
    """Serve a demo tenant at `http://{host}:{port}/` until interrupted (blocking).

    Port 0 picks a free port; the settings printed to stderr carry the real one. `faults`
    sets fault rates and latency from the start, `revoke` makes the demo user's connected
    accounts at those connections stale, `auto_approve` approves device logins at once as
    the demo user, `device_interval` sets the device flow's polling interval in seconds, `ciba`
    how the demo user answers CIBA approval requests (`manual`: through `/emulator/approvals`),
    `auto_login` the user `/authorize` signs in without a sign-in page.
    Raises ValueError for a host that is not loopback (the emulator hands out tokens to
    anyone), an unknown connection, CIBA mode or auto-login user, or fault rates adding up to more than 1.
    """
    if not is_loopback(host):
        raise ValueError(f"the emulator serves loopback only; {host!r} is not a loopback address")
    # Listen before printing: the issuer names the port actually bound (port 0 included), and a
    # client that acts on the printed settings at once queues instead of being refused.
    bare_host = host.strip("[]")
    sock = listening_socket(bare_host, port)
    bound_port = sock.getsockname()[1]
    url_host = f"[{bare_host}]" if ":" in bare_host else bare_host
    try:
        demo = demo_tenant(f"http://{url_host}:{bound_port}/", auto_login=auto_login)
        configure(
            demo, faults=faults, revoke=revoke, auto_approve=auto_approve, device_interval=device_interval, ciba=ciba
        )
    except ValueError:
        sock.close()
        raise
    if faults is not None or revoke:
        print(f"# injecting faults: {describe(demo)}", file=sys.stderr, flush=True)
    if auto_login is not None:
        print(f"# /authorize signs in {auto_login} at once (no sign-in page)", file=sys.stderr, flush=True)
    if ciba != "approve":
        where = "; decide with POST /emulator/approvals/{auth_req_id}" if ciba == "manual" else ""
        print(f"# CIBA approval requests: {ciba}{where}", file=sys.stderr, flush=True)
    print_settings(demo, sys.stderr)
    import uvicorn  # only the standalone emulator needs it (not the in-process demo tenant)

    # A hanging fault holds its request until the client leaves; do not let it hold shutdown too.
    config = uvicorn.Config(
        create_app(demo.state), host=bare_host, port=bound_port, log_level="warning", timeout_graceful_shutdown=2
    )
    uvicorn.Server(config).run(sockets=[sock])


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on `host:port` (0: any free port), for uvicorn to serve on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP, and
    # with Nagle on, every answer waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def configure(
    demo: DemoTenant,
    *,
    faults: FaultSettings | None = None,
    revoke: Sequence[str] = (),
    auto_approve: bool = False,
    device_interval: int | None = None,
    ciba: CibaMode = "approve",
) -> None:
    """Apply the `serve` switches to a demo tenant. Raises ValueError (see `serve`)."""
    if ciba not in ("approve", "deny", "manual"):
        raise ValueError(f"--ciba must be approve, deny or manual, not {ciba!r}")
    if faults is not None:
        demo.state.faults.configure(faults)
    for connection in revoke:
        demo.state.revoke_connection(demo.account, connection)
    if auto_approve:
        demo.state.auto_approve_sub = demo.account
    if device_interval is not None:
        demo.state.device_interval = device_interval
    demo.state.ciba_mode = ciba


def describe(demo: DemoTenant) -> str:
    """The active fault switches, one line."""
    current = demo.state.faults.settings()
    parts = [
        f"{name}={value}"
        for name, value in current.model_dump(exclude_none=True).items()
        if (name == "latency" or name.endswith("_rate")) and value
    ]
    if current.fail_rate:
        parts.append(f"fail_status={current.fail_status}")
    if current.rate_limit_rate:
        parts.append(f"retry_after={current.retry_after} reset_in={current.reset_in}")
    revoked = [c for c, a in demo.state.accounts.get(demo.account, {}).items() if a.revoked]
    if revoked:
        parts.append("revoked=" + ",".join(revoked))
    return " ".join(parts) or "none"


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
    out.write(
        f"# provider API for call_api at {demo.issuer}provider/CONNECTION/...: a market listing with\n"
        f'#   delivery = "proxy" and api = ["{demo.issuer}provider/github"] calls it with Token Vault tokens\n'
    )
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
