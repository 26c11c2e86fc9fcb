"""Constants of the test tenant, a clock tests move by hand, and answer checks."""

from __future__ import annotations

import shlex

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
