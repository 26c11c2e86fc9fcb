"""call_api through the SDK client, against the emulated tenant and a real loopback provider (SPEC §8)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from server import audit, grants, market
from server.app import Runtime, open_runtime
from server.auth0.client import TOKEN_VAULT_GRANT
from server.clock import ManualClock
from server.config import load_config
from server.grants import GrantAsk
from server.invariants import check_invariants
from server.store import AuditFilter
from tests.conftest import demo_client, ok, refused, side, text_of
from tests.server.provider_harness import Provider, body_json, provider_api

pytestmark = pytest.mark.both_backends

LISTING = "github-api"
SCOPES = ["repo:read"]
WINDOW = {"opens_at": datetime(2026, 1, 1, tzinfo=UTC), "closes_at": datetime(2030, 1, 1, tzinfo=UTC)}


def listings(provider: Provider) -> list[market.ListingSpec]:
    base = {"connection": "github", "supply": 100, "start_price": 10, "floor_price": 2, **WINDOW}
    return market.parse_listings({"listing": [
        {"id": LISTING, "title": "GitHub API", "scopes": SCOPES, "delivery": "proxy",
         "api": [provider.base_url], "methods": ["GET", "HEAD", "POST"], **base},
        {"id": "github-write-api", "title": "GitHub API, writes", "scopes": ["repo:read", "repo:write"],
         "delivery": "proxy", "api": [provider.base_url + "/echo"], "methods": ["GET", "PUT", "DELETE"], **base},
    ]})


class Setup:
    """A demo runtime with proxy listings on a real loopback provider, restartable on the same database."""

    def __init__(self, database: str, clock: ManualClock, provider: Provider) -> None:
        self.database = database
        self.clock = clock
        self.provider = provider
        self.env: dict[str, str] = {"TVM_DATABASE": database}
        self.runtimes: list[Runtime] = []

    async def start(self, **env: str) -> Runtime:
        runtime = await open_runtime(load_config({**self.env, **env}, dotenv=False), clock=self.clock)
        await runtime.db.write(lambda tx: market.load(tx, listings(self.provider)))
        self.runtimes.append(runtime)
        return runtime

    def client(self, runtime: Runtime) -> Any:
        return demo_client(runtime)

    async def aclose(self) -> None:
        for runtime in self.runtimes:
            await runtime.aclose()


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    async with provider_api() as p:
        yield p


@pytest.fixture
async def setup(database: str, clock: ManualClock, provider: Provider) -> AsyncIterator[Setup]:
    s = Setup(database, clock, provider)
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture
async def rt(setup: Setup) -> Runtime:
    return await setup.start()


@pytest.fixture
async def api(setup: Setup, rt: Runtime) -> AsyncIterator[Client]:
    async with setup.client(rt) as c:
        await ok(c, "buy_quota", {"listing_id": LISTING, "units": 3, "max_unit_price": 100})
        yield c


def stored_bytes(database: str) -> bytes:
    """Everything the store holds: the SQLite files' bytes, or every row of every PostgreSQL table as text."""
    if database.startswith("postgresql://"):
        with side(database) as other:
            tables = [t for (t,) in other.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
            return "".join(str(other.execute(f"SELECT * FROM {t}")) for t in tables).encode()
    file = Path(database)
    return b"".join(p.read_bytes() for p in file.parent.glob(file.name + "*"))


def ask(url: str, **more: Any) -> dict[str, Any]:
    return {"connection": "github", "scopes": SCOPES, "method": "GET", "url": url, "purpose": "read a repo", **more}


async def units(client: Client) -> dict[str, int]:
    return {h["listing_id"]: h["units_remaining"] for h in (await ok(client, "check_balance", {}))["holdings"]}


async def events(runtime: Runtime, **where: Any) -> list[dict[str, Any]]:
    records = await runtime.db.read(lambda tx: tx.find_audit(AuditFilter(**where)))
    return [audit.export_line(r) for r in records]


def issued(runtime: Runtime) -> list[Any]:
    assert runtime.tenant is not None
    return runtime.tenant.state.vault_issues


def exchanges(runtime: Runtime) -> list[Any]:
    assert runtime.tenant is not None
    return [r for r in runtime.tenant.state.requests if r.grant_type == TOKEN_VAULT_GRANT]


async def test_two_calls_in_one_grant_spend_one_unit_and_the_provider_gets_the_vault_token(
    api: Client, rt: Runtime, provider: Provider
) -> None:
    first = await ok(api, "call_api", ask(provider.base_url + "/echo/repos/acme/x?per_page=5"))
    second = await ok(api, "call_api", ask(provider.base_url + "/echo/repos/acme/y"))
    assert first["status"] == second["status"] == 200
    assert body_json(first["body"])["path"] == "/echo/repos/acme/x"
    assert first["grant_id"] == second["grant_id"] and first["token_id"] == second["token_id"]
    assert first["units_remaining"] == second["units_remaining"] == 2
    assert await units(api) == {LISTING: 2}
    [issue] = issued(rt)  # one Token Vault exchange for the grant, exactly the requested scopes
    assert provider.tokens == [issue.access_token, issue.access_token]
    assert issue.scopes == tuple(SCOPES) and issue.connection == "github"
    assert first["token_id"] == audit.token_fingerprint(rt.db.hmac_key, issue.access_token).hex()
    balance = await ok(api, "check_balance", {})
    assert balance["grants"] == [
        {"grant_id": first["grant_id"], "connection": "github", "scopes": SCOPES,
         "expires_at": first["grant_expires_at"]}
    ]
    made = await events(rt, tool="call_api")
    assert [(e["outcome"], e["args"]["new_grant"], e["args"]["status"]) for e in made] == [
        ("ok", True, 200), ("ok", False, 200)
    ]
    assert made[0]["args"]["url"] == provider.base_url + "/echo/repos/acme/x?per_page="
    assert made[0]["args"]["method"] == "GET" and made[0]["args"]["grant_id"] == first["grant_id"]
    assert made[0]["token_id"] == first["token_id"] and made[0]["scope"] == "call:api"
    assert await rt.db.read(check_invariants) == []


async def test_a_call_after_the_grant_ends_spends_a_second_unit(
    api: Client, rt: Runtime, provider: Provider, clock: ManualClock
) -> None:
    first = await ok(api, "call_api", ask(provider.base_url + "/echo/a"))
    expires = datetime.fromisoformat(first["grant_expires_at"].replace("Z", "+00:00"))
    assert expires - clock.now() == timedelta(seconds=300)  # TVM_GRANT_TTL's default
    clock.advance(timedelta(seconds=299))
    assert (await ok(api, "call_api", ask(provider.base_url + "/echo/b")))["grant_id"] == first["grant_id"]
    clock.advance(timedelta(seconds=2))
    later = await ok(api, "call_api", ask(provider.base_url + "/echo/c"))
    assert later["grant_id"] != first["grant_id"] and later["units_remaining"] == 1
    assert await units(api) == {LISTING: 1}
    assert await rt.db.read(check_invariants) == []


async def test_a_grant_never_outlives_its_token(setup: Setup, provider: Provider) -> None:
    runtime = await setup.start(TVM_GRANT_TTL="3600")
    assert runtime.tenant is not None
    runtime.tenant.state.vault_token_expires_in = 100
    async with setup.client(runtime) as c:
        await ok(c, "buy_quota", {"listing_id": LISTING, "units": 1, "max_unit_price": 100})
        answer = await ok(c, "call_api", ask(provider.base_url + "/echo/x"))
    expires = datetime.fromisoformat(answer["grant_expires_at"].replace("Z", "+00:00"))
    assert timedelta(seconds=60) < expires - setup.clock.now() <= timedelta(seconds=70)  # 100 s less 30 s


async def test_a_restart_inside_a_grant_re_exchanges_and_spends_nothing(setup: Setup, provider: Provider) -> None:
    first_runtime = await setup.start()
    async with setup.client(first_runtime) as c:
        await ok(c, "buy_quota", {"listing_id": LISTING, "units": 2, "max_unit_price": 100})
        before = await ok(c, "call_api", ask(provider.base_url + "/echo/x"))
    await first_runtime.aclose()
    setup.runtimes.remove(first_runtime)
    restarted = await setup.start()  # a new process: nothing of the old one's memory
    async with setup.client(restarted) as c:
        after = await ok(c, "call_api", ask(provider.base_url + "/echo/y"))
        assert await units(c) == {LISTING: 1}
    assert after["grant_id"] == before["grant_id"] and after["units_remaining"] == 1
    assert len(exchanges(restarted)) == 1  # a fresh token for the same grant, no unit for it
    assert after["token_id"] != before["token_id"]
    grants = await restarted.db.read(lambda tx: tx.live_grants("auth0|demo-user", "token-vault-mcp-demo",
                                                                setup.clock.now()))
    assert [g.token_id.hex() for g in grants] == [after["token_id"]]  # the record follows the token in use
    [event] = [e for e in await events(restarted, tool="call_api") if e["args"]["grant_id"] == after["grant_id"]][-1:]
    assert event["args"]["new_grant"] is False and event["token_id"] == after["token_id"]
    assert await restarted.db.read(check_invariants) == []


async def test_request_token_on_proxy_only_quota_is_proxy_only_and_spends_nothing(api: Client, rt: Runtime) -> None:
    text = await refused(api, "request_token", {"connection": "github", "scopes": SCOPES, "purpose": "p"})
    assert text.startswith("[proxy_only] ") and "call_api" in text
    assert await units(api) == {LISTING: 3} and issued(rt) == []
    [event] = await events(rt, tool="request_token")
    assert (event["outcome"], event["code"]) == ("denied", "proxy_only")


@pytest.mark.parametrize(
    "path",
    [
        "https://evil.example/echo",  # another host
        "{base}/../echo",
        "{base}/%2e%2e/echo",
        "{base}/echo/%2E%2e/x",
        "{base}X/echo",  # a prefix that is not a segment boundary (…:PORT vs …:PORTX)
        "{scheme}://{host}@evil.example/echo",  # userinfo
        "{base}\\echo",  # backslashes
        "{base}/echo\\..\\x",
        "ftp://{host}/echo",  # another scheme
        "https://{host}/echo",
        "{other_port}/echo",  # another port
    ],
)
async def test_every_allowlist_escape_is_refused_and_spends_nothing(
    api: Client, rt: Runtime, provider: Provider, path: str
) -> None:
    scheme, _, host = provider.base_url.partition("://")
    port = int(host.rsplit(":", 1)[1])
    url = path.format(base=provider.base_url, scheme=scheme, host=host,
                      other_port=f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}")
    text = await refused(api, "call_api", ask(url))
    assert text.startswith("[api_not_allowed] "), text
    assert await units(api) == {LISTING: 3}
    assert provider.seen == [] and issued(rt) == []
    [event] = await events(rt, tool="call_api")
    assert (event["outcome"], event["code"]) == ("denied", "api_not_allowed")


async def test_a_segment_boundary_prefix_is_refused_under_a_path_base(api: Client, provider: Provider) -> None:
    await ok(api, "buy_quota", {"listing_id": "github-write-api", "units": 1, "max_unit_price": 100})
    write = {"scopes": ["repo:read", "repo:write"]}
    assert (await ok(api, "call_api", ask(provider.base_url + "/echo/x", **write)))["status"] == 200
    text = await refused(api, "call_api", ask(provider.base_url + "/echoX", **write))
    assert text.startswith("[api_not_allowed] ")


async def test_a_method_outside_the_listings_methods_is_refused_and_spends_nothing(
    api: Client, rt: Runtime, provider: Provider
) -> None:
    text = await refused(api, "call_api", ask(provider.base_url + "/echo/x", method="DELETE"))
    assert text.startswith("[api_not_allowed] DELETE is not allowed by listing github-api")
    assert await units(api) == {LISTING: 3} and provider.seen == []
    # inside a live grant too: the grant does not widen the listing's methods
    await ok(api, "call_api", ask(provider.base_url + "/echo/x"))
    assert (await refused(api, "call_api", ask(provider.base_url + "/echo/x", method="PUT"))).startswith(
        "[api_not_allowed] "
    )
    assert len(provider.seen) == 1


async def test_a_listing_without_api_cannot_be_called(setup: Setup, rt: Runtime) -> None:
    async with setup.client(rt) as c:
        await ok(c, "buy_quota", {"listing_id": "github-repo-read", "units": 1, "max_unit_price": 100})
        text = await refused(c, "call_api", ask("https://api.github.com/user"))
        assert text.startswith("[api_not_allowed] listing github-repo-read names no API")
        assert await units(c) == {"github-repo-read": 1}


async def test_a_redirect_is_returned_not_followed(api: Client, provider: Provider) -> None:
    async with provider_api() as elsewhere:
        answer = await ok(api, "call_api", ask(f"{provider.base_url}/redirect?to={elsewhere.base_url}/x"))
        assert answer["status"] == 302 and answer["headers"]["location"] == f"{elsewhere.base_url}/x"
        assert elsewhere.seen == []


async def test_a_provider_echoing_the_token_sees_it_redacted_in_headers_and_body(
    api: Client, rt: Runtime, provider: Provider
) -> None:
    headed = await ok(api, "call_api", ask(provider.base_url + "/token-in-header"))
    bodied = await ok(api, "call_api", ask(provider.base_url + "/token-in-body"))
    [issue] = issued(rt)
    assert issue.access_token not in json.dumps([headed, bodied])
    assert headed["headers"]["etag"] == "[redacted]" and "x-echo" not in headed["headers"]
    assert bodied["body"] == "you sent [redacted] and again [redacted]."


async def test_an_answer_over_the_limit_is_cut_and_flagged(setup: Setup, provider: Provider) -> None:
    runtime = await setup.start(TVM_API_MAX_BYTES="1000")
    async with setup.client(runtime) as c:
        await ok(c, "buy_quota", {"listing_id": LISTING, "units": 1, "max_unit_price": 100})
        cut = await ok(c, "call_api", ask(provider.base_url + "/big?n=5000"))
        whole = await ok(c, "call_api", ask(provider.base_url + "/big?n=1000"))
    assert cut["truncated"] and cut["body"] == "a" * 1000
    assert not whole["truncated"] and whole["body"] == "a" * 1000


async def test_binary_answers_come_back_as_base64(api: Client, provider: Provider) -> None:
    answer = await ok(api, "call_api", ask(provider.base_url + "/binary"))
    assert answer["body_encoding"] == "base64"


async def test_a_hanging_provider_is_api_unavailable_within_the_timeout_and_the_grant_stays(
    setup: Setup, provider: Provider
) -> None:
    runtime = await setup.start(TVM_API_TIMEOUT="0.5")
    async with setup.client(runtime) as c:
        await ok(c, "buy_quota", {"listing_id": LISTING, "units": 2, "max_unit_price": 100})
        loop_time = __import__("time").monotonic
        started = loop_time()
        text = await refused(c, "call_api", ask(provider.base_url + "/hang"))
        assert loop_time() - started < 3
        assert text.startswith("[api_unavailable] ")
        assert await units(c) == {LISTING: 1}  # the unit bought the grant, not the call
        after = await ok(c, "call_api", ask(provider.base_url + "/echo/x"))
        assert after["units_remaining"] == 1  # the grant the hung call opened
    made = await events(runtime, tool="call_api")
    assert [(e["code"], e["args"]["new_grant"]) for e in made] == [("api_unavailable", True), (None, False)]
    assert await runtime.db.read(check_invariants) == []


async def test_a_provider_401_re_exchanges_once_and_retries_once(api: Client, rt: Runtime, provider: Provider) -> None:
    answer = await ok(api, "call_api", ask(provider.base_url + "/unauthorized-once"))
    assert answer["status"] == 200
    first, second = issued(rt)
    assert provider.tokens == [first.access_token, second.access_token]
    assert answer["token_id"] == audit.token_fingerprint(rt.db.hmac_key, second.access_token).hex()
    again = await ok(api, "call_api", ask(provider.base_url + "/status/401"))
    assert again["status"] == 401  # a second refusal is the answer: one re-exchange, one retry only
    assert len(issued(rt)) == 3 and len(provider.seen) == 4
    assert await units(api) == {LISTING: 2}


async def test_provider_errors_are_answers_not_tool_errors(api: Client, provider: Provider) -> None:
    for status in (404, 500):
        answer = await ok(api, "call_api", ask(provider.base_url + f"/status/{status}"))
        assert answer["status"] == status


async def test_the_request_body_and_headers_reach_the_provider_and_stay_out_of_the_log(
    api: Client, rt: Runtime, provider: Provider
) -> None:
    await ok(api, "call_api", ask(provider.base_url + "/echo/issues", method="POST", json={"title": "secret plan"},
                                  headers={"Accept": "application/vnd.github+json", "X-Request-Note": "hush"}))
    [seen] = provider.seen
    assert seen.body == b'{"title":"secret plan"}' and seen.headers["content-type"] == "application/json"
    assert seen.headers["accept"] == "application/vnd.github+json" and seen.headers["x-request-note"] == "hush"
    await ok(api, "call_api", ask(provider.base_url + "/echo/notes", method="POST", body="plain words",
                                  headers={"Content-Type": "text/markdown"}))
    assert provider.seen[1].body == b"plain words" and provider.seen[1].headers["content-type"] == "text/markdown"
    logged = json.dumps(await events(rt, tool="call_api"))
    assert "secret plan" not in logged and "hush" not in logged and "plain words" not in logged


@pytest.mark.parametrize(
    "extra",
    [
        {"headers": {"Authorization": "Bearer mine"}},
        {"headers": {"cookie": "a=b"}},
        {"headers": {"Host": "evil.example"}},
        {"headers": {"Proxy-Authorization": "x"}},
        {"headers": {"Content-Length": "5"}},
        {"headers": {"Transfer-Encoding": "chunked"}},
        {"headers": {"Connection": "close"}},
        {"headers": {"X-Forwarded-For": "1.2.3.4"}},
        {"headers": {"Proxy-Connection": "x"}},
        {"headers": {"X-Ok": "line\r\nInjected: yes"}},
        {"headers": {"Bad Name": "x"}},
        {"headers": {f"X-H{n}": "v" for n in range(21)}},
        {"json": {"a": 1}, "body": "b"},
        {"method": "TRACE"},
        {"body": "x" * (256 * 1024 + 1)},
    ],
)
async def test_hostile_arguments_are_invalid_and_spend_nothing(
    api: Client, rt: Runtime, provider: Provider, extra: dict[str, Any]
) -> None:
    text = await refused(api, "call_api", ask(provider.base_url + "/echo/x", **extra))
    assert text.startswith("[invalid_argument] ")
    assert "evil.example" not in text and "mine" not in text
    assert await units(api) == {LISTING: 3} and provider.seen == []
    [event] = await events(rt, tool="call_api")
    assert event["code"] == "invalid_argument"


async def test_a_failed_exchange_refunds_the_unit_with_its_event(api: Client, rt: Runtime, provider: Provider) -> None:
    assert rt.tenant is not None
    rt.tenant.state.revoke_connection("auth0|demo-user", "github")
    text = await refused(api, "call_api", ask(provider.base_url + "/echo/x"))
    assert text.startswith("[account_not_connected] ")
    assert await units(api) == {LISTING: 3} and provider.seen == []
    [event] = await events(rt, tool="call_api")
    assert event["code"] == "account_not_connected" and event["args"]["reservation_id"].startswith("res_")
    assert await rt.db.read(check_invariants) == []


async def test_the_token_reaches_no_result_database_wal_or_debug_log(
    setup: Setup, provider: Provider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    runtime = await setup.start(TVM_LOG_LEVEL="DEBUG")
    results: list[Any] = []
    async with setup.client(runtime) as c:
        await ok(c, "buy_quota", {"listing_id": LISTING, "units": 2, "max_unit_price": 100})
        for path in ("/echo/x", "/token-in-body", "/token-in-header", "/unauthorized-once", "/status/500"):
            result = await c.call_tool("call_api", ask(provider.base_url + path))
            results.append(result.model_dump_json() + text_of(result))
        results.append((await c.call_tool("check_balance", {})).model_dump_json())
        exported = json.dumps(await events(runtime))
    tokens = [issue.access_token for issue in issued(runtime)]
    assert len(tokens) >= 2 and set(provider.tokens) <= set(tokens)
    stored = stored_bytes(setup.database)
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for token in tokens:
        assert token not in "".join(results)
        assert token.encode() not in stored
        assert token not in logs and token not in exported


async def test_a_grant_reservation_left_by_a_dead_process_is_refunded_at_start_as_a_call_api_event(
    setup: Setup, provider: Provider
) -> None:
    runtime = await setup.start()
    async with setup.client(runtime) as c:
        await ok(c, "buy_quota", {"listing_id": LISTING, "units": 1, "max_unit_price": 100})
    dead = f"{socket.gethostname()}:999999:0"  # a process of this machine that no longer runs

    def strand(tx: Any) -> None:  # what a process that died between reserving and opening its grant left
        ask_ = GrantAsk("auth0|demo-user", "token-vault-mcp-demo", "github", tuple(SCOPES), None, "GET",
                        provider.base_url + "/echo/x")
        reserved = grants.plan(tx, ask_, dead, setup.clock.now())
        assert reserved.reservation_id is not None
        tx.mark_reservation(reserved.reservation_id, "token-vault-mcp-demo", None, "call_api")

    await runtime.db.write(strand)
    assert await runtime.broker.recover_reservations() == 1
    [event] = await events(runtime, tool="call_api")
    assert (event["code"], event["scope"], event["agent"]) == ("vault_unavailable", "call:api", "token-vault-mcp-demo")
    assert event["args"]["reason"] == "owner process died"
    assert await runtime.db.read(lambda tx: [h.units_held for h in tx.holdings_of("auth0|demo-user")]) == [1]
    assert await runtime.db.read(check_invariants) == []


@pytest.mark.sqlite_only  # counts SQLite's changed rows per transaction
async def test_a_call_inside_a_grant_writes_in_one_transaction_only(
    api: Client, rt: Runtime, provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ok(api, "call_api", ask(provider.base_url + "/echo/open"))
    writing: list[int] = []
    real_write = rt.db.write
    connection = rt.db._conn._conn  # type: ignore[attr-defined]  # the SQLite connection under the store

    async def counted(job: Any) -> Any:
        def measured(tx: Any) -> Any:
            before = connection.total_changes
            try:
                return job(tx)
            finally:
                writing.append(connection.total_changes - before)

        return await real_write(measured)

    monkeypatch.setattr(rt.db, "write", counted)
    await ok(api, "call_api", ask(provider.base_url + "/echo/inside"))
    assert len(writing) == 2 and writing[0] == 0 and writing[1] > 0  # finding the grant writes nothing


async def test_calls_inside_a_grant_still_keep_the_agents_rate(
    api: Client, rt: Runtime, provider: Provider, clock: ManualClock
) -> None:
    import tomllib

    from server.policy import parse_policy

    await rt.broker.load_policy(parse_policy(tomllib.loads('[[agent]]\nid = "*"\ncalls_per_minute = 6')), by="t")
    answers = [await api.call_tool("call_api", ask(provider.base_url + "/echo/x")) for _ in range(12)]
    assert [a.is_error for a in answers] == [False] * 6 + [True] * 6
    assert all(a.content[0].text.startswith("[rate_limited] ") for a in answers[6:])  # type: ignore[union-attr]
    clock.advance(timedelta(seconds=10))
    await ok(api, "call_api", ask(provider.base_url + "/echo/x"))


async def test_nul_is_refused_in_text_arguments_but_a_json_body_goes_to_the_provider_as_given(
    api: Client, rt: Runtime, provider: Provider
) -> None:
    text = await refused(api, "call_api", ask(provider.base_url + "/echo/x", purpose="p\x00"))
    assert text == "[invalid_argument] invalid arguments: text may not contain NUL characters"
    sent = await ok(api, "call_api", ask(provider.base_url + "/echo/x", method="POST", json={"a": "b\x00c"}))
    assert sent["status"] == 200 and provider.seen[-1].body == b'{"a":"b\\u0000c"}'
    [refusal] = [e for e in await events(rt, tool="call_api") if e["code"] == "invalid_argument"]
    assert refusal["args"]["purpose"] == "p\\x00"  # stored escaped, never as NUL
