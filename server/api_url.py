"""Base URLs of provider APIs that `call_api` may reach (a listing's `api`, SPEC §8), in one normal form.

The normal form: scheme and host in lower case, the scheme's default port dropped, no trailing
slash (`HTTPS://API.GitHub.com:443/` → `https://api.github.com`). Userinfo, a query, a fragment,
backslashes, whitespace, control characters, malformed percent escapes and `.`/`..`/empty path
segments are refused. Plain `http` and loopback or private hosts are allowed: only the
operator's market file names a base, never an agent.
"""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?$")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ASCII_BAD = re.compile(r"[\x00-\x20\x7f\\]")  # whitespace, control characters and backslashes of ASCII


def unsafe_chars(text: str) -> bool:
    """Whether `text` has whitespace, a backslash, or a control or format character (bidi marks, …)."""
    if text.isascii():  # almost every URL: one regex instead of a Unicode lookup per character
        return _ASCII_BAD.search(text) is not None
    return any(ch.isspace() or ch == "\\" or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)



def normalise_base(text: str) -> str:
    """The normal form of an API base URL. Raises ValueError saying what is wrong (one line)."""
    shown = json.dumps(text)  # quoted, with any control character escaped: the message stays one line
    if unsafe_chars(text):
        raise ValueError(f"{shown} contains whitespace, a backslash or a control character")
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. an unclosed [ of an IPv6 address
        raise ValueError(f"{shown} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.netloc:
        raise ValueError(f"{shown} is not an absolute http:// or https:// URL")
    if "?" in text:
        raise ValueError(f"{shown} has a query; a base URL has none")
    if "#" in text:
        raise ValueError(f"{shown} has a fragment; a base URL has none")
    if "@" in parts.netloc:
        raise ValueError(f"{shown} carries userinfo; name the host only (the broker sets Authorization itself)")
    host = _host(parts.netloc, parts.hostname, shown)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown} has an invalid port") from None
    if port == 0:
        raise ValueError(f"{shown} has an invalid port")
    path = parts.path.rstrip("/")
    if _BAD_ESCAPE.search(path):
        raise ValueError(f"{shown} has a malformed percent escape in its path")
    for segment in path.split("/")[1:]:
        decoded = unquote(segment)
        if decoded in ("", ".", "..") or "/" in decoded or "\\" in decoded:
            raise ValueError(f"{shown} has an empty, '.', '..' or encoded-slash path segment")
    netloc = host if port is None or port == DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}"


def _host(netloc: str, hostname: str | None, shown: str) -> str:
    """The host as it appears in the normal form (an IPv6 address in brackets). Raises ValueError."""
    if not hostname:
        raise ValueError(f"{shown} has no host")
    if netloc.startswith("["):
        try:
            if "%" in hostname:  # a zone id names an interface of this machine, not a host
                raise ValueError(hostname)
            return f"[{ipaddress.IPv6Address(hostname).compressed}]"
        except ValueError:
            raise ValueError(f"{shown} has an invalid IPv6 address") from None
    if not _HOST_NAME.match(hostname):
        raise ValueError(f"{shown} has an invalid host name (an internationalised name goes in its xn-- form)")
    return hostname
