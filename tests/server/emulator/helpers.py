"""Constants of the test tenant, a clock tests move by hand, and answer checks."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import shlex
from typing import Any
from urllib.parse import parse_qsl

import httpx

ISSUER = "https://tenant.example/"
API = "https://api.example/"
API_SCOPES = ["read:market", "read:balance", "buy:quota", "request:token"]
CLIENT_ID = "broker"
CLIENT_SECRET = "broker-secret"
OTHER_CLIENT_ID = "other"
OTHER_SECRET = "other-secret"
NATIVE_ID = "cli"
USER = "auth0|alice"


class FakeClock:
    """UNIX seconds that only move when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def error_of(response: httpx.Response) -> tuple[int, str]:
    """The status and Auth0 error code of an error answer (and a check of its shape)."""
    body = response.json()
    assert set(body) == {"error", "error_description"}, body
    assert body["error_description"]
    return response.status_code, body["error"]


def parse_exports(text: str) -> dict[str, str]:
    """The `export NAME=value` lines of the emulator's settings, as a dict."""
    found = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "export":
            name, _, value = words[1].partition("=")
            found[name] = value
    return found


CALLBACK = "http://127.0.0.1:5123/callback"  # the test client's (loopback) redirect URI
WEB_CALLBACK = "https://app.example/callback"  # a registered (non-loopback) callback


def pkce_pair() -> tuple[str, str]:
    """A fresh PKCE verifier and its S256 challenge, computed here independently of the emulator."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


class Callbacks:
    """A stand-in for the client's redirect endpoints: records the query of each request it gets."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.seen.append(dict(parse_qsl(scope["query_string"].decode(), keep_blank_values=True)))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


def hidden_value(html: str, name: str) -> str:
    """The value of the first hidden input `name` of a page."""
    match = re.search(rf'<input type="hidden" name="{re.escape(name)}" value="([^"]*)">', html)
    assert match, f"no hidden {name} in the page"
    return match.group(1)
