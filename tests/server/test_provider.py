"""The provider client against a real loopback provider: no redirects, the token scrubbed, bodies bounded."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.provider import ProviderAnswer, ProviderClient, ProviderRequest, ProviderUnreachable
from tests.server.provider_harness import Provider, body_json, provider_api

TOKEN = "gho_canary" + "x" * 30


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    async with provider_api() as p:
        yield p


async def send(provider: Provider, path: str, *, method: str = "GET", max_bytes: int = 4096, timeout: float = 5,
               **kw: Any) -> ProviderAnswer:
    client = ProviderClient(timeout=timeout, max_bytes=max_bytes)
    try:
        return await client.send(ProviderRequest(method, provider.base_url + path, **kw), TOKEN)
    finally:
        await client.aclose()


async def test_the_request_carries_the_token_the_method_body_and_the_agents_headers(provider: Provider) -> None:
    answer = await send(provider, "/echo/repos?per_page=5", method="POST", headers=[("accept", "application/json")],
                        content=b'{"a":1}', content_type="application/json")
    [seen] = provider.seen
    assert seen.token == TOKEN and seen.method == "POST" and seen.body == b'{"a":1}'
    assert seen.headers["accept"] == "application/json" and seen.headers["content-type"] == "application/json"
    assert answer.status == 200 and answer.body_encoding == "text" and not answer.truncated
    assert body_json(answer.body)["query"] == "per_page=5"
    # only the headers SPEC §8 names reach the agent
    assert sorted(answer.headers) == ["content-length", "content-type", "etag", "x-ratelimit-remaining"]
    assert answer.headers["x-ratelimit-remaining"] == "42" and answer.headers["etag"] == '"v1"'


async def test_the_token_is_redacted_in_answer_headers_and_body(provider: Provider) -> None:
    headed = await send(provider, "/token-in-header")
    assert TOKEN not in str(headed.headers) and headed.headers["etag"] == "[redacted]"
    assert headed.headers["link"] == "<https://p.example/?t=[redacted]>"
    bodied = await send(provider, "/token-in-body")
    assert bodied.body == "you sent [redacted] and again [redacted]."
    zipped = await send(provider, "/gzip")
    assert zipped.body == "zipped [redacted]"


async def test_a_body_over_the_limit_is_cut_and_flagged_and_a_token_across_the_cut_is_still_redacted(
    provider: Provider,
) -> None:
    small = await send(provider, "/big?n=1000", max_bytes=1000)
    assert not small.truncated and small.body == "a" * 1000
    cut = await send(provider, "/big?n=5000", max_bytes=1000)
    assert cut.truncated and cut.body == "a" * 1000
    straddling = await send(provider, "/big?n=1000&token=1", max_bytes=500)
    assert straddling.truncated and TOKEN[:10] not in straddling.body and "[redacted]" in straddling.body


async def test_binary_bodies_come_back_as_base64(provider: Provider) -> None:
    answer = await send(provider, "/binary")
    assert answer.body_encoding == "base64"
    assert base64.b64decode(answer.body) == bytes(range(256))


async def test_a_redirect_is_returned_not_followed(provider: Provider) -> None:
    async with provider_api() as elsewhere:
        answer = await send(provider, f"/redirect?to={elsewhere.base_url}/stolen")
        assert answer.status == 302
        assert answer.headers["location"] == f"{elsewhere.base_url}/stolen"
        assert elsewhere.seen == []  # the other host saw no request, so no token


async def test_a_hanging_provider_is_unreachable_within_the_timeout(provider: Provider) -> None:
    started = time.monotonic()
    with pytest.raises(ProviderUnreachable, match=r"within 0\.5 s"):
        await send(provider, "/hang", timeout=0.5)
    assert time.monotonic() - started < 2


async def test_a_closed_port_is_unreachable_without_leaking_the_token() -> None:
    client = ProviderClient(timeout=2, max_bytes=100)
    try:
        with pytest.raises(ProviderUnreachable) as caught:
            await client.send(ProviderRequest("GET", "http://127.0.0.1:9/x"), TOKEN)
    finally:
        await client.aclose()
    assert TOKEN not in str(caught.value)


async def test_proxy_settings_in_the_environment_are_ignored(
    provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    answer = await send(provider, "/echo/x")
    assert answer.status == 200
