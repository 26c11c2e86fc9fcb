"""The Auth0 client against the emulator: client authentication, one deadline, which failures are retried
and how long it waits."""

from __future__ import annotations

import base64
import json
import time

import pytest

from server.auth0.client import CIBA_GRANT, TOKEN_VAULT_GRANT, Auth0Error, RetryPolicy, renew_at
from server.errors import ConfigError
from tests.server.tenant import (
    AUDIENCE,
    BROKER_ID,
    BROKER_SECRET,
    METHODS,
    NATIVE_ID,
    SCOPES,
    USER,
    Sleeps,
    auth0_client,
    make_tenant,
    other_key,
    token_requests,
    user_subject,
)


@pytest.mark.parametrize("method", METHODS)
async def test_every_client_authentication_method_is_accepted(method: str) -> None:
    state = make_tenant()
    auth0 = auth0_client(state, method=method)
    try:
        refreshed = await auth0.refresh(state.issue_refresh_token(USER, BROKER_ID, SCOPES, AUDIENCE))
        vault = await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    assert refreshed.access_token and vault.scope == "repo:read"
    sent = token_requests(state)
    assert [r.auth_method for r in sent] == [method, method]
    assert all(r.client_id == BROKER_ID for r in sent)
    for request in sent:
        if method == "client_secret_post":
            assert request.fields["client_secret"] == BROKER_SECRET and "authorization" not in request.headers
        elif method == "client_secret_basic":
            assert "client_secret" not in request.fields
            basic = base64.b64decode(request.headers["authorization"].split()[1])
            assert basic == f"{BROKER_ID}:{BROKER_SECRET}".encode()
        else:
            assert "client_secret" not in request.fields and "authorization" not in request.headers
            assert request.fields["client_assertion"].count(".") == 2
    if method == "private_key_jwt":  # single-use assertions: each request signed its own
        assert sent[0].fields["client_assertion"] != sent[1].fields["client_assertion"]


@pytest.mark.parametrize(
    ("method", "wrong"),
    [("client_secret_post", {"secret": "wrong"}), ("client_secret_basic", {"secret": "wrong"}),
     ("private_key_jwt", {"key": None})],
    ids=["post-wrong-secret", "basic-wrong-secret", "jwt-wrong-key"],
)
async def test_wrong_secret_or_key_is_refused_once_without_retry(method: str, wrong: dict[str, object]) -> None:
    state = make_tenant()
    sleeps = Sleeps()
    options = {**wrong, "key": other_key()} if method == "private_key_jwt" else wrong
    auth0 = auth0_client(state, method=method, sleep=sleeps, **options)  # type: ignore[arg-type]
    try:
        with pytest.raises(Auth0Error) as caught:
            await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    assert caught.value.status == 401 and caught.value.client_auth_failed
    assert not caught.value.retryable
    assert len(state.requests) == 1 and state.requests[0].client_id is None
    assert sleeps.calls == []


async def test_a_key_file_that_is_not_a_pem_key_is_a_configuration_error() -> None:
    from server.auth0.client import Auth0Client

    with pytest.raises(ConfigError, match="TVM_CLIENT_KEY_FILE"):
        Auth0Client("https://tenant.test", "c", auth_method="private_key_jwt", private_key_pem=b"not a key")


async def test_server_errors_are_retried_with_growing_jittered_pauses_then_succeed() -> None:
    state = make_tenant()
    state.faults.fail_next(503)
    state.faults.fail_next(502)
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps, max_attempts=3, backoff=0.1)
    try:
        token = await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    assert token.scope == "repo:read"
    assert len(token_requests(state, TOKEN_VAULT_GRANT)) == 3
    first, second = sleeps.calls
    assert 0.05 <= first <= 0.1 and 0.1 <= second <= 0.2


async def test_server_errors_give_up_after_the_last_attempt() -> None:
    state = make_tenant()
    state.faults.fail_next(503, count=10)
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps, max_attempts=4)
    try:
        with pytest.raises(Auth0Error) as caught:
            await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    assert caught.value.status == 503
    assert len(state.requests) == 4 and len(sleeps.calls) == 3


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, "invalid_request"), (401, "invalid_grant"), (403, "access_denied"), (403, "unauthorized_client"),
     (404, "not_found")],
)
async def test_other_client_errors_are_final_at_once(status: int, error: str) -> None:
    state = make_tenant()
    state.faults.fail_next(status, error=error, description="no")
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps)
    try:
        with pytest.raises(Auth0Error) as caught:
            await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    assert (caught.value.status, caught.value.error) == (status, error)
    assert len(state.requests) == 1 and sleeps.calls == []


