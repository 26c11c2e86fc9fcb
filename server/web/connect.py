"""The connect flow's pages (SPEC §10): `/connect/{id}` → Auth0 sign-in → My Account `connect` → the provider's
consent → `/connect/complete` → My Account `complete` → "connected; go back to your agent".

Every value the browser carries between steps is sealed (server.sealing, TVM_STATE_KEYS): the `state` of
each redirect names the link and a nonce, and an HttpOnly cookie (SameSite=Lax: it must come back on the
top-level redirects from Auth0) holds the PKCE verifiers, the My Account session and the user's My Account
token, so no token is ever in a URL, the database or a log, and any process with the same keys and
database can serve any step. The signed-in user must be the link's account (the MCP specification's MUST
for URL elicitation). Every failure is a page a person can act on, and ends the flow with an audit event.
Pages are Jinja2 templates with autoescaping, served with a strict Content-Security-Policy (no script).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from server.auth0 import my_account
from server.auth0.client import Auth0Client, Auth0Error
from server.auth0.token_verifier import InvalidToken, JwtVerifier
from server.connect import ConnectFlows, LinkRefused, Refusal
from server.models import ConnectLink
from server.sealing import Sealer, StateRejected

log = logging.getLogger(__name__)

COOKIE = "tvm_connect"
STEP_AGE = 600.0  # seconds a sealed state or cookie is good for (a link lives 10 minutes)
TRANSPORT = "connect"  # the audit events' transport: the browser flow, not an MCP transport
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the link's id must not travel to Auth0 or the provider in a Referer
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
_TEMPLATES = Environment(
    loader=PackageLoader("server.web", "templates"), autoescape=select_autoescape(default=True), auto_reload=False
)
_STYLE = resources.files("server.web").joinpath("static/connect.css").read_bytes()


@dataclass
class ConnectSite:
    """What the pages need: the tenant, the flows, the sign-in client, the seals and where they are served."""

    auth0: Auth0Client
    flows: ConnectFlows
    client_id: str
    keys: tuple[bytes, ...]
    public_url: Callable[[], Awaitable[str]]

    def __post_init__(self) -> None:
        self.signin_state = Sealer(self.keys, "connect/signin-state")
        self.provider_state = Sealer(self.keys, "connect/provider-state")
        self.cookie = Sealer(self.keys, "connect/cookie")
        self.me_verifier = JwtVerifier(self.auth0, my_account.my_account_audience(self.auth0))


def connect_routes(site: ConnectSite) -> list[Route]:
    """The routes of the flow, to mount beside /mcp (remote) or on the loopback listener (stdio, CLI)."""

    async def style(request: Request) -> Response:
        return _style()

    async def start(request: Request) -> Response:
        return await _start(site, request)

    async def callback(request: Request) -> Response:
        return await _callback(site, request)

    async def complete(request: Request) -> Response:
        return await _complete(site, request)

    return [
        Route("/connect/static/connect.css", style, methods=["GET"]),
        Route("/connect/callback", callback, methods=["GET"]),
        Route("/connect/complete", complete, methods=["GET"]),
        Route("/connect/{link_id}", start, methods=["GET"]),
    ]


async def _start(site: ConnectSite, request: Request) -> Response:
    """Use the link once, then send the browser to Auth0 to sign in (authorization code + PKCE)."""
    try:
        link = await site.flows.open(str(request.path_params["link_id"]), TRANSPORT)
    except LinkRefused as exc:
        return page("This link cannot be used", str(exc), 410)
    base = await site.public_url()
    nonce, verifier = secrets.token_urlsafe(16), secrets.token_urlsafe(48)
    state = site.signin_state.seal({"n": nonce, "l": link.id})
    target = site.auth0.authorize_url(
        client_id=site.client_id, redirect_uri=f"{base}/connect/callback", scope=my_account.CONNECT_SCOPE,
        audience=my_account.my_account_audience(site.auth0), state=state, code_challenge=_challenge(verifier),
    )
    response = RedirectResponse(target, status_code=303)
    _set_cookie(response, site, base, {"n": nonce, "l": link.id, "v": verifier})
    return response


async def _callback(site: ConnectSite, request: Request) -> Response:
    """Auth0 sent the browser back: trade the code, check who signed in, start the connection at Auth0."""
    step = await _step(site, request, site.signin_state, "sign-in")
    if isinstance(step, Response):
        return step
    link, carried = step
    if "error" in request.query_params:
        return await _refuse(site, link, "unauthenticated", "the Auth0 sign-in did not complete", "sign-in",
                             _auth0_said(request), status=401)
    code = request.query_params.get("code", "")
    if not code or len(code) > 2048:
        return await _refuse(site, link, "unauthenticated", "Auth0 sent no authorization code", "sign-in")
    base = await site.public_url()
    try:
        tokens = await site.auth0.exchange_code(
            client_id=site.client_id, code=code, redirect_uri=f"{base}/connect/callback", code_verifier=carried["v"]
        )
        claims = await site.me_verifier.verify(tokens.access_token)
    except Auth0Error as exc:
        return await _auth0_failed(site, link, exc, "sign-in")
    except InvalidToken as exc:
        return await _refuse(site, link, "unauthenticated", f"the sign-in token was refused: {exc}", "sign-in")
    signed_in = claims.get("sub")
    if signed_in != link.account:
        await site.flows.refuse(
            link, Refusal("unauthenticated", "signed in as another user than the link's account"), "sign-in",
            TRANSPORT, signed_in_as=str(signed_in)[:200],
        )
        return page(
            "Signed in as someone else",
            "You signed in to Auth0 as a different user than the one whose agent asked for this connection, so "
            "nothing was connected. Go back to your agent, call the tool again for a new link, and sign in as "
            "the same user the agent works for.",
            403,
        )
    verifier = secrets.token_urlsafe(48)
    state = site.provider_state.seal({"n": carried["n"], "l": link.id})
    try:
        started = await my_account.start_connect(
            site.auth0, tokens.access_token, connection=link.connection, redirect_uri=f"{base}/connect/complete",
            state=state, scopes=list(link.scopes), code_challenge=_challenge(verifier),
        )
    except Auth0Error as exc:
        return await _auth0_failed(site, link, exc, "connect")
    if urlsplit(started.connect_uri).scheme not in ("https", "http"):
        return await _refuse(site, link, "vault_unavailable", "Auth0 sent a connect address that is not a web page",
                             "connect")
    response = RedirectResponse(started.browser_url, status_code=303)
    _set_cookie(response, site, base, {
        "n": carried["n"], "l": link.id, "t": tokens.access_token, "s": started.auth_session, "v2": verifier,
    })
    return response


async def _complete(site: ConnectSite, request: Request) -> Response:
    """The provider's consent is over: finish the connection at Auth0, say so, end the flow."""
    step = await _step(site, request, site.provider_state, "consent")
    if isinstance(step, Response):
        return step
    link, carried = step
    if "error" in request.query_params:
        return await _refuse(site, link, "vault_denied", f"{link.connection} did not grant access", "consent",
                             _auth0_said(request), status=403)
    code = request.query_params.get("connect_code", "")
    if not code or len(code) > 2048 or not all(k in carried for k in ("t", "s", "v2")):
        return await _refuse(site, link, "vault_denied", "no connect code came back", "consent")
    base = await site.public_url()
    try:
        account = await my_account.complete_connect(
            site.auth0, carried["t"], auth_session=carried["s"], connect_code=code,
            redirect_uri=f"{base}/connect/complete", code_verifier=carried["v2"],
        )
    except Auth0Error as exc:
        return await _auth0_failed(site, link, exc, "complete")
    if not await site.flows.complete(link, account.id, TRANSPORT):
        return page("This link cannot be used", "This connect flow had already ended. Go back to your agent and "
                    "call the tool again.", 409)
    response = page(
        "Connected",
        f"Your {link.connection} account is connected. Go back to your agent: its next call will work.",
        200,
    )
    response.delete_cookie(COOKIE, path="/connect")
    return response


