"""No issued token, refresh token, client secret or bearer token reaches an audit row, a log line,
stderr or an error text — across successes, refusals and failures, remote and local."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from server.app import Runtime
from server.clock import ManualClock
from server.store import AuditFilter
from tests.conftest import DEMO_NOW, held, text_of
from tests.server.remote_harness import remote_server

ASK = {"connection": "github", "scopes": ["repo:read"], "purpose": "secrets sweep"}


def database_bytes(runtime: Runtime) -> bytes:
    path = runtime.db.path
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


async def test_no_secret_leaks_anywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with held(remote_server(tmp_path, "http", ManualClock(DEMO_NOW))) as remote:
        state = remote.tenant.state
        bearers = [remote.token("auth0|alice", azp=f"agent-{n}") for n in range(2)]
        async with held(remote.client(bearers[0])) as client:
            for tool, args in (("buy_quota", {"listing_id": "github-repo-read", "units": 5, "max_unit_price": 99}),
                               ("request_token", ASK), ("request_token", {**ASK, "login_hint": "a@example.com"}),
                               ("request_token", {**ASK, "scopes": ["repo:write"]}), ("check_balance", {})):
                result = await client.call_tool(tool, args)
                if result.is_error:  # a successful request_token carries its token, by design
                    texts.append(text_of(result))
            state.faults.fail_next(503, count=50)
            texts.append(text_of(await client.call_tool("request_token", {**ASK, "login_hint": "b@example.com"})))
            state.faults.clear()
            state.revoke_connection("auth0|alice", "github")
            texts.append(text_of(await client.call_tool("request_token", {**ASK, "login_hint": "c@example.com"})))
        async with httpx.AsyncClient(base_url=remote.base_url) as http:
            for bad in (bearers[1] + "x", bearers[1][:-5], remote.token("auth0|alice", extra_claims={"exp": 1})):
                answer = await http.post("/mcp", json={}, headers={"Authorization": f"Bearer {bad}"})
                texts.append(answer.text + str(answer.headers))
        secrets = [remote.tenant.client_secret, remote.tenant.refresh_token, *bearers]
        secrets += [issue.access_token for issue in state.vault_issues]
        assert len(state.vault_issues) >= 2
        records = await remote.runtime.db.read(lambda tx: tx.find_audit(AuditFilter()))
        audit_text = "\n".join(f"{r.args} {r.account} {r.agent} {r.code}" for r in records)
        stored = database_bytes(remote.runtime)
    out, err = capfd.readouterr()
    logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert len(texts) >= 6
    for secret in secrets:
        assert secret not in audit_text
        assert secret.encode() not in stored
        assert secret not in logs
        assert secret not in err and secret not in out
        assert all(secret not in text for text in texts)
    assert "eyJ" not in audit_text and "eyJ" not in logs  # no JWT of any kind, e.g. the refresh grant's
