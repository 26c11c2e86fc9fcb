"""Single flight: concurrent callers that need the same thing share one computation of it.

Used for Auth0 tokens (the server's own, the stdio identity's) and Token Vault answers, so a
burst of tool calls on a cold cache makes one request to Auth0, not one per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """At most one run per key at a time; every caller that asks meanwhile gets that run's outcome."""

    def __init__(self) -> None:
        self._runs: dict[K, asyncio.Task[V]] = {}

    async def do(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        """The result of `work()` for `key`, joining a run already under way for the same key.

        The run is a task of its own, so a caller that is cancelled (a client that went away)
        does not cancel it for the others. Raises whatever the run raised, to every caller.
        """
        run = self._runs.get(key)
        if run is None:

            async def call() -> V:
                return await work()

            run = asyncio.get_running_loop().create_task(call())
            self._runs[key] = run
            run.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(run)

    def running(self, key: K) -> bool:
        """Whether a run for `key` is under way."""
        return key in self._runs

    def _finished(self, key: K, run: asyncio.Task[V]) -> None:
        if self._runs.get(key) is run:
            del self._runs[key]
        if not run.cancelled():
            run.exception()  # mark it retrieved: the callers re-raise it themselves, or none is left
