"""How a "connect your account" answer (server.connect.ConnectRequired) reaches each kind of MCP client (SPEC §10).

- a 2026-07-28 client that declared URL elicitation: an `InputRequiredResult` asking it to open the link;
  its retry carries the `requestState` (sealed by the SDK under TVM_STATE_KEYS) and runs the call again
  once the flow has ended;
- a 2025-11-25 (or older) client that declared it: JSON-RPC error -32042 with one URL elicitation, then
  `notifications/elicitation/complete` on that session when the flow ends (if the session still exists);
- any other client (Claude Code today): the `[account_not_connected] connect your … at URL, then call again`
  text, which always works.
"""

from __future__ import annotations

import json
from typing import Any

from mcp.server.mcpserver import Context
from mcp.shared.exceptions import UrlElicitationRequiredError
from mcp.types import CallToolResult, ElicitRequest, ElicitRequestURLParams, InputRequiredResult, TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from server.connect import ConnectFlows, ConnectRequired
from server.models import ConnectLink
from server.principal import Principal

INPUT_KEY = "connect"  # the key of the URL request in input_requests (and of its answer in input_responses)
Answer = CallToolResult | InputRequiredResult
RESUME_WAIT = 15.0  # seconds a retry waits for a flow still in progress before asking the client to retry again


def wants_url_elicitation(ctx: Context[Any, Any]) -> bool:
    """Whether the client declared URL-mode elicitation."""
    caps = ctx.client_capabilities
    return caps is not None and caps.elicitation is not None and caps.elicitation.url is not None


def modern(ctx: Context[Any, Any]) -> bool:
    """A 2026-07-28 (or later) connection: multi-round-trip results instead of server-to-client requests."""
    return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS


async def answer(ctx: Context[Any, Any], flows: ConnectFlows, needed: ConnectRequired) -> Answer:
    """The answer for this client. Raises UrlElicitationRequiredError (-32042) for a legacy client with URL
    elicitation."""
    if not wants_url_elicitation(ctx):
        return text_answer(needed)
    params = ElicitRequestURLParams(
        mode="url", message=_message(needed.link), url=needed.url, elicitation_id=needed.link.elicitation_id
    )
    if modern(ctx):
        state = json.dumps({"connect": needed.link.id})
        return InputRequiredResult(input_requests={INPUT_KEY: ElicitRequest(params=params)}, request_state=state)
    # Held (not a weak reference: the SDK's per-request session object is dropped as soon as this call
    # returns) until the flow ends or the link expires (10 minutes at most); a session that closed meanwhile
    # makes the send fail, which the watcher's caller logs and forgets.
    session = ctx.session

    async def tell(link: ConnectLink) -> None:
        await session.send_elicit_complete(link.elicitation_id)

    flows.watch(needed.link, tell)
    raise UrlElicitationRequiredError([params], message=needed.render())


async def resume(ctx: Context[Any, Any], flows: ConnectFlows) -> CallToolResult | InputRequiredResult | None:
    """A 2026-07-28 retry carrying our `requestState`: None to run the call again (the flow ended, or the state
    names no link of ours), the link as text when the user declined to open it, or another round (state only)
    while the flow is still in progress."""
    link_id = _state_link(ctx.request_state)
    if link_id is None:
        return None
    responses = ctx.input_responses or {}
    response = responses.get(INPUT_KEY)
    action = getattr(response, "action", None)
    link = await flows.get(link_id)
    if link is None:
        return None
    if action in ("decline", "cancel") and link.live(flows.broker.clock.now()):
        base = await flows.public_url()
        return text_answer(ConnectRequired(link, flows.url_of(base, link)))
    link = await flows.wait(link_id, RESUME_WAIT)
    if link is not None and link.live(flows.broker.clock.now()):
        return InputRequiredResult(request_state=ctx.request_state)
    return None


def text_answer(needed: ConnectRequired) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=needed.render())], is_error=True)


def bound_principal(ctx: Any) -> str | None:
    """Who a `requestState` is bound to (the SDK checks it on the retry): the caller our bearer check verified,
    in remote mode; None over stdio (one user)."""
    scope = getattr(getattr(ctx, "request", None), "scope", None)
    principal = scope.get("tvm.principal") if isinstance(scope, dict) else None  # server.web.remote.PRINCIPAL_KEY
    if not isinstance(principal, Principal):
        return None
    return json.dumps([principal.account, principal.agent])


def _message(link: ConnectLink) -> str:
    return (
        f"Connect your {link.connection} account (scopes: {' '.join(link.scopes)}) so the broker can get a token "
        "for it through Auth0 Token Vault. The page signs you in to Auth0 first."
    )


def _state_link(state: str | None) -> str | None:
    if not state:
        return None
    try:
        data = json.loads(state)
    except ValueError:
        return None
    link = data.get("connect") if isinstance(data, dict) else None
    return link if isinstance(link, str) else None