async def _step(
    site: ConnectSite, request: Request, sealer: Sealer, step: str
) -> tuple[ConnectLink, dict[str, Any]] | Response:
    """The link a redirect back belongs to, when its `state` is ours and this browser started the flow."""
    try:
        carried = site.cookie.open(request.cookies.get(COOKIE, ""), STEP_AGE)
    except StateRejected:
        carried = None
    try:
        state = sealer.open(request.query_params.get("state", ""), STEP_AGE)
    except StateRejected:
        state = None
    if state is None or carried is None:
        log.info("connect %s: a state or cookie that is not ours, altered or too old", step)
        if carried is not None:  # this browser's flow came back with a state we did not seal: it ends here
            link = await site.flows.get(str(carried.get("l", "")))
            if link is not None and link.live(site.flows.broker.clock.now()):
                await site.flows.refuse(link, Refusal("invalid_argument", "a state that is not ours came back"),
                                        step, TRANSPORT)
        return page(
            "This sign-in cannot be trusted",
            "The page that sent you here did not come from this connect flow, was changed, was opened in "
            "another browser, or is too old. Nothing was connected. Go back to your agent and call the tool "
            "again for a new link, and finish it in this browser within 10 minutes.",
            400,
        )
    if carried.get("n") != state.get("n") or carried.get("l") != state.get("l"):
        return page("This sign-in cannot be trusted", "This browser did not start this connect flow. Nothing was "
                    "connected. Go back to your agent and call the tool again for a new link.", 400)
    link = await site.flows.get(str(state.get("l", "")))
    if link is None or link.status != "opened" or not link.live(site.flows.broker.clock.now()):
        return page("This link cannot be used", "This connect flow has ended or expired. Go back to your agent "
                    "and call the tool again for a new link.", 410)
    return link, carried


