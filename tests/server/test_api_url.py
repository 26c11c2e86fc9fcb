"""A listing's API base URLs in one normal form, and everything a base may not carry refused (SPEC §8)."""

from __future__ import annotations

import pytest

from server.api_url import normalise_base


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("https://api.github.com", "https://api.github.com"),
        ("HTTPS://API.GitHub.com:443/", "https://api.github.com"),
        ("http://api.example.com:80/v1/", "http://api.example.com/v1"),
        ("https://api.example.com:80/v1", "https://api.example.com:80/v1"),  # 80 is not https's default
        ("http://127.0.0.1:8123/provider/github", "http://127.0.0.1:8123/provider/github"),
        ("http://[::1]:80/x", "http://[::1]/x"),
        ("http://[0:0:0:0:0:0:0:1]:9000", "http://[::1]:9000"),
        ("https://10.0.0.7/api/Repos", "https://10.0.0.7/api/Repos"),  # a path keeps its case
        ("https://api.example.com/a%20b", "https://api.example.com/a%20b"),
    ],
)
def test_a_base_is_kept_in_its_normal_form(given: str, normal: str) -> None:
    assert normalise_base(given) == normal
    assert normalise_base(normal) == normal


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("ftp://api.github.com", "is not an absolute http:// or https:// URL"),
        ("api.github.com", "is not an absolute http:// or https:// URL"),
        ("https:api.github.com", "is not an absolute http:// or https:// URL"),
        ("https://user:secret@api.github.com", "carries userinfo"),
        ("https://api.github.com/?page=1", "has a query"),
        ("https://api.github.com?", "has a query"),
        ("https://api.github.com/#top", "has a fragment"),
        ("https://api.github.com\\repos", "a backslash"),
        ("https://api.github.com/re pos", "whitespace"),
        ("https://api.github.com/\x1b[2J", "a control character"),
        ("https://api.github.com:0", "has an invalid port"),
        ("https://api.github.com:99999", "has an invalid port"),
        ("https://api.github.com:https", "has an invalid port"),
        ("http://[::1", "is not a valid URL"),
        ("http://[fe80::1%25eth0]/", "has an invalid IPv6 address"),
        ("https://", "is not an absolute http:// or https:// URL"),
        ("https://:443/x", "has no host"),
        ("https://api..github.com", "has an invalid host name"),
        ("https://b\u00fccher.example", "has an invalid host name"),
        ("https://api.github.com/a/../b", "path segment"),
        ("https://api.github.com/a/%2e%2E/b", "path segment"),
        ("https://api.github.com/./b", "path segment"),
        ("https://api.github.com/a//b", "path segment"),
        ("https://api.github.com/a%2Fb", "path segment"),
        ("https://api.github.com/a%zz", "malformed percent escape"),
    ],
)
def test_a_base_with_anything_a_parser_could_read_two_ways_is_refused(given: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        normalise_base(given)
    message = str(caught.value)
    assert problem in message, message
    assert "\n" not in message and "\x1b" not in message  # one line, the URL shown escaped
