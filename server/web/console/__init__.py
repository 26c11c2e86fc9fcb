"""The operator console (SPEC §11): `/console` on the remote server, or `token-vault-mcp console` locally.

- `app.Console`: the pages and actions (Jinja2 templates in `templates/`, CSS and the one script in
  `static/`, shipped in the package: no build step, no CDN).
- `signin`: a one-time link (local, demo) or Auth0 authorization code + PKCE with `manage:broker`.
- `session`: the session cookie and its CSRF token.
- `chart`: the Market page's V(t) line, from `server.pricing` (the tools' own price function).
"""

from __future__ import annotations

import getpass

from server.app import Runtime
from server.broker import Broker
from server.web.console.app import PREFIX, Console
from server.web.console.session import Sessions
from server.web.console.signin import Auth0SignIn, LinkSignIn

__all__ = ["PREFIX", "Console", "local_console", "local_operator", "remote_console"]


def local_operator() -> str:
    """Who signs in with a one-time link: the user running the console, as the audit log names them."""
    try:
        return "console:" + getpass.getuser()
    except (KeyError, OSError):  # pragma: no cover - a container without a passwd entry
        return "console:operator"


def local_console(broker: Broker, trusted_origins: frozenset[str] = frozenset()) -> Console:
    """A console that signs in with one-time links (call `console.signin.announce(base_url)` once serving)."""
    sessions = Sessions()
    return Console(broker, LinkSignIn(sessions, local_operator()), sessions, trusted_origins)


def remote_console(
    runtime: Runtime, trusted_origins: frozenset[str], public_origin: str | None = None
) -> Console | None:
    """The remote server's console: one-time links in demo mode, Auth0 sign-in with a tenant (None when
    TVM_CONSOLE_CLIENT_ID is not set: there is no console then). `public_origin` is where browsers reach
    the server (TVM_RESOURCE_URL's origin): the Auth0 callback is built on it, cookies are Secure on https."""
    if runtime.tenant is not None:
        return local_console(runtime.broker, trusted_origins)
    config = runtime.config
    if config.console_client_id is None or config.audience is None:
        return None
    sessions = Sessions()
    signin = Auth0SignIn(runtime.auth0, runtime.verifier, config.audience, config.console_client_id,
                         config.console_client_secret)
    return Console(runtime.broker, signin, sessions, trusted_origins, public_origin)
