"""The operator console's ASGI app (SPEC §11), mounted at `/console`.

Pages are Jinja2 templates rendered on the server with autoescape on; the only script is the
package's own static `console.js` (live updates by polling), allowed by a Content-Security-Policy
that has no `unsafe-inline` for scripts or styles. Every state change is a POST carrying the
session's CSRF token from a page of this origin (`Origin` checked); each runs through the same
Broker method the CLI uses and is audited with the operator's name.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import audit, overview, policy
from server.broker import Broker
from server.clock import parse_rfc3339, rfc3339
from server.errors import BrokerError
from server.invariants import check_invariants
from server.principal import Principal
from server.store import AuditFilter, Tx
from server.textsafe import escape_controls
from server.web.console import chart
from server.web.console.session import COOKIE, SESSION_SECONDS, Session, Sessions
from server.web.console.signin import STATE_COOKIE, STATE_SECONDS, Auth0SignIn, LinkSignIn, SignInRefused

T = TypeVar("T")
HERE = Path(__file__).parent
PREFIX = "/console"
PAGE_SIZE = 50
EXPORT_CHUNK = 5000
MAX_WALLETS = 500
MAX_GRANTS = 500
RECENT_APPROVALS = 25
APPROVAL_CODES = ("approval_denied", "approval_timeout")
STATUS_MAX_AGE = 30.0  # seconds a chain-and-books verdict is shown before a moved log is checked again
MAX_FIELD = 500
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # no-referrer would make a form POST's Origin "null"
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
PAGES = ("market", "wallets", "agents", "audit", "approvals")
OUTCOMES = ("ok", "denied", "error")

SignIn = LinkSignIn | Auth0SignIn


@dataclass
class Console:
    """One console: a broker on the database, who may sign in and how, the trusted origins."""

    broker: Broker
    signin: SignIn
    sessions: Sessions
    trusted_origins: frozenset[str] = frozenset()  # besides the request's own (a TLS proxy's public origin)
    # where browsers reach this server (TVM_RESOURCE_URL's origin behind a TLS proxy); None: the request's own
    public_origin: str | None = None
    live_ms: int = 3000  # how often an open page refreshes its figures
    _status: _Status | None = field(default=None, init=False)  # the last full `audit verify --ledger`
    _status_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)
    # the Agents and Approvals pages refresh every few seconds: they read only what the log added since
    _tally: overview.AgentTally = field(default_factory=overview.AgentTally, init=False)
    _approvals: tuple[overview.RecentEvents, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self._approvals = tuple(overview.RecentEvents(AuditFilter(code=c), RECENT_APPROVALS) for c in APPROVAL_CODES)
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every template: agent-supplied text is always escaped
            undefined=jinja2.StrictUndefined,
        )

    # ---- the app ---------------------------------------------------------------------------
    def app(self) -> ASGIApp:
        """The Starlette app to mount at `/console`."""
        page = self._page
        routes = [
            Route("/", self.home),
            Route("/signin", self.signin_page),
            Route("/login", self.login),
            Route("/callback", self.callback),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/market", page(self.market)),
            Route("/wallets", page(self.wallets)),
            Route("/agents", page(self.agents)),
            Route("/audit", page(self.audit)),
            Route("/audit/status", page(self.audit_status)),
            Route("/audit/export", page(self.audit_export)),
            Route("/approvals", page(self.approvals)),
            Route("/wallets/credit", self._action(self.credit), methods=["POST"]),
            Route("/wallets/transfer-credits", self._action(self.transfer_credits), methods=["POST"]),
            Route("/wallets/transfer-units", self._action(self.transfer_units), methods=["POST"]),
            Route("/agents/block", self._action(self.block), methods=["POST"]),
            Route("/agents/unblock", self._action(self.unblock), methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return _with_headers(Starlette(routes=routes))

    def _read(self, job: Callable[[Tx], T]) -> Awaitable[T]:
        """Every page reads through the store's reader: a scan of a large log must stall neither the event
        loop nor the tool calls' writes (SQLite's own `read` shares the writer's connection)."""
        return self.broker.db.reader().read(job)

    # ---- sessions ----------------------------------------------------------------------------
    def _session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    def _signin_url(self) -> str:
        return f"{PREFIX}/login" if isinstance(self.signin, Auth0SignIn) else f"{PREFIX}/signin"

    def _page(
        self, handler: Callable[[Request, Session], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                return RedirectResponse(self._signin_url(), status_code=303)
            return await handler(request, session)

        return guarded

    def _action(
        self, handler: Callable[[Request, Session, dict[str, str]], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """A state change: a session, a same-origin request and the session's CSRF token, or 403."""

        async def guarded(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                return self._refused(403, "sign in first")
            if not self._same_origin(request):
                return self._refused(403, "this request did not come from a console page")
            form = await request.form()
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            if not session.csrf_ok(fields.get("csrf")):
                return self._refused(403, "the form's CSRF token is missing or wrong; reload the page")
            return await handler(request, session, fields)

        return guarded

    def _same_origin(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
        if origin is None:  # every browser sends Origin with a POST; Sec-Fetch-Site is the fallback
            return request.headers.get("sec-fetch-site") == "same-origin"
        origin = origin.lower().rstrip("/")
        return origin == own or origin in self.trusted_origins

    def _https(self, request: Request) -> bool:
        return request.url.scheme == "https" or (self.public_origin or "").startswith("https://")

    def _refused(self, status: int, message: str) -> Response:
        return HTMLResponse(self._render("error.html", None, message=message, status=status), status)

    def _render(self, name: str, session: Session | None, **context: Any) -> str:
        return self.templates.get_template(name).render(
            session=session, csrf=session.csrf if session else "", pages=PAGES, prefix=PREFIX, live_ms=self.live_ms,
            **context
        )

    def _html(self, name: str, session: Session, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self._render(name, session, **context), status)

    # ---- sign-in -----------------------------------------------------------------------------
    async def home(self, request: Request) -> Response:
        return RedirectResponse(f"{PREFIX}/market", status_code=303)

    async def signin_page(self, request: Request) -> Response:
        if not isinstance(self.signin, LinkSignIn):
            return RedirectResponse(f"{PREFIX}/login", status_code=303)
        operator = self.signin.redeem(request.query_params.get("token", ""))
        if operator is None:
            return self._refused(401, "open the one-time sign-in link the console printed on its terminal "
                                      "(each link works once)")
        return self._signed_in(request, operator)

    def _signed_in(self, request: Request, operator: str) -> Response:
        secret, _ = self.sessions.open(operator)
        # a page of our own, not a redirect: a SameSite=Strict cookie set at the end of a cross-site
        # redirect chain (back from Auth0) is not sent with the next hop; a same-site refresh is
        response = HTMLResponse(self._render("signed_in.html", None, target=f"{PREFIX}/market"))
        response.set_cookie(COOKIE, secret, max_age=SESSION_SECONDS, path=PREFIX, httponly=True,
                            samesite="strict", secure=self._https(request))
        response.delete_cookie(STATE_COOKIE, path=PREFIX)
        return response

    async def login(self, request: Request) -> Response:
        if not isinstance(self.signin, Auth0SignIn):
            return RedirectResponse(f"{PREFIX}/signin", status_code=303)
        url, browser = self.signin.begin((self.public_origin or _own_origin(request)) + f"{PREFIX}/callback")
        response = RedirectResponse(url, status_code=303)
        # Lax, not Strict: it must come back with Auth0's cross-site redirect to /callback
        response.set_cookie(STATE_COOKIE, browser, max_age=STATE_SECONDS, path=PREFIX, httponly=True,
                            samesite="lax", secure=self._https(request))
        return response

    async def callback(self, request: Request) -> Response:
        if not isinstance(self.signin, Auth0SignIn):
            return self._refused(404, "this console signs in with a one-time link")
        q = request.query_params
        if "error" in q:
            return self._refused(403, f"Auth0 did not sign you in: {q.get('error_description') or q['error']}")
        try:
            operator = await self.signin.finish(
                q.get("state", ""), q.get("code", ""), request.cookies.get(STATE_COOKIE)
            )
        except SignInRefused as exc:
            return self._refused(exc.status, str(exc))
        return self._signed_in(request, operator)

    async def logout(self, request: Request) -> Response:
        session = self._session(request)
        if session is not None and self._same_origin(request):
            form = await request.form()
            if session.csrf_ok(str(form.get("csrf", ""))):
                self.sessions.close(request.cookies.get(COOKIE))
        # a page, not a redirect to sign-in: with Auth0 that would sign the operator straight back in
        response = HTMLResponse(self._render("signed_out.html", None, again=self._signin_url()))
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    # ---- pages ---------------------------------------------------------------------------------
    async def market(self, request: Request, session: Session) -> Response:
        now = self.broker.clock.now()
        priced = await self._read(lambda tx: overview.listings(tx, now))
        rows = [
            {"p": p, "status": overview.listing_status(p, now), "sold": p.listing.sold,
             "chart": chart.chart(p.listing, now)}
            for p in priced
        ]
        return self._html("market.html", session, page="market", rows=rows, now=rfc3339(now))

    async def wallets(self, request: Request, session: Session, **context: Any) -> Response:
        now = self.broker.clock.now()

        def read(tx: Tx) -> tuple[list[overview.Wallet], list[Any], list[Any]]:
            return (overview.wallets(tx, MAX_WALLETS), overview.live_grants(tx, now, MAX_GRANTS),
                    overview.listings(tx, now))

        wallets, grants, listings = await self._read(read)
        notice = NOTICES.get(request.query_params.get("done", ""))
        return self._html("wallets.html", session, context.pop("status", 200), page="wallets", wallets=wallets,
                          grants=grants, listings=[p.listing.id for p in listings], notice=notice,
                          form_key=secrets.token_urlsafe(16), error=context.get("error"), now=rfc3339(now),
                          transfers=True)

    async def agents(self, request: Request, session: Session, **context: Any) -> Response:
        def read(tx: Tx) -> tuple[list[dict[str, Any]], policy.Policy]:
            stored = tx.get_meta("policy")
            text = stored.decode() if isinstance(stored, bytes) else stored
            return overview.agents(tx, self._tally), policy.Policy.from_json(text) if text else policy.Policy()

        rows, current = await self._read(read)
        for row in rows:
            row["rule"] = current.rule_for(row["agent"]).model_dump(mode="json", exclude_none=True)
        rules = [r.model_dump(mode="json", exclude_none=True) for r in current.agents]
        notice = NOTICES.get(request.query_params.get("done", ""))
        return self._html("agents.html", session, context.pop("status", 200), page="agents", rows=rows, rules=rules,
                          default=policy.DEFAULT_RULE.model_dump(mode="json", exclude_none=True), notice=notice,
                          error=context.get("error"))

    async def audit(self, request: Request, session: Session) -> Response:
        where, problem = _audit_filter(request)
        rows: list[Any] = []
        older = searched = None
        if problem is None:
            found = await self._read(lambda tx: overview.audit_page(tx, where, PAGE_SIZE))
            rows, older, searched = [_event_row(r) for r in found.events], found.older, found.searched_from
        shown = {k: request.query_params.get(k, "") for k in ("account", "agent", "tool", "outcome", "since", "until")}
        base = {k: v for k, v in shown.items() if v}
        return self._html(
            "audit.html", session, 400 if problem else 200, page="audit", rows=rows, filters=shown, error=problem,
            outcomes=OUTCOMES, older=f"{PREFIX}/audit?{urlencode({**base, 'before': older})}" if older else None,
            newest=f"{PREFIX}/audit?{urlencode(base)}", export=f"{PREFIX}/audit/export?{urlencode(base)}",
            paged="before" in request.query_params, searched=searched,
        )

    async def audit_status(self, request: Request, session: Session) -> Response:
        """Chain and books, as `audit verify --ledger` says them. One check at a time for every viewer, and
        a new one only when the log moved on and the last is STATUS_MAX_AGE old: a full check reads the
        whole log, so page views must not start one each."""
        async with self._status_lock:
            status = self._status
            head = await self._read(audit.recorded_head)
            fresh = status is not None and (status.head == head or time.monotonic() - status.at < STATUS_MAX_AGE)
            if status is None or not fresh:
                status = await self._read(_check_log)
                self._status = status
        return self._html("audit_status.html", session, verdict=status)

    async def audit_export(self, request: Request, session: Session) -> Response:
        where, problem = _audit_filter(request)
        if problem is not None:
            return self._refused(400, problem)

        async def lines() -> AsyncIterator[bytes]:
            after = 0
            while True:
                chunk = dataclasses.replace(where, before_id=None, after_id=after)
                records = await self._read(
                    lambda tx, chunk=chunk: tx.find_audit(chunk, limit=EXPORT_CHUNK)  # type: ignore[misc]
                )
                if not records:
                    return
                yield "".join(_json_line(audit.export_line(r)) + "\n" for r in records).encode()
                after = records[-1].id

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers={
            "content-disposition": 'attachment; filename="audit.jsonl"'})

    async def approvals(self, request: Request, session: Session) -> Response:
        now = self.broker.clock.now()

        def read(tx: Tx) -> tuple[list[Any], list[Any]]:
            pending = []
            for r in tx.pending_reservations():
                listing = tx.get_listing(r.listing_id)
                rule = self.broker.control.rule(tx, Principal(account=r.account, agent=r.agent, scopes=frozenset()))
                needs = rule.approval == "always" or (
                    rule.approval == "listing" and listing is not None and listing.approval != "none")
                pending.append({"r": r, "approval": needs})
            recent = [rec for watch in self._approvals for rec in watch.newest(tx)]
            recent.sort(key=lambda rec: rec.id, reverse=True)
            return pending, [_event_row(r) for r in recent[:RECENT_APPROVALS]]

        pending, recent = await self._read(read)
        return self._html("approvals.html", session, page="approvals", pending=pending, recent=recent,
                          now=rfc3339(now))

    # ---- actions ---------------------------------------------------------------------------------
    async def credit(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        account = _text(form.get("account"), 200)
        amount = _whole(form.get("amount"))
        if account is None or amount is None:
            return await self.wallets(request, session, status=400,
                                      error="give an account (1 to 200 characters) and a positive whole amount")
        try:
            await self.broker.credit(account, amount, transport="console", by=session.operator)
        except BrokerError as exc:
            return await self.wallets(request, session, status=400, error=exc.message)
        return RedirectResponse(f"{PREFIX}/wallets?done=credit", status_code=303)

    async def transfer_credits(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        """Move credits between wallets (`wallet transfer`), idempotent on the form's own key."""
        source, target = _text(form.get("from_account"), 200), _text(form.get("to_account"), 200)
        amount, key = _whole(form.get("amount")), _text(form.get("idempotency_key"), 128)
        if source is None or target is None or amount is None:
            return await self.wallets(request, session, status=400,
                                      error="give both accounts and a positive whole number of credits")
        try:
            await self.broker.transfer_credits(session.operator, source, target, amount, key, transport="console")
        except BrokerError as exc:
            return await self.wallets(request, session, status=400, error=exc.render())
        return RedirectResponse(f"{PREFIX}/wallets?done=transfer", status_code=303)

    async def transfer_units(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        """Move held quota units of a listing between accounts (`quota transfer`), idempotent as above."""
        source, target = _text(form.get("from_account"), 200), _text(form.get("to_account"), 200)
        listing, units = _text(form.get("listing"), 64), _whole(form.get("units"), 10_000)
        key = _text(form.get("idempotency_key"), 128)
        if source is None or target is None or listing is None or units is None:
            return await self.wallets(request, session, status=400,
                                      error="give both accounts, a listing and a positive whole number of units")
        try:
            await self.broker.transfer_units(session.operator, source, target, listing, units, key,
                                             transport="console")
        except BrokerError as exc:
            return await self.wallets(request, session, status=400, error=exc.render())
        return RedirectResponse(f"{PREFIX}/wallets?done=transfer", status_code=303)

    async def block(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        agent = _text(form.get("agent"), 200)
        reason = _text(form.get("reason") or "blocked by the operator", MAX_FIELD)
        if agent is None or reason is None:
            return await self.agents(request, session, status=400,
                                     error="give the agent's id and a reason of at most 500 characters on one line")
        await self.broker.block_agent(agent, reason, session.operator, transport="console")
        return RedirectResponse(f"{PREFIX}/agents?done=block", status_code=303)

    async def unblock(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        agent = _text(form.get("agent"), 200)
        if agent is None or not await self.broker.unblock_agent(agent, session.operator, transport="console"):
            return await self.agents(request, session, status=400, error="that agent is not blocked")
        return RedirectResponse(f"{PREFIX}/agents?done=unblock", status_code=303)


NOTICES = {
    "credit": "Credited: the wallet shows its new balance.",
    "transfer": "Moved: both accounts show the transfer.",
    "block": "Blocked: its next call is refused with agent_blocked, on every server of this database.",
    "unblock": "Unblocked: it may call again.",
}


def _with_headers(app: ASGIApp) -> ASGIApp:
    """Every answer of the console, pages, redirects and static files alike, carries SECURITY_HEADERS."""
    extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []), *(h for h in extra if h[0] not in present)]
            await send(message)

        await app(scope, receive, sending)

    return wrapped


def _own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', '')}"


def _json_line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


@dataclass(frozen=True)
class _Status:
    head: str  # the audit head it checked up to
    at: float  # time.monotonic() of the check
    when: str  # RFC 3339, for the page
    chain: str  # `audit verify`'s line
    chain_ok: bool
    books: list[str]  # `--ledger`'s problems (none: the books balance)


def _check_log(tx: Tx) -> _Status:
    """`audit verify --ledger` in one read: the whole chain against its head, then the ledger invariants."""
    head = audit.recorded_head(tx) or ""
    result = audit.verify_log(tx)
    chain = (f"audit chain OK: {result.checked} events" if result.ok
             else f"audit chain BROKEN at event {result.bad_id}: {result.reason}")
    return _Status(head, time.monotonic(), rfc3339(datetime.now(UTC)), chain, result.ok, check_invariants(tx))


def _text(value: str | None, limit: int) -> str | None:
    """A one-line operator input of 1..limit characters, else None."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > limit or any(ch in value for ch in "\r\n\x00"):
        return None
    return value


def _whole(value: str | None, most: int = 10**12) -> int | None:
    try:
        number = int((value or "").strip())
    except ValueError:
        return None
    return number if 0 < number <= most else None


def _audit_filter(request: Request) -> tuple[AuditFilter, str | None]:
    """The Audit page's filters (those of `audit list`) and the keyset cursor; a problem to show, if any."""
    q = request.query_params
    values: dict[str, Any] = {}
    for name in ("account", "agent", "tool"):
        value = q.get(name, "").strip()
        if value:
            if len(value) > 200:
                return AuditFilter(), f"{name} is too long"
            values[name] = value
    outcome = q.get("outcome", "")
    if outcome:
        if outcome not in OUTCOMES:
            return AuditFilter(), "outcome must be ok, denied or error"
        values["outcome"] = outcome
    for name in ("since", "until"):
        value = q.get(name, "").strip()
        if value:
            try:
                values[name] = rfc3339(parse_rfc3339(value))
            except ValueError:
                return AuditFilter(), f"{name} must be an RFC 3339 time, e.g. 2026-11-01T00:00:00Z"
    before = q.get("before", "")
    if before:
        if not before.isdigit() or len(before) > 19:
            return AuditFilter(), "before must be an event id"
        values["before_id"] = int(before)
    return AuditFilter(**values), None


def _event_row(rec: Any) -> dict[str, Any]:
    try:
        args = json.loads(rec.args)
    except ValueError:
        args = {}
    return {
        "id": rec.id, "ts": rec.ts[:19] + "Z", "account": rec.account or "-", "agent": rec.agent or "-",
        "tool": rec.tool or "(auth)", "outcome": rec.outcome, "code": rec.code or "", "transport": rec.transport,
        # control characters shown escaped, as the CLI does; HTML is escaped by the template
        "summary": escape_controls(overview.summary(args) if isinstance(args, dict) else ""),
        "args": escape_controls(json.dumps(args, ensure_ascii=False, sort_keys=True)),
    }
