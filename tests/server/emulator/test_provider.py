"""The emulator's provider API: only tokens its Token Vault issued for that connection, answered with what it saw."""

from __future__ import annotations

import httpx

from server.emulator import create_app
from server.emulator.vault import FEDERATED_TOKEN_TYPE, TOKEN_VAULT_GRANT
from tests.server.tenant import BROKER_ID, BROKER_SECRET, make_tenant, user_subject


async def vault_token(http: httpx.AsyncClient, subject: str, connection: str, scope: str) -> str:
    answer = await http.post("/oauth/token", data={
        "grant_type": TOKEN_VAULT_GRANT, "subject_token": subject,
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "requested_token_type": FEDERATED_TOKEN_TYPE, "connection": connection, "scope": scope,
        "client_id": BROKER_ID, "client_secret": BROKER_SECRET,
    })
    assert answer.status_code == 200, answer.text
    return str(answer.json()["access_token"])


async def test_a_vault_token_is_accepted_for_its_connection_only_and_the_answer_says_what_it_saw() -> None:
    state = make_tenant()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://t") as http:
        token = await vault_token(http, user_subject(state).token, "github", "repo:read")
        seen = await http.post("/provider/github/repos/acme/x?per_page=2", json={"a": 1},
                               headers={"Authorization": f"Bearer {token}"})
        assert seen.status_code == 200
        body = seen.json()
        assert body["connection"] == "github" and body["scopes"] == ["repo:read"]
        assert (body["method"], body["path"], body["query"], body["body"]) == (
            "POST", "/repos/acme/x", "per_page=2", '{"a":1}'
        )
        assert (await http.get("/provider/stripe/x", headers={"Authorization": f"Bearer {token}"})).status_code == 401
        assert (await http.get("/provider/github/x", headers={"Authorization": "Bearer forged"})).status_code == 401
        assert (await http.get("/provider/github/x")).status_code == 401
        state.clock = lambda: 4e9  # past the token's expiry
        assert (await http.get("/provider/github/x", headers={"Authorization": f"Bearer {token}"})).status_code == 401
    assert [r.accepted for r in state.provider_requests] == [True, False, False, False, False]
