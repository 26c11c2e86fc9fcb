"""Demo mode only: the demo tenant's browser pages on the broker's own origin, under `/demo-tenant/…`.

The in-process demo tenant's issuer is a name no browser can reach (the broker talks to it through
httpx.ASGITransport), so a person following a connect link would be sent nowhere. In demo mode the
broker's web listener (the remote app; the stdio and CLI loopback listener) mounts the tenant's sign-in
and provider-consent pages (the emulator's `create_browser_app`, only those pages) at PREFIX, and the two
addresses handed to the browser — the authorize URL (`Auth0Client.browser_url`) and the My Account
`connect_uri` (`EmulatorState.browser_url`) — name that place. The back channel (code exchange, My Account
API, Token Vault) still goes in process, and with a real tenant none of this is mounted or set.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.routing import Mount

from server.auth0.client import Auth0Client
from server.config import is_loopback_host
from server.emulator import DemoTenant, create_browser_app

PREFIX = "/demo-tenant"
CALLBACK_PATHS = ("/connect/callback", "/connect/complete")  # where the tenant sends the browser back


def demo_pages(tenant: DemoTenant) -> Mount:
    """The tenant's sign-in (`/authorize`, `/authorize/login`) and consent (`/connect`) pages, under PREFIX."""
    return Mount(PREFIX, app=create_browser_app(tenant.state))


def serve_demo_pages_at(tenant: DemoTenant, auth0: Auth0Client, origin: str) -> None:
    """Browsers reach the tenant's pages at `origin` + PREFIX from now on (the listener serving them is there).

    The demo's clients take loopback callbacks on any port already; a public URL elsewhere is allowed too.
    """
    base = origin.rstrip("/") + PREFIX
    auth0.browser_url = base
    tenant.state.browser_url = base + "/"
    if is_loopback_host(urlsplit(origin).hostname or ""):
        return
    for client_id in (tenant.client_id, tenant.login_client_id):
        for path in CALLBACK_PATHS:
            tenant.state.add_callback(client_id, origin.rstrip("/") + path)
