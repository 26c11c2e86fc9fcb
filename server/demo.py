"""Demo mode (no AUTH0_DOMAIN): the embedded emulator plays the tenant; a demo market and wallet exist."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import httpx

from server.emulator import DemoTenant, create_app, demo_tenant
from server.emulator.demo import DEMO_SCOPES
from server.emulator.keys import signing_key_in_background
from server.market import ListingSpec, parse_listings

DEMO_ISSUER = "https://demo-tenant.token-vault-mcp.invalid/"
DEMO_FUNDS = 10_000
DEMO_FUNDED_KEY = "demo_funded"

_WINDOW = {"opens_at": datetime(2026, 1, 1, tzinfo=UTC), "closes_at": datetime(2030, 1, 1, tzinfo=UTC)}
DEMO_LISTINGS: list[dict[str, Any]] = [
    {"id": "github-repo-read", "title": "GitHub: read repositories", "connection": "github",
     "scopes": ["repo:read"], "supply": 1000, "start_price": 20, "floor_price": 5, **_WINDOW},
    {"id": "github-repo-write", "title": "GitHub: read and write repositories", "connection": "github",
     "scopes": ["repo:read", "repo:write"], "supply": 200, "start_price": 80, "floor_price": 20, **_WINDOW},
    {"id": "stripe-read-only", "title": "Stripe: read-only API access", "connection": "stripe",
     "scopes": ["read_only"], "supply": 500, "start_price": 40, "floor_price": 10, **_WINDOW},
    {"id": "google-calendar-read", "title": "Google: read calendars", "connection": "google-oauth2",
     "scopes": ["https://www.googleapis.com/auth/calendar.readonly"], "supply": 500, "start_price": 30,
     "floor_price": 8, **_WINDOW},
    # the demo user has not connected Slack: buying works, the token needs the connect flow first (SPEC §10)
    {"id": "slack-chat-write", "title": "Slack: post messages (connect your Slack account first)",
     "connection": "slack", "scopes": ["chat:write"], "supply": 500, "start_price": 20, "floor_price": 5,
     **_WINDOW},
    # call_api in the demo: the emulator's provider API (server/emulator/provider.py) behind the demo issuer
    {"id": "github-repo-read-api", "title": "GitHub API: read repositories (brokered; the token stays here)",
     "connection": "github", "scopes": ["repo:read"], "supply": 1000, "start_price": 10, "floor_price": 2,
     "delivery": "proxy", "api": [DEMO_ISSUER + "provider/github"], **_WINDOW},
    # human approval in the demo: a new grant, and every write, is approved by the demo user (CIBA, ~1 s)
    {"id": "github-repo-write-api", "title": "GitHub API: write repositories (each grant and write approved)",
     "connection": "github", "scopes": ["repo:read", "repo:write"], "supply": 200, "start_price": 40,
     "floor_price": 10, "delivery": "proxy", "api": [DEMO_ISSUER + "provider/github"],
     "methods": ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"], "approval": "writes", **_WINDOW},
]


def demo_listings() -> list[ListingSpec]:
    return parse_listings({"listing": DEMO_LISTINGS}, "demo market")


def start_demo_tenant() -> tuple[DemoTenant, httpx.AsyncBaseTransport]:
    """The in-process emulator tenant and the transport the Auth0 client (and the demo provider API) use."""
    tenant = demo_tenant(DEMO_ISSUER, signing_key=signing_key_in_background())
    tenant.state.ciba_interval = 1  # the demo user approves on their "phone" after a second
    tenant.state.ciba_approve_after = 1
    return tenant, httpx.ASGITransport(app=create_app(tenant.state, admin=False))


def provider_mounts(transport: httpx.AsyncBaseTransport) -> dict[str, httpx.AsyncBaseTransport]:
    """Where the provider client finds the demo's provider API: in process, behind the demo issuer."""
    return {DEMO_ISSUER.rstrip("/"): transport}


def banner(account: str, database: str) -> None:
    """Say on stderr (never stdout) that this is a demo."""
    print(
        "token-vault-mcp: DEMO MODE — no AUTH0_DOMAIN set, so an embedded Auth0 emulator plays the tenant.\n"
        f"  demo account {account}, funded wallet, demo market; database {database}\n"
        "  Tokens it issues are fake. Set AUTH0_DOMAIN (see README) to broker real credentials.",
        file=sys.stderr,
        flush=True,
    )


def remote_banner(tenant: DemoTenant, base_url: str, transport: str) -> None:
    """A bearer token of the demo tenant, so a remote client can try the demo (it is not a real credential)."""
    token = tenant.state.mint_access_token(
        tenant.account,
        audience=tenant.audience,
        scopes=list(DEMO_SCOPES),
        azp="demo-remote-client",
        expires_in=24 * 3600,
    )
    path = "/mcp" if transport == "http" else "/sse"
    print(
        f"  serving {base_url}{path}; demo bearer token (24 h, demo tenant only):\n"
        f"  Authorization: Bearer {token}",
        file=sys.stderr,
        flush=True,
    )
