"""Assembly: configuration → database, Auth0 client, verifier, vault, broker, identity → MCP server."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx
from mcp.server import MCPServer
from mcp.server.mcpserver import RequestStateSecurity
from starlette.routing import BaseRoute

from server import approval, demo, market
from server.auth0.client import Auth0Client
from server.auth0.identity import StdioIdentity
from server.auth0.login import read_credentials
from server.auth0.token_verifier import JwtVerifier
from server.broker import Approver, Broker
from server.clock import Clock
from server.config import Config
from server.connect import ConnectFlows, PublicUrl
from server.emulator import DemoTenant
from server.errors import ConfigError
from server.metrics import Metrics
from server.policy import Policy, PolicyFileError, read_policy_file
from server.provider import ProviderClient
from server.sealing import generate_keys
from server.store import Database, Tx, open_database
from server.textsafe import escape_controls
from server.vault import TokenVault
from server.web.connect import ConnectSite
from server.web.connect_listener import LoopbackListener
from server.web.demo_tenant import demo_pages, serve_demo_pages_at
from tools import ALL_TOOLS, connect_answer
from tools.registry import PrincipalSource

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "token-vault-mcp brokers short-lived, least-privilege credentials for third-party APIs through Auth0 "
    "Token Vault. Look at list_market, buy quota with buy_quota (state max_unit_price), then call the "
    "provider's API with call_api (the broker adds the token; you never see it) or, where a listing "
    "delivers tokens, get one with request_token. Give the connection, the exact scopes you need and your "
    "purpose. Use tokens at once; never store them."
)


@dataclass
class Runtime:
    """Everything one process shares: one database, one Auth0 client (not one per connection)."""

    config: Config
    db: Database
    auth0: Auth0Client
    provider: ProviderClient
    verifier: JwtVerifier
    vault: TokenVault
    broker: Broker
    identity: StdioIdentity
    tenant: DemoTenant | None
    metrics: Metrics | None = None  # TVM_METRICS_PORT: serving /metrics
    connects: ConnectFlows | None = None  # connect links (SPEC §10); served once `serve_connect_pages` says where
    state_keys: tuple[bytes, ...] = field(default=(), repr=False)  # TVM_STATE_KEYS (or made at start)
    connect_client_id: str | None = None  # the connect flow's sign-in client
    listener: LoopbackListener | None = None  # stdio and the CLI: the connect pages on loopback, on demand

    def connect_site(self, public_url: PublicUrl) -> ConnectSite:
        """The connect pages of this runtime, served at `public_url` (links name it too)."""
        assert self.connects is not None and self.connect_client_id is not None
        self.connects.public_url = public_url
        return ConnectSite(self.auth0, self.connects, self.connect_client_id, self.state_keys, public_url)

    def serve_connect_on_loopback(self) -> LoopbackListener:
        """stdio and the CLI: links open a loopback listener for the flows' lifetime (SPEC §10)."""
        assert self.connects is not None
        site = self.connect_site(_unserved)
        routes: list[BaseRoute] = []
        on_open: Callable[[str], None] | None = None
        if self.tenant is not None:  # demo: the tenant's sign-in and consent pages on the listener, for a browser
            routes = [demo_pages(self.tenant)]
            on_open = functools.partial(serve_demo_pages_at, self.tenant, self.auth0)
        listener = LoopbackListener(
            site, self.broker.clock, self.config.connect_public_url, routes=routes, on_open=on_open
        )
        site.public_url = self.connects.public_url = listener.ensure
        self.connects.on_started = listener.hold
        self.connects.on_finished = listener.release
        self.listener = listener
        return listener

    async def housekeeping(self, every: float = 1.0) -> None:
        """Work a serving process does on its own: once a second, write the counts of folded refusals; every
        third of a lease, renew the leases of the reservations it holds and refund those whose lease lapsed
        (their process is gone, here or on another machine)."""
        lease = self.broker.lease.total_seconds()
        ticks = 0
        while True:
            await asyncio.sleep(every)
            ticks += 1
            await self.broker.flush_refusals()
            if ticks * every >= lease / 3:
                ticks = 0
                try:
                    await self.broker.renew_leases()
                    refunded = await self.broker.recover_reservations(transport="lease")
                    if self.connects is not None:
                        await self.connects.forget_expired()
                except Exception as exc:  # the database is away: try again next time
                    log.error("lease housekeeping failed: %s", type(exc).__name__)
                    continue
                if refunded:
                    log.warning("refunded %d reservation(s) whose lease lapsed", refunded)

    async def aclose(self) -> None:
        if self.listener is not None:
            await self.listener.aclose()
        if self.connects is not None:
            await self.connects.aclose()
        await self.broker.flush_refusals(everything=True)
        await self.auth0.aclose()
        await self.provider.aclose()
        await self.db.close()
        if self.metrics is not None:
            await self.metrics.aclose()