async def test_rate_limit_is_retried_no_sooner_than_retry_after() -> None:
    state = make_tenant()
    state.faults.rate_limit_next(retry_after=1, reset_in=None)
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps, deadline=10)
    try:
        await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    [pause] = sleeps.calls
    assert 1.0 <= pause <= 1.1
    assert len(state.requests) == 2


async def test_rate_limit_is_retried_no_sooner_than_the_rate_limit_reset() -> None:
    state = make_tenant(clock=lambda: time.time())
    state.faults.rate_limit_next(reset_in=2, retry_after=None)
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps, deadline=10)
    try:
        await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    [pause] = sleeps.calls
    assert 1.0 <= pause <= 2.1  # the header is whole UNIX seconds
    assert "retry-after" not in {k.lower() for k in state.requests[0].headers}


@pytest.mark.parametrize("header", ["retry_after", "reset_in"])
async def test_a_rate_limit_wait_longer_than_allowed_is_answered_at_once_with_the_wait(header: str) -> None:
    state = make_tenant()
    state.faults.rate_limit_next(count=5, **({"retry_after": 30, "reset_in": None} if header == "retry_after"
                                             else {"retry_after": None, "reset_in": 30}))
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps, deadline=10)  # waits of up to 2.5 s are worth holding the call
    try:
        with pytest.raises(Auth0Error) as caught:
            await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    assert caught.value.status == 429
    assert 28 <= caught.value.wait_seconds <= 30
    assert len(state.requests) == 1 and sleeps.calls == []


async def test_a_rate_limit_wait_past_the_deadline_is_answered_at_once() -> None:
    state = make_tenant()
    state.faults.rate_limit_next(count=5, retry_after=2, reset_in=None)
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps, deadline=1.5, max_wait=60)
    try:
        with pytest.raises(Auth0Error) as caught:
            await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    assert caught.value.wait_seconds == 2
    assert len(state.requests) == 1 and sleeps.calls == []


async def test_device_flow_slow_down_is_not_retried_by_the_client() -> None:
    state = make_tenant()
    state.faults.fail_next(429, error="slow_down", description="You are polling faster than allowed.")
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps)
    try:
        with pytest.raises(Auth0Error) as caught:
            await auth0.poll_device_login(NATIVE_ID, "code")
    finally:
        await auth0.aclose()
    assert caught.value.error == "slow_down"
    assert len(state.requests) == 1 and sleeps.calls == []


async def test_a_connection_reset_is_retried() -> None:
    state = make_tenant()
    state.faults.reset_next()
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps)
    try:
        token = await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    assert token.access_token
    assert len(state.requests) == 2 and len(sleeps.calls) == 1


async def test_malformed_json_is_unreadable_and_not_retried() -> None:
    state = make_tenant()
    state.faults.malformed_next()
    auth0 = auth0_client(state)
    try:
        with pytest.raises(Auth0Error) as caught:
            await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    assert caught.value.status == 200 and not caught.value.retryable
    assert len(state.requests) == 1


@pytest.mark.parametrize("fault", ["hang", "latency"])
async def test_a_hanging_or_slow_tenant_never_holds_an_operation_past_its_deadline(fault: str) -> None:
    state = make_tenant()
    if fault == "hang":
        state.faults.hang_next(count=10)
    else:
        state.faults.latency = 30
    auth0 = auth0_client(state, deadline=0.4)
    started = time.monotonic()
    try:
        with pytest.raises(Auth0Error) as caught:
            await auth0.exchange(user_subject(state), "github", ["repo:read"])
    finally:
        await auth0.aclose()
    elapsed = time.monotonic() - started
    assert caught.value.unreachable and "in time" in str(caught.value)
    assert 0.3 <= elapsed < 0.8
    assert len(state.requests) == 2  # half the deadline each: a hung attempt leaves room for one more


def test_backoff_doubles_with_equal_jitter_and_is_capped() -> None:
    policy = RetryPolicy(backoff=0.1, max_backoff=0.3)
    assert [policy.backoff_for(n, 0.0) for n in (1, 2, 3, 4)] == [0.05, 0.1, 0.15, 0.15]
    assert [policy.backoff_for(n, 0.999999) for n in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.3])
    assert RetryPolicy(deadline=8).per_attempt == 4 and RetryPolicy(deadline=8).longest_wait == 2


def test_tokens_renew_a_minute_early_or_halfway_when_short_lived() -> None:
    assert renew_at(0, 3600) == 3540
    assert renew_at(0, 60) == 30


