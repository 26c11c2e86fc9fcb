"""The emulator's HTML pages: Auth0's Universal Login sign-in, a provider's consent screen, and
the error page Auth0 shows when it cannot trust the redirect.

Rendered with Jinja2 with autoescaping on: every value (state, user names, client ids, scopes)
may be hostile. No script at all, and a Content-Security-Policy that forbids it; `form-action`
names the one origin a form may end up at (browsers check it across the 302 that follows the
POST).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from jinja2 import DictLoader, Environment, select_autoescape
from starlette.responses import HTMLResponse

_LAYOUT = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>{{ title }}</title></head>
<body>
<main>
<h1>{{ title }}</h1>
{% block body %}{% endblock %}
</main>
<footer><p>Auth0 emulator at {{ tenant }}: not a real Auth0 tenant.</p></footer>
</body>
</html>
"""

_SIGN_IN = """{% extends "layout.html" %}{% block body %}
<p>Application <code>{{ client_id }}</code> asks you to sign in.</p>
{% if error %}<p role="alert">{{ error }}</p>{% endif %}
{% for user in users %}
<form method="post" action="{{ action }}">
<input type="hidden" name="txn" value="{{ txn }}">
<input type="hidden" name="sub" value="{{ user.sub }}">
<button type="submit">Continue as {{ user.name }} ({{ user.sub }})</button>
</form>
{% endfor %}
<form method="post" action="{{ action }}">
<input type="hidden" name="txn" value="{{ txn }}">
<label>User id <input name="sub" autocomplete="username" maxlength="256"></label>
<button type="submit">Sign in</button>
</form>
{% endblock %}
"""

_CONSENT = """{% extends "layout.html" %}{% block body %}
<p>{{ user }} is connecting their <strong>{{ connection }}</strong> account.</p>
<p>Requested access:</p>
<ul>{% for scope in scopes %}<li><code>{{ scope }}</code></li>
{% else %}<li>(the connection's defaults)</li>{% endfor %}</ul>
<form method="post" action="{{ action }}">
<input type="hidden" name="ticket" value="{{ ticket }}">
<button type="submit" name="decision" value="approve">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button>
</form>
{% endblock %}
"""

_ERROR = """{% extends "layout.html" %}{% block body %}
<p><code>{{ error }}</code>: {{ description }}</p>
{% endblock %}
"""

_ENV = Environment(
    loader=DictLoader(
        {"layout.html": _LAYOUT, "sign_in.html": _SIGN_IN, "consent.html": _CONSENT, "error.html": _ERROR}
    ),
    autoescape=select_autoescape(default=True, default_for_string=True),
)
_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://[A-Za-z0-9.\-\[\]:]+")


def page(template: str, *, status: int = 200, form_target: str | None = None, **values: Any) -> HTMLResponse:
    """`template` rendered with `values` (escaped), with the headers every emulator page carries.

    `form_target` is the URL a form's POST redirects to, whose origin `form-action` allows.
    """
    html = _ENV.get_template(template).render(**values)
    sources = ["'self'"]
    origin = origin_of(form_target) if form_target else None
    if origin:
        sources.append(origin)
    policy = (
        "default-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        f"form-action {' '.join(sources)}"
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    return HTMLResponse(html, status_code=status, headers=headers)


def error_page(tenant: str, error: str, description: str, *, status: int = 400) -> HTMLResponse:
    """The page Auth0 shows instead of redirecting (unknown client, callback URL mismatch, bad ticket)."""
    return page("error.html", status=status, title="Something went wrong", tenant=tenant, error=error,
                description=description)


def origin_of(url: str) -> str | None:
    """`scheme://host[:port]` of `url` if it is safe to name in a CSP header, else None."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    return origin if _ORIGIN.fullmatch(origin) and "@" not in parts.netloc else None
