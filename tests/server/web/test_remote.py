"""Remote mode over real HTTP on 127.0.0.1: Streamable HTTP and SSE, bearer tokens, guards, audit."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from server import audit, market
from server.auth0.client import TOKEN_VAULT_GRANT
from server.clock import ManualClock
from server.store import AuditFilter
from tests.conftest import DEMO_NOW, held, ok, refused
from tests.server.provider_harness import provider_api
from tests.server.remote_harness import ALL_SCOPES, Remote, remote_server
from tests.server.test_cli import run

BUY = {"listing_id": "github-repo-read", "units": 2, "max_unit_price": 100}
ASK = {"connection": "github", "scopes": ["repo:read"], "purpose": "remote e2e"}


@pytest.fixture(params=["http", "sse"])
async def remote(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Remote]:
    async with held(remote_server(tmp_path, request.param, ManualClock(DEMO_NOW))) as r:
        yield r


async def session_flow(remote: Remote, sub: str, azp: str) -> dict[str, Any]:
    async with held(remote.client(remote.token(sub, azp=azp))) as client:
        assert {t.name for t in (await client.list_tools()).tools} == {
            "list_market", "check_balance", "buy_quota", "request_token", "call_api"
        }
        await ok(client, "list_market", {"limit": 2})
        await ok(client, "buy_quota", BUY)
        token = await ok(client, "request_token", ASK)
        balance = await ok(client, "check_balance", {})
        return {"token": token, "balance": balance}


async def test_four_tools_for_concurrent_clients_and_accounts_stay_apart(remote: Remote) -> None:
    results = await asyncio.gather(
        session_flow(remote, "auth0|alice", "agent-a1"),
        session_flow(remote, "auth0|alice", "agent-a2"),
        session_flow(remote, "auth0|bob", "agent-b"),
    )
    alice1, alice2, bob = results
    price = bob["token"] and (1000 - bob["balance"]["balance"]) // BUY["units"]
    assert bob["balance"]["account"] == "auth0|bob"
    assert bob["balance"]["holdings"] == [
        {"listing_id": "github-repo-read", "connection": "github", "scopes": ["repo:read"], "units_remaining": 1,
         "delivery": "token"}
    ]
    assert {alice1["balance"]["account"], alice2["balance"]["account"]} == {"auth0|alice"}
    alice_now = await remote.runtime.db.read(lambda tx: (tx.balance("auth0|alice"), tx.holdings_of("auth0|alice")))
    assert alice_now[0] == 1000 - 2 * BUY["units"] * price  # both of alice's agents paid; bob's purchase did not
    assert [h.units_held for h in alice_now[1]] == [2]
    records = await remote.runtime.db.read(lambda tx: tx.find_audit(AuditFilter(tool="request_token")))
    assert {(r.account, r.agent) for r in records} == {
        ("auth0|alice", "agent-a1"), ("auth0|alice", "agent-a2"), ("auth0|bob", "agent-b")
    }
    assert all(r.transport == remote.transport for r in records)


async def test_vault_exchange_carries_the_callers_access_token_and_nothing_else_does(remote: Remote) -> None:
    bearer = remote.token("auth0|alice")
    async with held(remote.client(bearer)) as client:
        await ok(client, "buy_quota", BUY)
        await ok(client, "request_token", ASK)
    sent = remote.tenant.state.requests
    [exchange] = [r for r in sent if r.grant_type == TOKEN_VAULT_GRANT]
    assert exchange.fields["subject_token"] == bearer
    assert exchange.fields["subject_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert exchange.fields["scope"] == "repo:read"
    others = [r for r in sent if r is not exchange]
    assert all(bearer not in json.dumps(r.fields) + json.dumps(dict(r.headers)) for r in others)
    db_bytes = b"".join(p.read_bytes() for p in remote.runtime.db.path.parent.glob(remote.runtime.db.path.name + "*"))
    assert bearer.encode() not in db_bytes


def forge(header: dict[str, Any], claims: dict[str, Any], key: Any, alg: str) -> str:
    return jwt.encode(header | {"alg": alg}, claims, key, algorithms=[alg])


def _part(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unsigned(claims: dict[str, Any]) -> str:
    return f"{_part({'alg': 'none', 'typ': 'JWT'})}.{_part(claims)}."


def hs256_with(secret: bytes, kid: str, claims: dict[str, Any]) -> str:
    """The classic confusion attack: HMAC-sign with the RSA public key as the secret."""
    signing_input = f"{_part({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{_part(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_part(signature)}"


def bad_tokens(remote: Remote) -> dict[str, str]:
    now = int(time.time())
    good_claims = {
        "iss": remote.tenant.issuer, "sub": "auth0|alice", "aud": remote.tenant.audience, "azp": "agent-1",
        "scope": " ".join(ALL_SCOPES), "iat": now, "exp": now + 600,
    }
    state = remote.tenant.state
    jwks = state.public_jwks()["keys"][0]
    public_pem = RSAKey.import_key(jwks).as_pem(private=False)
    stranger = RSAKey.generate_key(2048, parameters={"kid": jwks["kid"]})
    unknown_kid = RSAKey.generate_key(2048, parameters={"kid": "never-published"})
    return {
        "malformed": "not.a.jwt!",
        "garbage": "definitely-not-a-jwt-but-long-enough-to-search-for",
        "bad signature": forge({"kid": jwks["kid"]}, good_claims, stranger, "RS256"),
        "alg none": unsigned(good_claims),
        "hs256 with the public key": hs256_with(public_pem, jwks["kid"], good_claims),
        "expired": remote.token("auth0|alice", extra_claims={"exp": now - 3600, "iat": now - 7200}),
        "not yet valid": remote.token("auth0|alice", extra_claims={"nbf": now + 3600}),
        "wrong issuer": remote.token("auth0|alice", extra_claims={"iss": "https://evil.test/"}),
        "wrong audience": state.mint_access_token("auth0|alice", audience="https://other/api", scopes=ALL_SCOPES),
        "unknown kid": forge({"kid": "never-published"}, good_claims, unknown_kid, "RS256"),
    }


async def test_bad_tokens_get_401_with_metadata_and_are_audited(remote: Remote) -> None:
    remote.runtime.broker.control.fold_seconds = 0  # every refusal its own event here (folding: its own test)
    cases = bad_tokens(remote)
    async with httpx.AsyncClient(base_url=remote.base_url) as http:
        none = await http.post(remote.endpoint, json={})
        assert none.status_code == 401
        assert 'resource_metadata="' in none.headers["www-authenticate"]
        for name, token in cases.items():
            answer = await http.post(
                remote.endpoint,
                json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"},
            )
            assert answer.status_code == 401, name
            challenge = answer.headers["www-authenticate"]
            assert 'error="invalid_token"' in challenge, name
            assert "resource_metadata=" in challenge
            assert token not in answer.text
    records = await remote.runtime.db.read(lambda tx: tx.find_audit(AuditFilter(outcome="denied")))
    refusals = [r for r in records if r.tool is None]
    assert len(refusals) == len(cases) + 1
    assert all(r.code == "unauthenticated" and json.loads(r.args)["remote"].startswith("127.0.0.1") for r in refusals)
    expired = [r for r in refusals if "expired" in json.loads(r.args)["reason"]]
    assert expired and expired[0].account == "auth0|alice"
    dump = json.dumps([audit.export_line(r) for r in records])
    assert all(token not in dump for token in cases.values())


async def test_token_without_the_tools_scope_is_insufficient_scope(remote: Remote) -> None:
    async with held(remote.client(remote.token("auth0|bob", scopes=["read:market"]))) as client:
        await ok(client, "list_market", {})
        text = await refused(client, "buy_quota", BUY)
        assert text == "[insufficient_scope] buy_quota needs scope buy:quota; the token grants read:market"
        assert (await refused(client, "check_balance", {})).startswith("[insufficient_scope] ")
    async with held(remote.client(remote.token("auth0|bob", scopes=["read:market", "read:balance"]))) as client:
        assert await refused(client, "buy_quota", BUY) == (  # the SPEC's own example, to the letter
            "[insufficient_scope] buy_quota needs scope buy:quota; the token grants read:market read:balance"
        )


async def test_bad_origin_is_403_bad_host_is_421_and_metadata_is_exact(remote: Remote) -> None:
    async with httpx.AsyncClient(base_url=remote.base_url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        evil = await http.get(remote.endpoint, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403
        rebound = await http.get("/healthz", headers={"Host": "attacker.example"})
        assert rebound.status_code == 421
        path = "/mcp" if remote.transport == "http" else "/sse"
        meta = await http.get(f"/.well-known/oauth-protected-resource{path}")
        assert meta.status_code == 200
        assert meta.json() == {
            "resource": remote.endpoint,
            "authorization_servers": [remote.tenant.issuer],
            "scopes_supported": ALL_SCOPES,
            "bearer_methods_supported": ["header"],
            "resource_name": "token-vault-mcp",
        }
        good_origin = await http.get("/healthz", headers={"Origin": remote.base_url})
        assert good_origin.status_code == 200


def test_allowlists_come_from_the_resource_url_and_the_environment(tmp_path: Path) -> None:
    from server.config import load_config
    from server.web.remote import remote_settings

    config = load_config(
        {
            "TVM_DATABASE": str(tmp_path / "x.db"),
            "TVM_RESOURCE_URL": "https://broker.example.com/mcp",
            "TVM_ALLOWED_HOSTS": "internal.lan:8000, Other.Example",
            "TVM_ALLOWED_ORIGINS": "https://app.example.com/",
        },
        dotenv=False,
    )
    settings = remote_settings(config, "http", "0.0.0.0", 8000)
    assert {"broker.example.com", "internal.lan:8000", "other.example"} <= settings.allowed_hosts
    assert {"https://broker.example.com", "https://app.example.com"} <= settings.allowed_origins
    assert "evil.example" not in settings.allowed_hosts
    assert settings.metadata_url == "https://broker.example.com/.well-known/oauth-protected-resource/mcp"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("localhost:1", True), ("127.0.0.1:65535", True), ("[::1]", True), ("[::1]:9", True),
     ("localhost:", False), ("localhost:x", False), ("localhost:123456", False), ("localhost.evil.example", False),
     ("evil.example:8000", False), ("127.0.0.2:8000", False), ("::1", False), ("", False)],
)
def test_loopback_names_on_any_port_are_loopback_and_nothing_else_is(host: str, loopback: bool) -> None:
    from server.web.remote import is_loopback_host, is_loopback_origin

    assert is_loopback_host(host) is loopback
    assert is_loopback_origin(f"http://{host}") is loopback
    assert is_loopback_origin(f"https://{host}") is loopback
    assert not is_loopback_origin(f"ftp://{host}")
    assert not is_loopback_origin(f"http://user@{host}")


async def test_a_local_reverse_proxy_on_another_port_is_served_and_foreign_names_are_not(remote: Remote) -> None:
    other = 1 + int(remote.base_url.rsplit(":", 1)[1]) % 60000
    initialize = {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
    }
    auth = {"Authorization": f"Bearer {remote.token('auth0|alice')}"}
    proxied = {**auth, "Host": f"localhost:{other}", "Origin": f"http://127.0.0.1:{other}"}
    async with httpx.AsyncClient(base_url=remote.base_url) as http:
        health = await http.get("/healthz", headers={"Host": f"[::1]:{other}", "Origin": f"http://localhost:{other}"})
        assert health.status_code == 200
        if remote.transport == "http":
            served = await http.post(
                "/mcp", json=initialize, headers={**proxied, "Accept": "application/json, text/event-stream"}
            )
            assert served.status_code == 200, served.text
            assert "serverInfo" in served.text
        else:
            async with http.stream("GET", "/sse", headers=proxied) as stream:
                assert stream.status_code == 200
        assert (await http.get(remote.endpoint, headers={**auth, "Host": "evil.example"})).status_code == 421
        assert (await http.get(remote.endpoint, headers={**auth, "Origin": "http://evil.example"})).status_code == 403
        evil_port = f"http://evil.example:{other}"
        assert (await http.get("/healthz", headers={"Origin": evil_port})).status_code == 403


# Another process (a `wallet credit`, a `market load`) holding SQLite's write lock for a while.
HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
print("released", flush=True)
"""