async def _auth0_failed(site: ConnectSite, link: ConnectLink, exc: Auth0Error, step: str) -> Response:
    unavailable = exc.unreachable or (exc.status or 0) >= 500 or exc.status == 429
    code = "vault_unavailable" if unavailable else "vault_denied"
    said = f"{exc.error or 'no answer'}" + (f": {exc.description}" if exc.description else "")
    reason = f"Auth0 refused the {step} step ({said})" if not unavailable else f"Auth0 was unavailable ({said})"
    return await _refuse(site, link, code, reason, step, status=502 if unavailable else 400)


async def _refuse(
    site: ConnectSite, link: ConnectLink, code: str, reason: str, step: str, detail: str | None = None,
    status: int = 400,
) -> Response:
    """End the flow as refused (audited) and show why, with what to do next."""
    await site.flows.refuse(link, Refusal(code, reason if detail is None else f"{reason} ({detail})"), step, TRANSPORT)
    text = f"{reason[0].upper()}{reason[1:]}" + (f" ({detail})" if detail else "") + ". Nothing was connected. "
    text += "Go back to your agent and call the tool again for a new link"
    text += ", and try again a little later." if code == "vault_unavailable" else "."
    return page("Not connected", text, status)


def _auth0_said(request: Request) -> str:
    error = request.query_params.get("error", "")[:100]
    description = request.query_params.get("error_description", "")[:300]
    return error + (f": {description}" if description else "")


def page(title: str, message: str, status: int) -> Response:
    """A page of the flow: escaped text, no script, strict CSP, never cached."""
    body = _TEMPLATES.get_template("connect/page.html").render(title=title, message=message, ok=status == 200)
    return Response(body, status_code=status, media_type="text/html; charset=utf-8", headers=_HEADERS)


def _style() -> Response:
    return Response(_STYLE, media_type="text/css", headers={**_HEADERS, "Cache-Control": "max-age=3600"})


def _challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


def _set_cookie(response: Response, site: ConnectSite, base: str, carried: dict[str, Any]) -> None:
    response.set_cookie(
        COOKIE, site.cookie.seal(carried), max_age=int(STEP_AGE), path="/connect", httponly=True, samesite="lax",
        secure=base.startswith("https://"),
    )
