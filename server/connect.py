"""Connect links (SPEC §10): when Token Vault has no connected account, the answer names a way to connect one.

A link is `{public URL}/connect/{id}`: `id` is 128 random bits (urlsafe), single use, valid LINK_TTL, bound
to (account, agent, connection, scopes) in the database, so any process sharing the database can serve
the flow. It carries no secret and signs nobody in: the flow (server/web/connect.py) makes the user sign
in to Auth0 and refuses anyone but the link's account. Start, refusal and completion are audit events
(tool `connect`), each with the link's fingerprint rather than its id.

Knows nothing of MCP or HTTP. `ConnectRequired` is the domain's "needs connect" answer; tools/ turns it
into a URL elicitation, an `InputRequiredResult` or the `[account_not_connected] …` text.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from server import audit
from server.clock import rfc3339
from server.errors import AccountNotConnected
from server.models import ConnectLink
from server.principal import Principal

if TYPE_CHECKING:
    from server.broker import Broker, Call

log = logging.getLogger(__name__)

LINK_TTL = timedelta(minutes=10)
KEEP_EXPIRED = timedelta(days=1)  # an expired link is still told apart from a forged one this long
POLL_EVERY = 0.25  # seconds between looks at the database for flows finished by another process
LIVE = ("new", "opened")
# Public URL of the flow's pages, made when first needed (stdio: opens the loopback listener).
PublicUrl = Callable[[], Awaitable[str]]
Watcher = Callable[[ConnectLink], Awaitable[None]]


class ConnectRequired(AccountNotConnected):
    """The account is not connected; `url` is where the user connects it (the link `link`)."""

    def __init__(self, link: ConnectLink, url: str) -> None:
        super().__init__(f"connect your {link.connection} account at {url}, then call again")
        self.link = link
        self.url = url


class LinkRefused(Exception):
    """A link that cannot be used: unknown, expired or already used. The message says so to a person."""


@dataclass(frozen=True)
class Refusal:
    """Why a flow failed, for its page and its event: a stable code and a sentence."""

    code: str
    reason: str


class ConnectFlows:
    """Makes connect links, moves them through the flow (each step audited), and tells watchers when one ends."""

    def __init__(self, broker: Broker, public_url: PublicUrl, ttl: timedelta = LINK_TTL) -> None:
        self.broker = broker
        self.public_url = public_url
        self.ttl = ttl
        self._watchers: dict[str, list[Watcher]] = {}
        self._poller: asyncio.Task[None] | None = None
        self.on_started: Callable[[ConnectLink], None] | None = None  # the stdio listener holds itself open
        self.on_finished: Callable[[ConnectLink], None] | None = None

    def url_of(self, base: str, link: ConnectLink) -> str:
        return f"{base}/connect/{link.id}"

    async def start(self, call: Call, principal: Principal, connection: str, scopes: list[str]) -> ConnectRequired:
        """A new link for this caller, with its `connect` start event. Raises BrokerError (the store)."""
        base = await self.public_url()
        now = self.broker.clock.now()
        link = ConnectLink(
            id=secrets.token_urlsafe(16), account=principal.account, agent=principal.agent or "",
            connection=connection, scopes=tuple(sorted(set(scopes))), elicitation_id=secrets.token_urlsafe(16),
            created_at=now, expires_at=now + self.ttl, status="new",
        )

        def job(tx: Any) -> None:
            tx.insert_connect_link(link)
            audit.append(tx, self._event(call.transport, link, None, "start", for_tool=call.tool))

        await self.broker.db.write(job)
        if self.on_started is not None:
            self.on_started(link)
        return ConnectRequired(link, self.url_of(base, link))

    async def get(self, link_id: str) -> ConnectLink | None:
        if not _plausible(link_id):
            return None
        return await self.broker.db.read(lambda tx: tx.get_connect_link(link_id))

    async def open(self, link_id: str, transport: str) -> ConnectLink:
        """Use the link once: new → opened. Raises LinkRefused (unknown, expired or used), audited when it
        names a real link."""
        now = self.broker.clock.now()

        def job(tx: Any) -> ConnectLink | str:
            link = tx.get_connect_link(link_id) if _plausible(link_id) else None
            if link is None:
                return "unknown"
            if link.status != "new" or now >= link.expires_at:
                why = "used" if link.status != "new" else "expired"
                audit.append(tx, self._event(transport, link, Refusal("invalid_argument", f"link {why}"), "open"))
                return why
            tx.move_connect_link(link_id, ("new",), "opened", now)
            return link

        outcome = await self.broker.db.write(job)
        if isinstance(outcome, str):
            raise LinkRefused(_REFUSED[outcome])
        return outcome

    async def refuse(self, link: ConnectLink, refusal: Refusal, step: str, transport: str, **args: Any) -> None:
        """End the flow as refused, with its event (the link cannot be used again)."""
        now = self.broker.clock.now()

        def job(tx: Any) -> None:
            tx.move_connect_link(link.id, LIVE, "refused", now)
            audit.append(tx, self._event(transport, link, refusal, step, **args))

        await self.broker.db.write(job)
        await self._finished(link.id)

    async def complete(self, link: ConnectLink, connected_account: str, transport: str) -> bool:
        """End the flow as connected, with its event; False when the link had already ended (nothing written)."""
        now = self.broker.clock.now()

        def job(tx: Any) -> bool:
            if not tx.move_connect_link(link.id, ("opened",), "connected", now):
                return False
            audit.append(tx, self._event(transport, link, None, "complete", connected_account=connected_account))
            return True

        done = bool(await self.broker.db.write(job))
        await self._finished(link.id)
        return done

    async def wait(self, link_id: str, seconds: float) -> ConnectLink | None:
        """The link once it has ended (connected or refused) or expired, or as it is after `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            link = await self.get(link_id)
            if link is None or not link.live(self.broker.clock.now()) or time.monotonic() >= deadline:
                return link
            await asyncio.sleep(min(POLL_EVERY, max(0.0, deadline - time.monotonic())))

    async def forget_expired(self) -> int:
        """Drop links that expired a day ago or more (housekeeping; their audit events stay)."""
        before = self.broker.clock.now() - KEEP_EXPIRED
        return int(await self.broker.db.write(lambda tx: tx.drop_connect_links_before(before)))

    def watch(self, link: ConnectLink, watcher: Watcher) -> None:
        """Call `watcher` once when `link` ends here or on any process sharing the database (or expires)."""
        self._watchers.setdefault(link.id, []).append(watcher)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        self._watchers.clear()

    async def _finished(self, link_id: str) -> None:
        link = await self.get(link_id)
        if link is None:
            return
        if self.on_finished is not None:
            self.on_finished(link)
        for watcher in self._watchers.pop(link_id, []):
            await _tell(watcher, link)

    async def _poll(self) -> None:
        """While anyone watches: look for their links ending elsewhere (another replica served the flow)."""
        while self._watchers:
            await asyncio.sleep(POLL_EVERY)
            for link_id in list(self._watchers):
                try:
                    link = await self.get(link_id)
                except Exception as exc:  # the database is away: look again next time
                    log.warning("could not look at a connect link: %s", type(exc).__name__)
                    break
                if link is None or not link.live(self.broker.clock.now()):
                    for watcher in self._watchers.pop(link_id, []):
                        if link is not None:
                            await _tell(watcher, link)

    def _event(
        self, transport: str, link: ConnectLink, refusal: Refusal | None, step: str, **args: Any
    ) -> audit.Event:
        fingerprint = audit.token_fingerprint(self.broker.db.hmac_key, link.id).hex()[:16]
        extra = {k: v for k, v in args.items() if v is not None}
        if refusal is not None:
            extra["reason"] = refusal.reason
        return audit.Event(
            ts=rfc3339(self.broker.clock.now()), transport=transport,
            outcome="ok" if refusal is None else "denied", account=link.account, agent=link.agent or None,
            tool="connect", scope=None, code=None if refusal is None else refusal.code,
            args={"step": step, "link": fingerprint, "connection": link.connection, "scopes": list(link.scopes),
                  **extra},
        )


_REFUSED = {
    "unknown": "This connect link is not one this broker made. Go back to your agent and call the tool again "
               "for a new link.",
    "expired": "This connect link has expired (links last 10 minutes). Go back to your agent and call the tool "
               "again for a new link.",
    "used": "This connect link was already used (each link works once). Go back to your agent and call the "
            "tool again for a new link.",
}


def _plausible(link_id: str) -> bool:
    """A link id as we make them (22 urlsafe characters); anything else is not looked up."""
    return len(link_id) == 22 and all(c.isalnum() or c in "-_" for c in link_id) and link_id.isascii()


async def _tell(watcher: Watcher, link: ConnectLink) -> None:
    try:
        await watcher(link)
    except Exception as exc:  # a client that went away: nothing to tell
        log.info("a connect watcher failed: %s", type(exc).__name__)
