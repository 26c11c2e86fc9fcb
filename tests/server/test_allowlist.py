"""The call_api allowlist: a URL under a listing's base, segment by segment, or refused (SPEC §8)."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.allowlist import NotAllowed, admit

BASES = ["https://api.github.com/repos", "http://127.0.0.1:8123/provider/github"]


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("https://api.github.com/repos", "https://api.github.com/repos"),
        ("https://api.github.com/repos/", "https://api.github.com/repos/"),
        ("https://api.github.com/repos/acme/x?per_page=5", "https://api.github.com/repos/acme/x?per_page=5"),
        ("HTTPS://API.GitHub.COM:443/repos/acme", "https://api.github.com/repos/acme"),
        ("https://api.github.com/%72epos/acme", "https://api.github.com/%72epos/acme"),  # %72 = r
        ("http://127.0.0.1:8123/provider/github/user", "http://127.0.0.1:8123/provider/github/user"),
    ],
)
def test_urls_under_a_base_are_admitted(url: str, sent: str) -> None:
    assert admit(url, BASES).url == sent


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/repos/x",  # another host
        "https://api.github.com.evil.example/repos/x",
        "https://api.github.com/repos/../user",  # dot segments, raw and encoded
        "https://api.github.com/repos/%2e%2e/user",
        "https://api.github.com/repos/%2E%2E/user",
        "https://api.github.com/repos/./x",
        "https://api.github.com/repos/.%2e/user",
        "https://api.github.com/reposX",  # a prefix that is not a segment boundary
        "https://api.github.com/repos-private/x",
        "https://api.github.com/user",
        "https://api.github.com@evil.example/repos",  # userinfo
        "https://user:pw@api.github.com/repos",
        "https://api.github.com\\@evil.example/repos",  # backslashes
        "https://api.github.com/repos\\..\\user",
        "https://api.github.com/repos/%5c../x",
        "https://api.github.com/repos%2f..%2fuser",  # an encoded slash
        "ftp://api.github.com/repos",  # another scheme
        "http://api.github.com/repos",
        "https://api.github.com:8443/repos",  # another port
        "http://127.0.0.1:8124/provider/github",
        "https://api.github.com/repos#frag",
        "https://api.github.com/repos/x y",
        "https://api.github.com/repos/x%00",
        "https://api.github.com/repos/x%0d%0aHost:%20evil",
        "https://api.github.com/repos\r\nHost: evil",
        "https://api.github.com/repos//x",
        "https://api.github.com/repos/%zz",
        "/repos/x",
        "api.github.com/repos",
        "https://api.github.com/repos?q=%0a",
        "https://[::1/repos",
        "https://api.github.com/repos/" + "a" * 9000,
    ],
)
def test_every_escape_is_refused(url: str) -> None:
    with pytest.raises(NotAllowed):
        admit(url, BASES)


def test_the_audit_url_keeps_query_keys_not_values() -> None:
    admitted = admit("https://api.github.com/repos/acme?per_page=5&token=s3cret&flag", BASES)
    assert admitted.audit_url == "https://api.github.com/repos/acme?per_page=&token=&flag="
    assert admitted.base == "https://api.github.com/repos"


def test_a_root_base_admits_every_path_of_its_origin_only() -> None:
    assert admit("https://api.stripe.com/v1/charges", ["https://api.stripe.com"]).url.endswith("/v1/charges")
    with pytest.raises(NotAllowed):
        admit("https://api.stripe.com.evil.example/v1", ["https://api.stripe.com"])


@given(st.text(alphabet=st.sampled_from("ab/.%2eE5cC\\@:?#&= \t"), max_size=30))
def test_an_admitted_url_never_leaves_its_base(tail: str) -> None:
    url = "https://api.github.com/repos" + tail
    try:
        admitted = admit(url, BASES)
    except NotAllowed:
        return
    parts = urlsplit(admitted.url)
    assert parts.netloc == "api.github.com" and parts.scheme == "https"
    segments = [unquote(s) for s in parts.path.split("/")[1:]]
    assert segments[0] == "repos" and ".." not in segments and "." not in segments


@given(st.text(max_size=40))
def test_the_ascii_fast_path_refuses_exactly_what_the_unicode_rule_refuses(text: str) -> None:
    import unicodedata

    from server.api_url import unsafe_chars

    slow = any(ch.isspace() or ch == "\\" or unicodedata.category(ch) in ("Cc", "Cf") for ch in text)
    assert unsafe_chars(text) is slow
    ascii_text = text.encode("ascii", "replace").decode()
    assert unsafe_chars(ascii_text) is any(
        ch.isspace() or ch == "\\" or unicodedata.category(ch) in ("Cc", "Cf") for ch in ascii_text
    )
