"""Calls to providers' APIs for `call_api` (SPEC §8): the one HTTP client that carries brokered tokens.

Separate from the Auth0 client, with its own pool and limits. It never follows a redirect, never
reads proxy settings or `.netrc` from the environment (a proxy would see every token), bounds the
body it reads, and replaces every occurrence of the token in the answer's headers and body with
`[redacted]` before anything else sees it. Which URLs it may be sent to is decided before it is
called (server.api_url): this module trusts its caller on that.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx

REDACTED = "[redacted]"
USER_AGENT = "token-vault-mcp"
# Answer headers an agent may see (SPEC §8); everything else stays in the broker.
PASSED_HEADERS = frozenset(
    {"content-type", "content-length", "etag", "last-modified", "link", "location", "retry-after"}
)
PASSED_PREFIXES = ("x-ratelimit-", "ratelimit-")
_TEXT_TYPES = (
    "text/", "application/json", "application/xml", "application/javascript", "application/x-www-form-urlencoded"
)


# At DEBUG these libraries log raw headers (httpcore the answer's, hpack every HTTP/2 header, the
# request's Authorization included): a provider echoing the token would put it in a log. They are held at
# WARNING whatever TVM_LOG_LEVEL says; httpx's own INFO line carries the URL, which an agent chose.
QUIET_LOGGERS = ("httpcore", "hpack", "h2", "httpx")
for _name in QUIET_LOGGERS:
    logging.getLogger(_name).setLevel(logging.WARNING)


class ProviderUnreachable(Exception):
    """The provider could not be reached or did not answer within the call's time (message says which)."""


@dataclass(frozen=True)
class ProviderRequest:
    method: str
    url: str
    headers: Sequence[tuple[str, str]] = ()
    content: bytes | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class ProviderAnswer:
    status: int
    headers: dict[str, str]
    body: str = field(repr=False)
    body_encoding: str  # "text" | "base64"
    truncated: bool
    elapsed_ms: float


def _http2() -> bool:
    try:
        import h2  # noqa: F401  (httpx speaks HTTP/2 only with it)
    except ImportError:  # pragma: no cover - a declared dependency
        return False
    return True


class ProviderClient:
    """A pooled client for provider APIs. `send` one request with a token; `aclose` at shutdown.

    `mounts` routes some origins to other transports (the demo's in-process provider API).
    """

    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        mounts: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        max_connections: int = 100,
    ) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._http = httpx.AsyncClient(
            http2=_http2(),
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=min(20, max_connections), keepalive_expiry=30
            ),
            headers={"User-Agent": USER_AGENT},
            mounts=dict(mounts or {}),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, request: ProviderRequest, token: str, within: float | None = None) -> ProviderAnswer:
        """Send `request` with `Authorization: Bearer token`; the answer scrubbed and bounded.

        A provider's 4xx/5xx is an answer like any other. Raises ProviderUnreachable when nothing came
        back within `within` seconds (default: the client's timeout; connecting, sending and reading included).
        """
        limit = self.timeout if within is None else max(0.0, within)
        headers = [(name, value) for name, value in request.headers]
        if request.content_type is not None:
            headers.append(("content-type", request.content_type))
        headers.append(("authorization", f"Bearer {token}"))
        started = time.perf_counter()
        try:
            async with asyncio.timeout(limit):
                async with self._http.stream(
                    request.method, request.url, headers=headers, content=request.content
                ) as response:
                    raw, cut = await _read_bounded(response, self.max_bytes, len(token))
        except (TimeoutError, httpx.TimeoutException):
            raise ProviderUnreachable(f"the provider did not answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise ProviderUnreachable(f"the provider could not be reached ({type(exc).__name__})") from None
        elapsed = (time.perf_counter() - started) * 1000
        body = scrub_bytes(raw, token)
        truncated = cut or len(body) > self.max_bytes
        body = body[: self.max_bytes]
        text, encoding = _decode(body, response.headers.get("content-type"), truncated)
        return ProviderAnswer(
            status=response.status_code,
            headers=_passed_headers(response.headers, token),
            body=text,
            body_encoding=encoding,
            truncated=truncated,
            elapsed_ms=elapsed,
        )


async def _read_bounded(response: httpx.Response, max_bytes: int, token_length: int) -> tuple[bytes, bool]:
    """Up to `max_bytes` of the body, plus enough to see a token that straddles the cut; whether more was left."""
    want = max_bytes + max(0, token_length - 1)
    chunks: list[bytes] = []
    have = 0
    async for chunk in response.aiter_bytes():  # decoded (gzip …): the token is looked for in what the agent sees
        chunks.append(chunk)
        have += len(chunk)
        if have > want:
            return b"".join(chunks)[:want], True
    return b"".join(chunks), False


def scrub_bytes(data: bytes, token: str) -> bytes:
    """`data` with every occurrence of `token` replaced by `[redacted]`."""
    return data.replace(token.encode(), REDACTED.encode()) if token else data


def scrub_text(text: str, token: str) -> str:
    return text.replace(token, REDACTED) if token else text


def _passed_headers(headers: httpx.Headers, token: str) -> dict[str, str]:
    passed: dict[str, str] = {}
    for name, value in headers.multi_items():
        key = name.lower()
        if key in PASSED_HEADERS or key.startswith(PASSED_PREFIXES):
            clean = scrub_text(value, token)
            passed[key] = f"{passed[key]}, {clean}" if key in passed else clean
    return passed


def _decode(body: bytes, content_type: str | None, truncated: bool) -> tuple[str, str]:
    """Text when the body is text (UTF-8 or the declared charset), else base64."""
    kind = (content_type or "").split(";")[0].strip().lower()
    charset = "utf-8"
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"').lower()
    texty = not kind or kind.startswith(_TEXT_TYPES) or kind.endswith(("+json", "+xml"))
    if texty:
        try:
            decoder = codecs.getincrementaldecoder(charset)(errors="strict")
            # a cut body may end inside a character: leave out the incomplete tail, not the whole text
            return decoder.decode(body, final=not truncated), "text"
        except (LookupError, UnicodeDecodeError):
            pass
    return base64.b64encode(body).decode("ascii"), "base64"
