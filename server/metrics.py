"""Prometheus metrics (SPEC §12): one process's collectors, the plain hooks that feed them, `/metrics`.

With `TVM_METRICS_PORT` set, `app.open_runtime` builds one `Metrics` and hands its methods to
the layers as optional hooks (None without it: nothing is counted, nothing costs):

    tools/registry.py  ToolSpec.call         call_done     tvm_tool_calls_total{tool,outcome,code}
                                                           tvm_tool_call_seconds{tool}
                                                           tvm_refusals_total{kind}
    server/web/remote.py   BearerAuth            refused       tvm_refusals_total{kind}
    auth0/client.py    Auth0Client._attempt  auth0_request tvm_auth0_requests_total{endpoint,grant_type,status}
                                                           tvm_auth0_request_seconds{endpoint,grant_type}
    vault.py           TokenVault            vault_reuse   tvm_vault_reuse_total{result}
    store/database.py  Database (a commit)   batch_done    tvm_commit_batch_size
    app.py             the approver          approvals     tvm_pending_approvals
    app.py             broker.grant_tokens   (read live)   tvm_grant_tokens

Only prometheus_client is imported here, so the domain never needs it. Every label is a fixed
vocabulary (tool names, outcomes, error codes, Auth0 paths and grant names, HTTP statuses): never
an account, agent, token, URL, purpose or secret. `/metrics` is served on 127.0.0.1 only, by a
small threaded WSGI server of its own that writes nothing to stdout (stdio mode's JSON-RPC).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Sized
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from server.config import is_loopback_host
from server.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)

ADDRESS = "127.0.0.1"  # loopback only, whatever the MCP transport listens on
PATH = "/metrics"
# Seconds: sub-millisecond reads up to an approval waited out on the owner's phone (TVM_APPROVAL_TIMEOUT).
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
AUTH0_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # jobs per transaction; the store's MAX_BATCH is 256
OTHER = "other"  # the label of a value outside its vocabulary (none is expected)


def error_codes() -> frozenset[str]:
    """Every code of the error tree (server.errors): the vocabulary of the `code` and `kind` labels."""
    codes: set[str] = set()
    pending: list[type[BrokerError]] = [BrokerError]
    while pending:
        kind = pending.pop()
        codes.add(kind.code)
        pending.extend(kind.__subclasses__())
    return frozenset(codes)


def is_refusal(error: BrokerError) -> bool:
    """A caller turned away (a `denied` outcome, or told to slow down), not a failure of the broker."""
    return error.outcome == "denied" or error.code == "rate_limited"


class Metrics:
    """The collectors of one process, on a registry of their own (never prometheus_client's global one)."""

    def __init__(self, tools: Iterable[str]) -> None:
        self.registry = CollectorRegistry()
        self._tools = frozenset(tools)
        self._codes = error_codes()
        r = self.registry
        self.tool_calls = Counter(
            "tvm_tool_calls", "Tool calls answered, by tool, outcome (ok, denied, error) and error code ('' if ok).",
            ["tool", "outcome", "code"], registry=r,
        )
        self.tool_seconds = Histogram(
            "tvm_tool_call_seconds", "Time from a tool call's arrival to its answer, by tool.", ["tool"],
            buckets=CALL_BUCKETS, registry=r,
        )
        self.refusals = Counter(
            "tvm_refusals", "Callers turned away (denied or rate limited), tool calls and HTTP authentication, "
            "by error code.", ["kind"], registry=r,
        )
        self.auth0_requests = Counter(
            "tvm_auth0_requests", "HTTP requests to Auth0 (each attempt), by path, grant type (/oauth/token) and "
            "status ('none': no answer).", ["endpoint", "grant_type", "status"], registry=r,
        )
        self.auth0_seconds = Histogram(
            "tvm_auth0_request_seconds", "Time of one HTTP request to Auth0, by path and grant type.",
            ["endpoint", "grant_type"], buckets=AUTH0_BUCKETS, registry=r,
        )
        self.vault_reuses = Counter(
            "tvm_vault_reuse", "Token Vault asks answered from the reuse cache (hit) or by an exchange (miss).",
            ["result"], registry=r,
        )
        self.batch_sizes = Histogram(
            "tvm_commit_batch_size", "Jobs per write transaction of the store (group commit).",
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.db_round_trips = Counter(
            "tvm_db_round_trips", "Round trips of the store's transactions to PostgreSQL (SQLite makes none).",
            registry=r,
        )
        self.pending_approvals = Gauge(
            "tvm_pending_approvals", "Approvals asked of accounts' owners (Auth0 CIBA) and not yet answered.",
            registry=r,
        )
        self.grant_tokens = Gauge(
            "tvm_grant_tokens", "Provider tokens of call_api grants held in this process's memory.", registry=r,
        )
        for tool in sorted(self._tools):  # every tool's series exists from the start (rate() needs a zero)
            self.tool_calls.labels(tool, "ok", "")
            self.tool_seconds.labels(tool)
        for result in ("hit", "miss"):
            self.vault_reuses.labels(result)
        self._exposition: Callable[..., Iterable[bytes]] = make_wsgi_app(self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ---- hooks ------------------------------------------------------------------------------
    def call_done(self, tool: str, error: BrokerError | None, seconds: float) -> None:
        """A tool call was answered: ok (`error` None) or with `error`, after `seconds`."""
        name = tool if tool in self._tools else OTHER
        if error is None:
            self.tool_calls.labels(name, "ok", "").inc()
        else:
            self.tool_calls.labels(name, error.outcome, self._code(error)).inc()
            if is_refusal(error):
                self.refused(error)
        self.tool_seconds.labels(name).observe(seconds)

    def refused(self, error: BrokerError) -> None:
        """A caller was turned away before reaching a tool (remote authentication), or by one."""
        self.refusals.labels(self._code(error)).inc()

    def auth0_request(self, endpoint: str, grant_type: str, status: int | None, seconds: float) -> None:
        """One HTTP request to Auth0 (the Auth0 client passes its fixed path and grant name)."""
        shown = "none" if status is None else str(status) if 100 <= status <= 599 else OTHER
        self.auth0_requests.labels(endpoint, grant_type, shown).inc()
        self.auth0_seconds.labels(endpoint, grant_type).observe(seconds)

    def vault_reuse(self, hit: bool) -> None:
        self.vault_reuses.labels("hit" if hit else "miss").inc()

    def batch_done(self, jobs: int) -> None:
        """The store ran one write transaction holding `jobs` jobs."""
        self.batch_sizes.observe(jobs)

    def round_trip(self) -> None:
        """The store made one round trip to its database server (on any thread)."""
        self.db_round_trips.inc()

    def approvals(self, approver: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """`approver` (server.approval.await_approval, bound), counting the approvals it waits for."""

        async def counted(**kwargs: Any) -> None:
            with self.pending_approvals.track_inprogress():
                await approver(**kwargs)

        return counted

    def watch_grant_tokens(self, tokens: Sized) -> None:
        """Report the size of the grants' token cache (read at each scrape)."""
        self.grant_tokens.set_function(lambda: len(tokens))

    def _code(self, error: BrokerError) -> str:
        return error.code if error.code in self._codes else OTHER

    # ---- /metrics ------------------------------------------------------------------------------
    def serve(self, port: int) -> None:
        """Serve `/metrics` on 127.0.0.1:`port` from a thread. Raises ConfigError (one line) when that
        port cannot be had."""
        try:
            server = make_server(ADDRESS, port, self._app, _Server, handler_class=_Quiet)
        except OSError as exc:
            raise ConfigError(
                f"TVM_METRICS_PORT: cannot listen on {ADDRESS}:{port} ({exc.strerror or type(exc).__name__})"
            ) from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="tvm-metrics", daemon=True
        )
        self._thread.start()
        log.info("Prometheus metrics at http://%s:%d%s", ADDRESS, port, PATH)  # to stderr, like every log

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_address[1])

    async def aclose(self) -> None:
        """Stop serving (waits, off the event loop, for the server thread's next poll)."""
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """`/metrics` for a loopback Host only (a DNS-rebinding page names its own host); 404 elsewhere."""
        if not _loopback(environ.get("HTTP_HOST", "")):
            return _plain(start_response, "421 Misdirected Request", "this server does not serve that Host")
        if environ.get("PATH_INFO") != PATH:
            return _plain(start_response, "404 Not Found", "metrics are at /metrics")
        return self._exposition(environ, start_response)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds the process open


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: no request line on stderr, and never anything on stdout."""


def _loopback(host: str) -> bool:
    name, colon, port = host.rpartition(":")
    if not colon or not port.isdigit():  # no port, or the colon of an IPv6 literal
        name = host
    return is_loopback_host(name)


def _plain(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]
