"""Switches that make the tenant misbehave, so the broker's retry, rate-limit and timeout paths run.

Faults apply to `POST /oauth/token` and `POST /oauth/device/code`; a faulted request is still
recorded in `state.requests`, so tests can count the broker's attempts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


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


class Faults:
    """Queued failures for the next requests, and a latency added to every request."""

    def __init__(self) -> None:
        # Seconds to wait before answering any request; more than the client's timeout makes a timeout.
        self.latency: float = 0.0
        self._queue: deque[Fault] = deque()

    def fail_next(
        self,
        status: int = 503,
        *,
        count: int = 1,
        error: str = "server_error",
        description: str = "Service temporarily unavailable.",
    ) -> None:
        """Answer the next `count` requests with `status` and an Auth0-shaped error."""
        self._queue.extend(Fault(status, error, description) for _ in range(count))

    def rate_limit_next(self, *, count: int = 1, reset_in: int = 1, retry_after: int | None = None) -> None:
        """Answer the next `count` requests with 429 `too_many_requests` and rate-limit headers."""
        fault = Fault(429, "too_many_requests", "Global limit has been reached", reset_in, retry_after)
        self._queue.extend(fault for _ in range(count))

    def take(self) -> Fault | None:
        """The fault for this request, if one is queued."""
        return self._queue.popleft() if self._queue else None

    def clear(self) -> None:
        """Forget queued faults and latency."""
        self._queue.clear()
        self.latency = 0.0
