"""The demo tenant: settings a broker can use as they are."""

from __future__ import annotations

import httpx

from server.emulator import DemoTenant, create_app, demo_tenant
from server.emulator.demo import DEMO_CONNECT_CONNECTION, DEMO_CONNECT_SCOPES, DEMO_CONNECTIONS, auth0_domain
from server.emulator.vault import FEDERATED_TOKEN_TYPE, REFRESH_TOKEN_TYPE, TOKEN_VAULT_GRANT

DEMO_ISSUER = "http://127.0.0.1:8123/"


async def test_demo_tenant_settings_name_the_tenant() -> None:
    demo = demo_tenant(DEMO_ISSUER)

    assert isinstance(demo, DemoTenant)
    assert demo.issuer == DEMO_ISSUER
    assert demo.domain == "http://127.0.0.1:8123"
    assert demo.audience == "https://token-vault-mcp/api"
    assert demo.account == "auth0|demo-user"
    assert demo.client_secret
    grant = demo.state.refresh_tokens[demo.refresh_token]
    assert grant.client_id == demo.client_id
    assert set(grant.scopes) == {
        "read:market",
        "read:balance",
        "buy:quota",
        "request:token",
        "call:api",
        "offline_access",
    }
    assert demo.state.clients[demo.login_client_id].native


async def test_demo_refresh_token_gives_every_tool_scope_and_every_connection_exchanges() -> None:
    demo = demo_tenant(DEMO_ISSUER)
    transport = httpx.ASGITransport(app=create_app(demo.state, admin=False))
    auth = (demo.client_id, demo.client_secret)
    async with httpx.AsyncClient(transport=transport, base_url=demo.issuer) as http:
        refreshed = await http.post(
            "/oauth/token",
            data={"grant_type": "refresh_token", "refresh_token": demo.refresh_token},
            auth=auth,
        )
        exchanged = {}
        for connection in DEMO_CONNECTIONS:
            fields = {
                "grant_type": TOKEN_VAULT_GRANT,
                "subject_token": demo.refresh_token,
                "subject_token_type": REFRESH_TOKEN_TYPE,
                "requested_token_type": FEDERATED_TOKEN_TYPE,
                "connection": connection,
            }
            exchanged[connection] = (await http.post("/oauth/token", data=fields, auth=auth)).json()["scope"]

    assert refreshed.json()["scope"] == "read:market read:balance buy:quota request:token call:api"
    assert exchanged == {connection: " ".join(scopes) for connection, scopes in DEMO_CONNECTIONS.items()}


def test_auth0_domain_is_the_host_for_https_and_the_url_for_http() -> None:
    assert auth0_domain("https://tenant.eu.auth0.com/") == "tenant.eu.auth0.com"
    assert auth0_domain("http://localhost:9000/") == "http://localhost:9000"


async def test_each_demo_tenant_has_its_own_secret_and_key() -> None:
    first, second = demo_tenant(DEMO_ISSUER), demo_tenant(DEMO_ISSUER)

    assert first.client_secret != second.client_secret
    assert first.state.keys.current_kid != second.state.keys.current_kid


async def test_demo_slack_starts_unconnected_and_the_demo_clients_sign_in_on_loopback() -> None:
    demo = demo_tenant(DEMO_ISSUER, auto_login="auth0|demo-user")
    transport = httpx.ASGITransport(app=create_app(demo.state, admin=False))
    fields = {
        "grant_type": TOKEN_VAULT_GRANT,
        "subject_token": demo.refresh_token,
        "subject_token_type": REFRESH_TOKEN_TYPE,
        "requested_token_type": FEDERATED_TOKEN_TYPE,
        "connection": DEMO_CONNECT_CONNECTION,
    }
    async with httpx.AsyncClient(transport=transport, base_url=demo.issuer) as http:
        refused = await http.post("/oauth/token", data=fields, auth=(demo.client_id, demo.client_secret))

    assert refused.status_code == 401
    assert demo.state.connections[DEMO_CONNECT_CONNECTION] == tuple(DEMO_CONNECT_SCOPES)
    assert demo.state.auto_login_sub == demo.account
    assert "manage:broker" in demo.state.user_permissions(demo.account, demo.audience)
    for client_id in (demo.client_id, demo.login_client_id):
        client = demo.state.clients[client_id]
        assert client.loopback_callbacks and "create:me:connected_accounts" in client.my_account_scopes
