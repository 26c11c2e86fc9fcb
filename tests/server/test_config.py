"""Configuration: defaults, and one clear line naming the variable for each wrong value."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.app import open_runtime
from server.config import load_config
from server.errors import ConfigError


def test_demo_defaults_and_domain_forms(tmp_path: Path) -> None:
    demo = load_config({}, dotenv=False)
    assert demo.demo and demo.database.name == "demo.db"
    real = load_config({"AUTH0_DOMAIN": "acme.us.auth0.com/", "AUTH0_CLIENT_ID": "c", "AUTH0_AUDIENCE": "a"},
                       dotenv=False)
    assert real.auth0_base_url == "https://acme.us.auth0.com"
    assert real.issuer == "https://acme.us.auth0.com/"
    assert real.database.name == "vault.db"
    local = load_config({"AUTH0_DOMAIN": "http://127.0.0.1:8123", "AUTH0_CLIENT_ID": "c", "AUTH0_AUDIENCE": "a"},
                        dotenv=False)
    assert local.issuer == "http://127.0.0.1:8123/"
    assert (demo.grant_ttl, demo.api_timeout, demo.api_max_bytes) == (300, 30.0, 262_144)
    tuned = load_config({"TVM_GRANT_TTL": "60", "TVM_API_TIMEOUT": "2.5", "TVM_API_MAX_BYTES": "1024"}, dotenv=False)
    assert (tuned.grant_ttl, tuned.api_timeout, tuned.api_max_bytes) == (60, 2.5, 1024)
    assert demo.metrics_port is None and load_config({"TVM_METRICS_PORT": "9464"}, dotenv=False).metrics_port == 9464
    secret = load_config({"AUTH0_CLIENT_SECRET": "s3cr3t", "TVM_REFRESH_TOKEN": "r3fr3sh"}, dotenv=False)
    assert "s3cr3t" not in repr(secret) and "r3fr3sh" not in repr(secret)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"AUTH0_DOMAIN": "http://example.com"}, "AUTH0_DOMAIN"),
        ({"AUTH0_DOMAIN": "ftp://x"}, "AUTH0_DOMAIN"),
        ({"AUTH0_DOMAIN": "acme.auth0.com", "AUTH0_AUDIENCE": "a"}, "AUTH0_CLIENT_ID"),
        ({"AUTH0_DOMAIN": "acme.auth0.com", "AUTH0_CLIENT_ID": "c"}, "AUTH0_AUDIENCE"),
        ({"TVM_LOG_LEVEL": "LOUD"}, "TVM_LOG_LEVEL"),
        ({"TVM_RESOURCE_URL": "not a url"}, "TVM_RESOURCE_URL"),
        ({"TVM_RESOURCE_URL": "http://public.example.com/mcp"}, "TVM_RESOURCE_URL"),
        ({"TVM_MARKET_FILE": "/no/such/market.toml"}, "TVM_MARKET_FILE"),
        ({"TVM_CLIENT_AUTH_METHOD": "magic"}, "TVM_CLIENT_AUTH_METHOD"),
        ({"TVM_AUTH0_TIMEOUT": "0"}, "TVM_AUTH0_TIMEOUT"),
        ({"TVM_GRANT_TTL": "1.5"}, "TVM_GRANT_TTL"),
        ({"TVM_GRANT_TTL": "0"}, "TVM_GRANT_TTL"),
        ({"TVM_GRANT_TTL": "86401"}, "TVM_GRANT_TTL"),
        ({"TVM_API_TIMEOUT": "nan"}, "TVM_API_TIMEOUT"),
        ({"TVM_API_TIMEOUT": "-1"}, "TVM_API_TIMEOUT"),
        ({"TVM_API_MAX_BYTES": "1e6"}, "TVM_API_MAX_BYTES"),
        ({"TVM_API_MAX_BYTES": "0"}, "TVM_API_MAX_BYTES"),
        ({"TVM_RESERVATION_LEASE": "0"}, "TVM_RESERVATION_LEASE"),
        ({"TVM_RESERVATION_LEASE": "1.5"}, "TVM_RESERVATION_LEASE"),
        ({"TVM_METRICS_PORT": "0"}, "TVM_METRICS_PORT"),
        ({"TVM_METRICS_PORT": "65536"}, "TVM_METRICS_PORT"),
        ({"TVM_METRICS_PORT": "-1"}, "TVM_METRICS_PORT"),
        ({"TVM_METRICS_PORT": "9464.0"}, "TVM_METRICS_PORT"),
        ({"TVM_METRICS_PORT": "http://127.0.0.1:9464"}, "TVM_METRICS_PORT"),
        ({"TVM_PUBLIC_URL": "broker.example.com"}, "TVM_PUBLIC_URL"),
        ({"TVM_PUBLIC_URL": "http://broker.example.com"}, "TVM_PUBLIC_URL"),
        ({"TVM_PUBLIC_URL": "https://broker.example.com/?x=1"}, "TVM_PUBLIC_URL"),
        ({"TVM_STATE_KEYS": "not base64!"}, "TVM_STATE_KEYS"),
        ({"TVM_STATE_KEYS": "c2hvcnQ="}, "TVM_STATE_KEYS"),
        ({"TVM_STATE_KEYS": ","}, "TVM_STATE_KEYS"),
    ],
)
def test_a_wrong_value_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(env, dotenv=False)
    assert variable in str(refused.value)
    assert "\n" not in str(refused.value)


async def test_an_invalid_market_file_stops_the_start_naming_the_variable(tmp_path: Path) -> None:
    market = tmp_path / "market.toml"
    market.write_text('[[listing]]\nid = "Bad Id"\n', encoding="utf-8")
    config = load_config({"TVM_DATABASE": str(tmp_path / "v.db"), "TVM_MARKET_FILE": str(market)}, dotenv=False)
    with pytest.raises(ConfigError, match="TVM_MARKET_FILE"):
        await open_runtime(config)


def test_connect_settings_default_as_the_spec_says() -> None:
    key = "A" * 43  # 32 bytes, URL-safe base64 without padding
    config = load_config({
        "AUTH0_DOMAIN": "t.example.com", "AUTH0_CLIENT_ID": "main", "AUTH0_AUDIENCE": "https://api",
        "TVM_RESOURCE_URL": "https://broker.example.com/mcp", "TVM_STATE_KEYS": f"{key}, {'B' * 44}",
    }, dotenv=False)
    assert config.connect_public_url == "https://broker.example.com"  # the origin of TVM_RESOURCE_URL
    assert config.connect_client_id == "main" and len(config.state_keys) == 2
    assert all(len(k) >= 32 for k in config.state_keys)
    login = load_config({"TVM_LOGIN_CLIENT_ID": "native", "TVM_PUBLIC_URL": "http://127.0.0.1:8765/"}, dotenv=False)
    assert login.connect_client_id == "native" and login.connect_public_url == "http://127.0.0.1:8765"
    own = load_config({"TVM_LOGIN_CLIENT_ID": "native", "TVM_CONNECT_CLIENT_ID": "web"}, dotenv=False)
    assert own.connect_client_id == "web" and own.connect_public_url is None  # None: the loopback address served
    assert "state_keys" not in repr(config) or key not in repr(config)