async def open_runtime(
    config: Config,
    *,
    clock: Clock | None = None,
    auth0_transport: httpx.AsyncBaseTransport | None = None,
    provider_mounts: Mapping[str, httpx.AsyncBaseTransport] | None = None,
) -> Runtime:
    """Open the database, connect the Auth0 client (the emulator in demo mode) and load the market."""
    # the market file is read first: one that cannot be read or parsed stops the start before anything opens
    file_specs: list[market.ListingSpec] = []
    if config.market_file is not None:
        try:
            file_specs = market.read_market_file(config.market_file)
        except market.MarketFileError as exc:
            raise ConfigError(f"TVM_MARKET_FILE: {exc}") from None
    start_policy: Policy | None = None
    if config.policy_file is not None:  # read before anything opens, like the market file
        try:
            start_policy = read_policy_file(config.policy_file)
        except PolicyFileError as exc:
            raise ConfigError(f"TVM_POLICY_FILE: {escape_controls(str(exc))}") from None
    tenant: DemoTenant | None = None
    client_id, secret, audience, refresh = (
        config.client_id, config.client_secret, config.audience, config.refresh_token,
    )
    base_url = config.auth0_base_url
    if config.demo:
        tenant, demo_transport = demo.start_demo_tenant()
        auth0_transport = auth0_transport or demo_transport
        provider_mounts = {**demo.provider_mounts(demo_transport), **(provider_mounts or {})}
        base_url = tenant.issuer.rstrip("/")
        client_id, secret, audience = tenant.client_id, tenant.client_secret, tenant.audience
        refresh = refresh or tenant.refresh_token
    if base_url is None or client_id is None or audience is None:  # pragma: no cover - load_config checks
        raise ConfigError("AUTH0_DOMAIN, AUTH0_CLIENT_ID and AUTH0_AUDIENCE are required")
    refresh_client = None if config.demo else config.refresh_client_id
    if refresh is None:
        stored = read_credentials(config.credentials_file)
        if stored is not None:  # a stored login belongs to the client that made it
            refresh, refresh_client = stored.refresh_token, stored.client_id or refresh_client
    key_pem = config.client_key_file.read_bytes() if config.client_key_file else None
    metrics = Metrics(spec.name for spec in ALL_TOOLS) if config.metrics_port is not None else None
    auth0 = Auth0Client(
        base_url, client_id, secret, auth_method=config.client_auth_method, private_key_pem=key_pem,
        transport=auth0_transport, timeout=config.auth0_timeout,
        on_request=None if metrics is None else metrics.auth0_request,
    )
    provider = ProviderClient(timeout=config.api_timeout, max_bytes=config.api_max_bytes, mounts=provider_mounts)
    try:
        db = await open_database(config.database_url or config.database)
    except BaseException:
        await auth0.aclose()
        await provider.aclose()
        raise
    try:
        verifier = JwtVerifier(auth0, audience)
        vault = TokenVault(auth0, on_reuse=None if metrics is None else metrics.vault_reuse)
        approver: Approver = functools.partial(approval.await_approval, auth0, timeout=config.approval_timeout)
        if metrics is not None:
            approver = metrics.approvals(approver)
            db.on_batch = metrics.batch_done
            db.on_round_trip = metrics.round_trip
        broker = Broker(
            db, vault, clock, provider, config.grant_ttl, approver, lease=config.reservation_lease, metrics=metrics
        )
        identity = StdioIdentity(auth0, verifier, refresh, refresh_client)
        specs = (demo.demo_listings() if config.demo else []) + file_specs
        if specs:
            try:  # the demo market and the file in one transaction: a refusal loads none of them
                await db.write(lambda tx: market.load(tx, specs))
            except market.MarketFileError as exc:
                raise ConfigError(f"TVM_MARKET_FILE: {exc}") from None
        if start_policy is not None:
            await broker.load_policy(start_policy, by="startup", transport="startup")
        if tenant is not None:
            await _fund_demo_wallet(broker, tenant.account)
        if metrics is not None and config.metrics_port is not None:  # last: a port taken stops the start too
            metrics.watch_grant_tokens(broker.grant_tokens)
            metrics.serve(config.metrics_port)
    except BaseException:
        await auth0.aclose()
        await provider.aclose()
        await db.close()
        raise
    connects = ConnectFlows(broker, _unserved)
    broker.connects = connects
    keys = config.state_keys or generate_keys()
    return Runtime(
        config, db, auth0, provider, verifier, vault, broker, identity, tenant, metrics, connects, keys,
        config.connect_client_id if not config.demo else client_id,
    )


async def _unserved() -> str:
    """No connect pages are served (yet): the broker answers a plain account_not_connected."""
    raise RuntimeError("the connect pages are not served by this process")


async def _fund_demo_wallet(broker: Broker, account: str) -> None:
    def funded(tx: Tx) -> bool:
        return tx.get_meta(demo.DEMO_FUNDED_KEY) is not None

    if await broker.db.read(funded):
        return
    await broker.credit(account, demo.DEMO_FUNDS, transport="demo", once_key=demo.DEMO_FUNDED_KEY)


def build_mcp(runtime: Runtime, principals: PrincipalSource, transport: str, **kwargs: object) -> MCPServer:
    """The MCP server with the five tools, each bound to this runtime and principal source."""
    security = RequestStateSecurity(keys=list(runtime.state_keys), bind_principal=connect_answer.bound_principal)
    return MCPServer(
        name="token-vault-mcp",
        request_state_security=security,  # 2026-07-28 retries may land on any replica sharing TVM_STATE_KEYS
        title="Token Vault broker",
        instructions=INSTRUCTIONS,
        version="0.1.0",
        tools=[spec.to_mcp(runtime.broker, principals, transport) for spec in ALL_TOOLS],
        log_level=runtime.config.log_level,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )
