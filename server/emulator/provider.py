"""A small provider API (`/provider/{connection}/…`) that accepts only tokens this tenant's Token Vault
issued for that connection, and answers with what it saw: the demo's GitHub, Google or Stripe.

Not Auth0's: a stand-in for the third-party API behind a connection, so `call_api` works end to
end with no tenant and no provider account. Every request is recorded in `state.provider_requests`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.emulator.state import EmulatorState, ProviderRequestSeen

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
MAX_ECHO = 4096  # bytes of a request body echoed back


def provider_routes(state: EmulatorState) -> list[Route]:
    """The provider API's routes, bound to `state`."""

    async def handle(request: Request) -> Response:
        connection = request.path_params["connection"]
        path = "/" + request.path_params.get("path", "")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        issue = state.provider_token(token.strip(), connection) if scheme.lower() == "bearer" else None
        state.provider_requests.append(
            ProviderRequestSeen(connection, request.method, path, token.strip() or None, issue is not None)
        )
        if issue is None:
            return JSONResponse(
                {"message": "Bad credentials", "documentation_url": "https://docs.example/provider#auth"},
                status_code=401,
                headers={"www-authenticate": f'Bearer realm="{connection}"'},
            )
        body = await request.body()
        return JSONResponse(
            {
                "connection": connection,
                "account": issue.sub,
                "scopes": list(issue.scopes),
                "method": request.method,
                "path": path,
                "query": request.url.query,
                "body": body[:MAX_ECHO].decode("utf-8", errors="replace"),
            },
            headers={"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "4999"},
        )

    return [
        Route("/provider/{connection}", handle, methods=METHODS),
        Route("/provider/{connection}/{path:path}", handle, methods=METHODS),
    ]
