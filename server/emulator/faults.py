"""Switches that make the tenant misbehave, so the broker's retry, rate-limit and timeout paths run.

Faults apply to the POST endpoints (`/oauth/token`, `/oauth/device/code`, `/oauth/revoke`,
`/bc-authorize`); a faulted request is still recorded in `state.requests`, so tests can count the
broker's attempts.

Two ways to fault a request, queued faults first:

- a queue of one-shot faults for the next requests (`fail_next`, `rate_limit_next`,
  `reset_next`, `hang_next`, `malformed_next`), for tests that need an exact script;
- rates (`FaultSettings`): each request independently fails with a fraction of 5xx, 429,
  connection resets, hangs or malformed JSON, for `token-vault-mcp emulator --fail-rate …`
  and soak tests. A seeded generator keeps a run repeatable.

Kinds of fault and what the client sees:

    status      an Auth0-shaped error with a 4xx/5xx status
    rate_limit  429 `too_many_requests` with `Retry-After` and/or `x-ratelimit-*`
    reset       the connection drops after the response started (a reset mid-answer)
    hang        no answer at all, until the client gives up and disconnects
    malformed   200 with a body that is not JSON (a proxy's or a half-written answer)
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FaultKind = Literal["status", "rate_limit", "reset", "hang", "malformed"]


@dataclass(frozen=True)
class Fault:
    """One canned failure answer."""

    status: int
    error: str
    description: str
    # Seconds until the limit resets (x-ratelimit-reset = now + this); 429 only.
    reset_in: int | None = None
    # Seconds for a Retry-After header; None sends none (Auth0 relies on x-ratelimit-reset).
    retry_after: int | None = None
    kind: FaultKind = "status"


SERVER_ERROR = ("server_error", "Service temporarily unavailable.")
RESET = Fault(0, "connection_reset", "The connection was reset.", kind="reset")
HANG = Fault(0, "hang", "No answer.", kind="hang")
MALFORMED = Fault(200, "malformed", "The body is not JSON.", kind="malformed")


def rate_limit_fault(reset_in: int | None, retry_after: int | None) -> Fault:
    """A 429 as Auth0 sends it: `x-ratelimit-reset` and/or `Retry-After`."""
    return Fault(429, "too_many_requests", "Global limit has been reached", reset_in, retry_after, "rate_limit")


class FaultSettings(BaseModel):
    """Per-request fault rates and latency; the body of `POST /emulator/faults` and the CLI flags.

    Rates are fractions of requests (0 to 1, together at most 1). Fields left out keep
    their current value when applied with `Faults.configure`.
    """

    model_config = ConfigDict(extra="forbid")

    latency: float | None = Field(default=None, ge=0, le=600, description="seconds added before every answer")
    fail_rate: float | None = Field(default=None, ge=0, le=1, description="fraction answered with a 5xx")
    fail_status: int | None = Field(default=None, ge=500, le=599, description="the 5xx status to answer")
    rate_limit_rate: float | None = Field(default=None, ge=0, le=1, description="fraction answered with 429")
    retry_after: int | None = Field(default=None, ge=0, le=3600, description="Retry-After seconds on a 429")
    reset_in: int | None = Field(default=None, ge=0, le=3600, description="x-ratelimit-reset = now + this")
    reset_rate: float | None = Field(default=None, ge=0, le=1, description="fraction whose connection drops")
    hang_rate: float | None = Field(default=None, ge=0, le=1, description="fraction never answered")
    malformed_rate: float | None = Field(default=None, ge=0, le=1, description="fraction answered with bad JSON")
    seed: int | None = Field(default=None, description="seed of the generator that draws faults")

    @model_validator(mode="after")
    def _rates_fit(self) -> FaultSettings:
        rates = (self.fail_rate, self.rate_limit_rate, self.reset_rate, self.hang_rate, self.malformed_rate)
        if sum(r or 0.0 for r in rates) > 1.0 + 1e-9:
            raise ValueError("the fault rates add up to more than 1")
        return self


class Faults:
    """Queued failures for the next requests, fault rates, and a latency added to every request."""

    def __init__(self) -> None:
        # Seconds to wait before answering any request; more than the client's timeout makes a timeout.
        self.latency: float = 0.0
        self.fail_rate = 0.0
        self.fail_status = 503
        self.rate_limit_rate = 0.0
        self.retry_after: int | None = None
        self.reset_in: int | None = 1
        self.reset_rate = 0.0
        self.hang_rate = 0.0
        self.malformed_rate = 0.0
        self._random = random.Random()  # noqa: S311 - fault injection, not cryptography
        self._queue: deque[Fault] = deque()

    # ---- one-shot faults ------------------------------------------------------------------
    def fail_next(
        self,
        status: int = 503,
        *,
        count: int = 1,
        error: str = SERVER_ERROR[0],
        description: str = SERVER_ERROR[1],
        retry_after: int | None = None,
    ) -> None:
        """Answer the next `count` requests with `status` and an Auth0-shaped error (with a
        `Retry-After` header when `retry_after` is set, e.g. on CIBA's `slow_down`)."""
        fault = Fault(status, error, description, retry_after=retry_after)
        self._queue.extend(fault for _ in range(count))

    def rate_limit_next(self, *, count: int = 1, reset_in: int | None = 1, retry_after: int | None = None) -> None:
        """Answer the next `count` requests with 429 `too_many_requests` and rate-limit headers.

        `reset_in=None` leaves out the `x-ratelimit-*` headers, `retry_after=None` the `Retry-After`.
        """
        self._queue.extend(rate_limit_fault(reset_in, retry_after) for _ in range(count))

    def reset_next(self, count: int = 1) -> None:
        """Drop the connection of the next `count` requests after their response started."""
        self._queue.extend(RESET for _ in range(count))

    def hang_next(self, count: int = 1) -> None:
        """Never answer the next `count` requests (until the client disconnects)."""
        self._queue.extend(HANG for _ in range(count))

    def malformed_next(self, count: int = 1) -> None:
        """Answer the next `count` requests 200 with a body that is not JSON."""
        self._queue.extend(MALFORMED for _ in range(count))

    # ---- rates ---------------------------------------------------------------------------
    def configure(self, settings: FaultSettings) -> None:
        """Apply the fields `settings` sets; the others keep their value.

        Raises ValueError when the resulting rates add up to more than 1.
        """
        values = settings.model_dump(exclude_none=True)
        seed = values.pop("seed", None)
        merged = {**self.settings().model_dump(), **values}
        FaultSettings.model_validate(merged)  # the combination, not only the new fields, must fit
        for name, value in values.items():
            setattr(self, name, value)
        if seed is not None:
            self._random.seed(seed)

    def settings(self) -> FaultSettings:
        """The current rates and latency."""
        return FaultSettings(
            latency=self.latency,
            fail_rate=self.fail_rate,
            fail_status=self.fail_status,
            rate_limit_rate=self.rate_limit_rate,
            retry_after=self.retry_after,
            reset_in=self.reset_in,
            reset_rate=self.reset_rate,
            hang_rate=self.hang_rate,
            malformed_rate=self.malformed_rate,
        )

    # ---- per request ---------------------------------------------------------------------
    def take(self) -> Fault | None:
        """The fault for this request: the next queued one, else one drawn from the rates, else None."""
        if self._queue:
            return self._queue.popleft()
        draw = self._random.random()
        for rate, fault in (
            (self.fail_rate, Fault(self.fail_status, *SERVER_ERROR)),
            (self.rate_limit_rate, rate_limit_fault(self.reset_in, self.retry_after)),
            (self.reset_rate, RESET),
            (self.hang_rate, HANG),
            (self.malformed_rate, MALFORMED),
        ):
            if draw < rate:
                return fault
            draw -= rate
        return None

    @property
    def pending(self) -> int:
        """How many one-shot faults are still queued."""
        return len(self._queue)

    def clear(self) -> None:
        """Forget queued faults, rates and latency."""
        self._queue.clear()
        self.latency = 0.0
        self.fail_rate = self.rate_limit_rate = self.reset_rate = self.hang_rate = self.malformed_rate = 0.0
