"""Human approval through CIBA against the emulator in process: the request's exact fields, approval,
denial, timeout, interval and slow_down honoured on one fake timeline, Auth0's refusals and outages,
and binding messages that stay valid for any agent name."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.approval import authorization_details, await_approval, binding_message
from server.auth0.client import Auth0Client, RetryPolicy
from server.emulator import EmulatorState
from server.errors import ApprovalDenied, ApprovalTimeout, BrokerError, RateLimited, VaultUnavailable
from tests.server.tenant import BROKER_ID, BROKER_SECRET, ISSUER, USER, Sleeps, make_tenant, transport

AUTH0_CHARSET = re.compile(r"[A-Za-z0-9 +\-_.,:#]{1,64}")
AUTH_FIELDS = {"client_id", "client_secret"}


class Timeline:
    """One clock for the tenant and the poller; only the poller's sleeps move it."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Polls(httpx.AsyncBaseTransport):
    """The tenant's transport, noting when (on the timeline) each request was sent."""

    def __init__(self, state: EmulatorState, clock: Timeline) -> None:
        self._inner = transport(state)
        self._clock = clock
        self.sent: list[tuple[float, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((self._clock(), request.url.path))
        return await self._inner.handle_async_request(request)

    def poll_gaps(self) -> list[float]:
        """Seconds from each request to the next (bc-authorize to first poll, then poll to poll)."""
        times = [at for at, _ in self.sent]
        return [later - earlier for earlier, later in itertools.pairwise(times)]


class Setup:
    def __init__(self, mode: str = "approve") -> None:
        self.clock = Timeline()
        self.state = make_tenant(clock=self.clock)
        self.state.ciba_mode = mode  # type: ignore[assignment]
        self.polls = Polls(self.state, self.clock)
        self.auth0 = Auth0Client(
            ISSUER, BROKER_ID, BROKER_SECRET, transport=self.polls, retry=RetryPolicy(deadline=2), sleep=Sleeps()
        )
        self.progress: list[tuple[float, float | None, str]] = []
        self.on_progress: Callable[[], None] | None = None

    async def report(self, elapsed: float, total: float | None, message: str) -> None:
        self.progress.append((elapsed, total, message))
        if self.on_progress is not None:
            self.on_progress()

    async def wait(self, timeout: int = 60, **overrides: Any) -> None:
        args: dict[str, object] = {
            "account": USER, "agent": "agent-x", "connection": "github", "scopes": ["repo:read"],
            "purpose": "read the README", "timeout": timeout, "progress": self.report,
            "sleep": self.clock.sleep, "clock": self.clock, **overrides,
        }
        try:
            await await_approval(self.auth0, **args)  # type: ignore[arg-type]
        finally:
            await self.auth0.aclose()

    def pending_id(self) -> str:
        (grant,) = self.state.ciba_requests.values()
        return grant.auth_req_id


def once(setup: Setup, action: Callable[[], None]) -> None:
    """Run `action` at the first progress report: after /bc-authorize answered, before the first poll."""
    if len(setup.progress) == 1:
        action()


async def refused(setup: Setup, error: type[BrokerError], **overrides: Any) -> BrokerError:
    with pytest.raises(error) as caught:
        await setup.wait(**overrides)
    message = caught.value.message
    assert "your unit was refunded" in message
    for grant in setup.state.ciba_requests.values():
        assert grant.auth_req_id not in message
    return caught.value


# ---- the request --------------------------------------------------------------------------------

async def test_an_approval_returns_after_one_poll_one_interval_later() -> None:
    setup = Setup()

    await setup.wait()

    assert [path for _, path in setup.polls.sent] == ["/bc-authorize", "/oauth/token"]
    assert setup.polls.poll_gaps() == [5]
    assert setup.state.ciba_requests[setup.pending_id()].status == "consumed"


async def test_the_bc_authorize_request_carries_exactly_the_spec_fields() -> None:
    setup = Setup()

    await setup.wait(timeout=300)

    sent = setup.state.requests[0]
    assert sent.path == "/bc-authorize" and sent.client_id == BROKER_ID
    fields = {name: value for name, value in sent.fields.items() if name not in AUTH_FIELDS}
    assert set(fields) == {"scope", "login_hint", "binding_message", "requested_expiry", "authorization_details"}
    assert fields["scope"] == "openid"
    assert json.loads(fields["login_hint"]) == {"format": "iss_sub", "iss": ISSUER, "sub": USER}
    assert fields["binding_message"] == "Approve agent-x: github"
    assert fields["requested_expiry"] == "300"
    assert json.loads(fields["authorization_details"]) == [
        {"type": "token_vault_grant", "connection": "github", "scopes": ["repo:read"], "agent": "agent-x",
         "purpose": "read the README"}
    ]


async def test_a_call_api_approval_is_bound_to_its_method_and_url() -> None:
    setup = Setup()

    await setup.wait(method="POST", url="https://api.github.com/repos/o/r/issues")

    (detail,) = json.loads(setup.state.requests[0].fields["authorization_details"])
    assert (detail["method"], detail["url"]) == ("POST", "https://api.github.com/repos/o/r/issues")


# ---- the answers --------------------------------------------------------------------------------

async def test_a_denial_is_approval_denied() -> None:
    setup = Setup("deny")

    error = await refused(setup, ApprovalDenied)

    assert "declined" in error.message and "github" in error.message
    assert error.render().startswith("[approval_denied] ")


async def test_a_denial_while_waiting_is_approval_denied_before_the_expiry() -> None:
    setup = Setup("manual")
    setup.on_progress = lambda: setup.state.deny_ciba(setup.pending_id()) if len(setup.progress) == 3 else None

    await refused(setup, ApprovalDenied, timeout=60)

    assert setup.clock.now - setup.polls.sent[0][0] < 60


async def test_an_approval_while_waiting_returns() -> None:
    setup = Setup("manual")
    setup.on_progress = lambda: setup.state.approve_ciba(setup.pending_id()) if len(setup.progress) == 2 else None

    await setup.wait()

    assert len(setup.polls.sent) == 3


async def test_no_answer_by_the_expiry_is_approval_timeout_and_never_an_early_poll() -> None:
    setup = Setup("manual")

    error = await refused(setup, ApprovalTimeout, timeout=12)

    assert "12 seconds" in error.message and error.render().startswith("[approval_timeout] ")
    assert setup.polls.poll_gaps() == [5, 5, 5]  # the last poll (at 15 s) hears the expiry as access_denied
    assert setup.clock.now - setup.polls.sent[0][0] <= 12 + 5


async def test_progress_is_reported_after_the_request_and_every_pending_poll() -> None:
    setup = Setup("manual")

    await refused(setup, ApprovalTimeout, timeout=12)

    assert [elapsed for elapsed, _, _ in setup.progress] == [0, 5, 10]
    assert all(total == 12 and "github" in message for _, total, message in setup.progress)


async def test_a_slow_down_with_a_new_interval_is_honoured_from_then_on() -> None:
    setup = Setup("manual")

    def skew_once() -> None:  # the tenant got the request a second late, so the first poll looks early to it
        if len(setup.progress) == 1:
            setup.state.ciba_requests[setup.pending_id()].last_poll += 1

    setup.on_progress = skew_once
    await refused(setup, ApprovalTimeout, timeout=40)

    assert setup.polls.poll_gaps() == [5, 10, 10, 10, 10]  # slow_down at 5 s said interval 10
    assert setup.state.ciba_requests[setup.pending_id()].interval == 10


async def test_a_slow_down_with_retry_after_waits_it_out_and_grows_the_interval_by_five() -> None:
    setup = Setup()
    setup.state.ciba_approve_after = 30
    setup.on_progress = lambda: once(setup, lambda: setup.state.faults.fail_next(
        400, error="slow_down", description="slow down", retry_after=12))

    await setup.wait()

    assert setup.polls.poll_gaps() == [5, 12, 10, 10]


async def test_a_bare_slow_down_grows_the_interval_by_five() -> None:
    setup = Setup()
    setup.state.ciba_approve_after = 14
    setup.on_progress = lambda: once(setup, lambda: setup.state.faults.fail_next(
        400, error="slow_down", description="slow down"))

    await setup.wait()

    assert setup.polls.poll_gaps() == [5, 10]


async def test_a_retry_after_beyond_the_expiry_ends_the_wait_at_once_as_rate_limited() -> None:
    setup = Setup("manual")
    setup.on_progress = lambda: once(setup, lambda: setup.state.faults.fail_next(
        400, error="slow_down", description="slow down", retry_after=3600))

    error = await refused(setup, RateLimited, timeout=30)

    assert isinstance(error, RateLimited) and error.retry_after == 3600
    assert setup.clock.now - setup.polls.sent[0][0] == 5


# ---- Auth0 refusing or away ---------------------------------------------------------------------

async def test_bc_authorize_refusing_the_user_is_approval_denied_with_auth0s_reason() -> None:
    setup = Setup()

    error = await refused(setup, ApprovalDenied, account="auth0|nobody")

    assert "invalid_request: The login_hint does not name a user of this tenant." in error.message
    assert len(setup.polls.sent) == 1


async def test_auth0s_reason_is_bounded_and_stripped_of_control_characters() -> None:
    setup = Setup()
    description = "no device \x1b[31menrolled\u202e\n" + "x" * 1000
    setup.state.faults.fail_next(400, error="invalid_request", description=description)

    error = await refused(setup, ApprovalDenied)

    assert "no device [31menrolled x" in error.message
    assert not any(ch in error.message for ch in "\x1b\u202e\n") and len(error.message) < 400


async def test_auth0_unreachable_when_asking_is_vault_unavailable() -> None:
    setup = Setup()
    setup.state.faults.reset_next(count=10)

    error = await refused(setup, VaultUnavailable)

    assert "approval" in error.message


async def test_auth0_failing_while_polling_is_vault_unavailable() -> None:
    setup = Setup("manual")

    setup.on_progress = lambda: once(setup, lambda: setup.state.faults.fail_next(503, count=10))
    error = await refused(setup, VaultUnavailable)

    assert "waiting for approval" in error.message


async def test_auth0_rate_limiting_the_request_is_rate_limited() -> None:
    setup = Setup()
    setup.state.faults.rate_limit_next(count=3, reset_in=None, retry_after=30)

    error = await refused(setup, RateLimited)

    assert isinstance(error, RateLimited) and error.retry_after == 30


async def test_another_refusal_while_polling_is_approval_denied_with_the_code() -> None:
    setup = Setup("manual")
    setup.on_progress = lambda: once(setup, setup.state.ciba_requests.clear)  # the tenant forgot the request

    error = await refused(setup, ApprovalDenied)

    assert "invalid_grant" in error.message


# ---- binding message and authorization details ---------------------------------------------------

def test_binding_messages_name_agent_and_connection() -> None:
    assert binding_message("agent-x", "github") == "Approve agent-x: github"
    assert binding_message(None, "google-oauth2") == "Approve access to google-oauth2"
    assert binding_message("Café Bot", "github") == "Approve Cafe-Bot: github"
    assert binding_message("x: stripe, y", "github") == "Approve x-stripe-y: github"
    assert binding_message("\x1b[31m\u202e", "github") == "Approve 31m: github"
    assert binding_message("日本語", "github") == "Approve an agent: github"
    long = binding_message("a" * 500, "github")
    assert len(long) == 64 and long.endswith(": github")


@given(agent=st.one_of(st.none(), st.text(max_size=300)), connection=st.text(max_size=100))
def test_binding_messages_are_valid_for_auth0_for_any_names(agent: str | None, connection: str) -> None:
    message = binding_message(agent, connection)

    assert AUTH0_CHARSET.fullmatch(message), message
    assert message.startswith("Approve ")
    if agent is not None:
        assert message.count(":") == 1  # no name can fake a second "agent: connection" pair


@given(
    agent=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,28}[A-Za-z0-9]", fullmatch=True),
    connection=st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True),
)
def test_plain_names_appear_verbatim(agent: str, connection: str) -> None:
    def collapsed(name: str) -> str:
        return re.sub(r"-{2,}", "-", name)

    assert binding_message(agent, connection) == f"Approve {collapsed(agent)}: {collapsed(connection)}"


def test_authorization_details_hold_the_one_token_vault_grant_object() -> None:
    plain = authorization_details(connection="github", scopes=["repo:read"], agent=None, purpose="why\x00 not\u202e")
    call = authorization_details(connection="github", scopes=["repo"], agent="a", purpose="p" * 500,
                                 method="DELETE", url="https://api.github.com/x")

    assert plain == {"type": "token_vault_grant", "connection": "github", "scopes": ["repo:read"], "agent": None,
                     "purpose": "why not"}
    assert (call["method"], call["url"], len(call["purpose"])) == ("DELETE", "https://api.github.com/x", 200)


async def test_a_timeout_under_one_second_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        await Setup().wait(timeout=0)