# ---- CIBA ---------------------------------------------------------------------------------------

DETAILS = [{"type": "token_vault_grant", "connection": "github", "scopes": ["repo:read"]}]
AUTH_FIELDS = {"client_id", "client_secret", "client_assertion", "client_assertion_type"}


@pytest.mark.parametrize("method", METHODS)
async def test_bc_authorize_sends_exactly_the_ciba_fields_with_the_client_authentication(method: str) -> None:
    state = make_tenant()
    auth0 = auth0_client(state, method=method)
    try:
        started = await auth0.bc_authorize(
            login_sub=USER, binding_message="Approve agent-x: github", authorization_details=DETAILS,
            requested_expiry=120,
        )
        tokens = await auth0.poll_ciba(started.auth_req_id)
    finally:
        await auth0.aclose()
    sent = state.requests[0]
    assert sent.path == "/bc-authorize" and (sent.client_id, sent.auth_method) == (BROKER_ID, method)
    fields = {name: value for name, value in sent.fields.items() if name not in AUTH_FIELDS}
    assert fields == {
        "scope": "openid",
        "login_hint": json.dumps({"format": "iss_sub", "iss": "https://tenant.test/", "sub": USER},
                                 separators=(",", ":")),
        "binding_message": "Approve agent-x: github",
        "requested_expiry": "120",
        "authorization_details": json.dumps(DETAILS, separators=(",", ":")),
    }
    assert (started.expires_in, started.interval) == (120, 5) and started.auth_req_id not in repr(started)
    poll = state.requests[1]
    assert (poll.grant_type, poll.fields["auth_req_id"], poll.auth_method) == (CIBA_GRANT, started.auth_req_id, method)
    assert tokens.access_token and tokens.scope == "openid"


async def test_bc_authorize_leaves_out_empty_authorization_details() -> None:
    state = make_tenant()
    auth0 = auth0_client(state)
    try:
        await auth0.bc_authorize(login_sub=USER, binding_message="Approve x: github", authorization_details=[],
                                 requested_expiry=60)
    finally:
        await auth0.aclose()
    assert "authorization_details" not in state.requests[0].fields


async def test_ciba_pending_and_slow_down_are_answers_for_the_poller_not_retried() -> None:
    state = make_tenant()
    state.ciba_mode = "manual"
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps)
    try:
        started = await auth0.bc_authorize(login_sub=USER, binding_message="Approve x: github",
                                           authorization_details=DETAILS, requested_expiry=60)
        state.ciba_requests[started.auth_req_id].last_poll -= 5  # as if the interval had passed
        with pytest.raises(Auth0Error) as pending:
            await auth0.poll_ciba(started.auth_req_id)
        with pytest.raises(Auth0Error) as slow:
            await auth0.poll_ciba(started.auth_req_id)
    finally:
        await auth0.aclose()
    assert (pending.value.status, pending.value.error, pending.value.interval) == (400, "authorization_pending", None)
    assert (slow.value.status, slow.value.error, slow.value.interval) == (400, "slow_down", 10)
    assert not pending.value.retryable and not slow.value.retryable
    assert len(token_requests(state, CIBA_GRANT)) == 2 and sleeps.calls == []


async def test_a_ciba_slow_down_with_retry_after_carries_the_wait() -> None:
    state = make_tenant()
    state.faults.fail_next(429, error="slow_down", description="slow down", retry_after=12)
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps)
    try:
        with pytest.raises(Auth0Error) as caught:
            await auth0.poll_ciba("some-id")
    finally:
        await auth0.aclose()
    assert (caught.value.error, caught.value.retry_after, caught.value.interval) == ("slow_down", 12, None)
    assert len(state.requests) == 1 and sleeps.calls == []


async def test_bc_authorize_and_ciba_polls_retry_server_errors_within_the_deadline() -> None:
    state = make_tenant()
    state.faults.fail_next(503)
    sleeps = Sleeps()
    auth0 = auth0_client(state, sleep=sleeps)
    try:
        started = await auth0.bc_authorize(login_sub=USER, binding_message="Approve x: github",
                                           authorization_details=DETAILS, requested_expiry=60)
        state.faults.reset_next()
        tokens = await auth0.poll_ciba(started.auth_req_id)
    finally:
        await auth0.aclose()
    assert [r.path for r in state.requests] == ["/bc-authorize"] * 2 + ["/oauth/token"] * 2
    assert tokens.access_token and len(sleeps.calls) == 2
