"""Whether an agent's URL lies under one of a listing's `api` bases (SPEC §8 allowlist).

The agent's URL is hostile. It is refused outright when it carries anything a parser could
read two ways: userinfo, a fragment, a backslash (raw or percent-encoded), raw whitespace, a
control character (raw or percent-encoded), a malformed percent escape, an encoded slash, or
a `.`/`..`/empty path segment (raw or percent-encoded). What is left is compared with each
base (server.api_url normal form): scheme and host case-insensitively, default ports
dropped, and the path segment by segment after percent-decoding, so `/repos` admits
`/repos/x` but not `/reposX`.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from server.api_url import DEFAULT_PORTS, normalise_base, unsafe_chars

MAX_URL_LENGTH = 8192
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
class NotAllowed(ValueError):
    """The URL is malformed or outside every base (the message says which, without echoing the URL)."""


@dataclass(frozen=True)
class AdmittedUrl:
    url: str  # what is sent: the agent's own path and query under the normal scheme, host and port
    base: str  # the base it lies under
    audit_url: str  # the URL with query values removed (keys kept), for the audit log


def admit(url: str, bases: Iterable[str]) -> AdmittedUrl:
    """The URL to send if `url` lies under one of `bases`. Raises NotAllowed."""
    origin, segments, path, query = _parse(url)
    for base in bases:
        base_origin, _, base_path = _split_base(base)
        if base_origin != origin:
            continue
        wanted = [unquote(s) for s in base_path.split("/")[1:]] if base_path else []
        if segments[: len(wanted)] == wanted:
            sent = origin + path + (f"?{query}" if query else "")
            return AdmittedUrl(sent, base, keys_only(origin + path + (f"?{query}" if query else "")))
    raise NotAllowed("the url is not under any API base URL of the listing")


def _parse(url: str) -> tuple[str, list[str], str, str]:
    """(normal origin, decoded path segments, raw path, raw query). Raises NotAllowed."""
    if len(url) > MAX_URL_LENGTH:
        raise NotAllowed(f"the url is longer than {MAX_URL_LENGTH} characters")
    if unsafe_chars(url):
        raise NotAllowed("the url contains whitespace, a backslash or a control character")
    if "#" in url:
        raise NotAllowed("the url has a fragment")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise NotAllowed("the url is not a valid URL") from None
    if parts.scheme.lower() not in DEFAULT_PORTS or not parts.netloc:
        raise NotAllowed("the url is not an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise NotAllowed("the url carries userinfo (user@host); the broker sets Authorization itself")
    try:
        origin = normalise_base(f"{parts.scheme}://{parts.netloc}")
    except ValueError:
        raise NotAllowed("the url has an invalid host or port") from None
    path = parts.path or "/"
    if _BAD_ESCAPE.search(path) or _BAD_ESCAPE.search(parts.query):
        raise NotAllowed("the url has a malformed percent escape")
    raw = path.split("/")[1:]
    segments = [unquote(s) for s in raw]
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment in (".", "..") or (segment == "" and not last):
            raise NotAllowed("the url has a '.', '..' or empty path segment")
        if "/" in segment or "\\" in segment or any(unicodedata.category(ch) in ("Cc", "Cf") for ch in segment):
            raise NotAllowed("the url has an encoded slash, backslash or control character in its path")
    if segments and segments[-1] == "":
        segments = segments[:-1]
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in unquote(parts.query)):
        raise NotAllowed("the url has a control character in its query")
    return origin, segments, path, parts.query


def _split_base(base: str) -> tuple[str, str, str]:
    parts = urlsplit(base)
    origin = f"{parts.scheme}://{parts.netloc}"
    return origin, parts.netloc, parts.path


def keys_only(url: str) -> str:
    """`…?a=1&b=2&c` → `…?a=&b=&c=`: which parameters, never their values (they may be secrets or data).

    Any fragment is dropped too. For the audit log, whatever the URL turns out to be.
    """
    head, _, query = url.partition("#")[0].partition("?")
    if not query:
        return head
    return head + "?" + "&".join(part.split("=", 1)[0] + "=" for part in query.split("&") if part)