async def test_a_write_lock_held_by_another_process_stalls_no_client_and_loses_no_call(tmp_path: Path) -> None:
    async with held(remote_server(tmp_path, "http", ManualClock(DEMO_NOW))) as remote, AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(held(remote.client(remote.token("auth0|alice", azp=f"agent-{n}"))))
            for n in range(16)
        ]
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLD_LOCK, str(remote.runtime.db.path), "3", stdout=asyncio.subprocess.PIPE
        )
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"locked\n"
        def call(n: int) -> asyncio.Future[Any]:
            if n % 2:
                buy = {**BUY, "units": 1, "idempotency_key": f"k{n}"}
                return asyncio.ensure_future(sessions[n].call_tool("buy_quota", buy))
            return asyncio.ensure_future(sessions[n].call_tool("check_balance", {}))

        health: list[float] = []
        async with httpx.AsyncClient(base_url=remote.base_url) as http:

            async def probe(times: int) -> None:
                for _ in range(times):
                    started = time.perf_counter()
                    assert (await http.get("/healthz")).status_code == 200
                    health.append(time.perf_counter() - started)
                    await asyncio.sleep(0.1)

            calls = [call(1)]  # one call alone first (it leads its own commit), then 15 together
            await probe(4)
            calls += [call(n) for n in range(16) if n != 1]
            await probe(6)
        assert not any(c.done() for c in calls)  # still waiting for the lock: nothing failed early
        assert await holder.stdout.readline() == b"released\n"
        results = await asyncio.gather(*calls)
        await holder.wait()
    # a loop stalled behind the lock would hold one probe for the rest of the 3-s hold (≥ 2 s); under a busy
    # machine a served probe can still take tens of milliseconds
    assert sorted(health)[len(health) // 2] < 0.1 and max(health) < 0.5, health
    assert [r.is_error for r in results] == [False] * 16
    verified = run(tmp_path, "audit", "verify", "--ledger", env={"TVM_DATABASE": str(remote.runtime.db.path)})
    assert verified.code == 0, verified.err
    events = run(tmp_path, "audit", "list", "--json", env={"TVM_DATABASE": str(remote.runtime.db.path)})
    audited = [e for e in map(json.loads, events.out.splitlines()) if e["tool"] in ("buy_quota", "check_balance")]
    assert sorted((e["tool"], e["outcome"]) for e in audited) == sorted(
        [("buy_quota", "ok")] * 8 + [("check_balance", "ok")] * 8
    )


async def test_call_api_end_to_end_the_provider_gets_alices_vault_token_and_no_client_sees_it(
    remote: Remote,
) -> None:
    async with provider_api() as provider:
        specs = market.parse_listings({"listing": [{
            "id": "github-api", "title": "GitHub API", "connection": "github", "scopes": ["repo:read"],
            "supply": 10, "start_price": 10, "floor_price": 2, "delivery": "proxy", "api": [provider.base_url],
            "opens_at": datetime(2026, 1, 1, tzinfo=UTC), "closes_at": datetime(2030, 1, 1, tzinfo=UTC),
        }]})
        await remote.runtime.db.write(lambda tx: market.load(tx, specs))
        bearer = remote.token("auth0|alice")
        call = {"connection": "github", "scopes": ["repo:read"], "method": "GET", "purpose": "remote e2e",
                "url": provider.base_url + "/echo/repos/acme/x"}
        async with held(remote.client(bearer)) as client:
            await ok(client, "buy_quota", {"listing_id": "github-api", "units": 1, "max_unit_price": 100})
            first = await ok(client, "call_api", call)
            second = await ok(client, "call_api", {**call, "url": provider.base_url + "/token-in-body"})
    assert first["grant_id"] == second["grant_id"] and second["units_remaining"] == 0
    [token] = {t for t in provider.tokens if t}
    issue = remote.tenant.state.vault_tokens[token]
    assert (issue.sub, issue.connection, issue.scopes) == ("auth0|alice", "github", ("repo:read",))
    assert token != bearer and bearer not in {s.headers.get("authorization", "") for s in provider.seen}
    assert token not in json.dumps([first, second]) and second["body"].count("[redacted]") == 2
    [exchange] = [r for r in remote.tenant.state.requests if r.grant_type == TOKEN_VAULT_GRANT]
    assert exchange.fields["subject_token"] == bearer and exchange.fields["scope"] == "repo:read"
    events = await remote.runtime.db.read(lambda tx: tx.find_audit(AuditFilter(tool="call_api")))
    assert [json.loads(e.args)["new_grant"] for e in events] == [True, False]
    assert all(e.transport == remote.transport for e in events)


# 2,000 requests with a bad token from 20 concurrent connections; prints each status; checks Retry-After.
FLOOD = """
import asyncio, sys, httpx
url, workers, each = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def worker(http, out):
    for _ in range(each):
        answer = await http.post(url, json={}, headers={"Authorization": "Bearer not.a.jwt"})
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
        out.append(answer.status_code)
async def main():
    out = []
    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.gather(*(worker(http, out) for _ in range(workers)))
    print(" ".join(map(str, out)))
asyncio.run(main())
"""


async def test_a_flood_of_bad_tokens_adds_one_event_a_second_and_does_not_slow_other_clients(tmp_path: Path) -> None:
    async with held(remote_server(tmp_path, "http", ManualClock(DEMO_NOW))) as remote:
        other_address = httpx.AsyncHTTPTransport(local_address="127.0.0.2")  # another machine's client
        headers = {"Authorization": f"Bearer {remote.token('auth0|bob')}"}
        http_client = httpx.AsyncClient(transport=other_address, headers=headers, timeout=30)
        calm = Client(streamable_http_client(remote.endpoint, http_client=http_client))

        async def latencies(client: Client, n: int) -> list[float]:
            out = []
            for _ in range(n):
                started = time.perf_counter()
                await ok(client, "check_balance", {})
                out.append(time.perf_counter() - started)
            return sorted(out)

        async with held(calm) as client:
            before = await latencies(client, 40)
            started = time.monotonic()
            # the flood comes from another process (another machine's attacker), not from this test's loop
            flooder = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FLOOD, remote.endpoint, "20", "100", stdout=asyncio.subprocess.PIPE
            )
            during = await latencies(client, 40)
            out, _ = await flooder.communicate()
            elapsed = time.monotonic() - started
        statuses = [int(code) for code in out.split()]
        await remote.runtime.broker.flush_refusals(everything=True)
        records = await remote.runtime.db.read(lambda tx: tx.find_audit(AuditFilter()))
    median_before, median_during = before[len(before) // 2], during[len(during) // 2]
    print(f"other client's median check_balance: {median_before * 1000:.2f} ms before, "
          f"{median_during * 1000:.2f} ms during a flood of 2000 bad tokens ({elapsed:.1f} s)")
    # "never slows other clients by more than a few ms": on a quiet machine before and during differ by
    # well under a millisecond; the proportional slack covers a machine already busy with other work (the
    # flooder then competes with the client for the same cores), not a server doing work per bad token.
    assert median_during <= median_before * 1.25 + 0.005
    assert len(statuses) == 2000 and statuses.count(401) == 30 and statuses.count(429) == 1970
    assert flooder.returncode == 0
    refusals = [r for r in records if r.tool is None]
    assert len(refusals) <= elapsed + 2  # one a second, and one last count
    assert sum(json.loads(r.args)["suppressed"] for r in refusals) + len(refusals) == 2000
    assert {r.code for r in refusals} <= {"unauthenticated", "rate_limited"}
