"""`login` (device flow), the credentials file (0600, atomic), `login --status` and `logout`;
in process against the emulator, then end to end through the real commands."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from server.auth0.client import DEVICE_CODE_GRANT
from server.auth0.login import (
    LOGIN_SCOPES,
    LoginError,
    StoredLogin,
    device_login,
    login,
    logout,
    read_credentials,
    status,
    write_credentials,
)
from server.broker import Broker
from server.config import Config, load_config
from server.emulator import EmulatorState
from server.emulator.demo import DEMO_ACCOUNT, DEMO_LOGIN_CLIENT_ID
from server.errors import ConfigError
from server.store import Database
from tests.conftest import held, ok
from tests.server.emulator_process import clean_env, emulator_process
from tests.server.tenant import AUDIENCE, BROKER_ID, ISSUER, NATIVE_ID, USER, auth0_client, make_tenant, transport


class Clock:
    """A clock shared by the tenant and the poller; `sleep` moves it (by `step` of what was asked)."""

    def __init__(self, state: EmulatorState | None = None) -> None:
        self.now = time.time()  # the tokens it dates are verified against real time
        self.asked: list[float] = []
        self.scale: list[float] = []  # per sleep: the fraction of the asked time that passes (default 1)
        self.on_sleep: list[object] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.now += seconds * (self.scale.pop(0) if self.scale else 1.0)
        if self.on_sleep:
            action = self.on_sleep.pop(0)
            if callable(action):
                action()


def tenant(clock: Clock, interval: int = 5) -> EmulatorState:
    state = make_tenant(clock=clock)
    state.device_interval = interval
    return state


def config_for(tmp_path: Path, **extra: str) -> Config:
    env = {"AUTH0_DOMAIN": ISSUER, "AUTH0_CLIENT_ID": BROKER_ID, "AUTH0_AUDIENCE": AUDIENCE,
           "TVM_LOGIN_CLIENT_ID": NATIVE_ID, "TVM_CREDENTIALS_FILE": str(tmp_path / "cfg" / "tvm" / "credentials.json"),
           "TVM_DATABASE": str(tmp_path / "v.db"), **extra}
    return load_config(env, dotenv=False)


def approve(state: EmulatorState, sub: str = USER) -> None:
    [code] = state.pending_user_codes()
    state.approve_device(code, sub)


async def run_device_login(state: EmulatorState, clock: Clock, client_id: str = NATIVE_ID) -> tuple[object, str]:
    out = io.StringIO()
    auth0 = auth0_client(state, client_id=BROKER_ID)
    try:
        tokens = await device_login(auth0, client_id=client_id, audience=AUDIENCE, out=out, sleep=clock.sleep,
                                    clock=clock)
    finally:
        await auth0.aclose()
    return tokens, out.getvalue()


async def test_device_login_polls_at_the_interval_until_approved() -> None:
    clock = Clock()
    state = tenant(clock)
    clock.on_sleep = [None, None, lambda: approve(state)]
    tokens, shown = await run_device_login(state, clock)
    assert tokens.refresh_token  # type: ignore[attr-defined]
    assert clock.asked == [5, 5, 5]
    [started] = [r for r in state.requests if r.path == "/oauth/device/code"]
    assert started.fields["scope"].split() == list(LOGIN_SCOPES) and started.fields["audience"] == AUDIENCE
    polls = [r for r in state.requests if r.grant_type == DEVICE_CODE_GRANT]
    assert len(polls) == 3 and all(p.client_id == NATIVE_ID and "client_secret" not in p.fields for p in polls)
    code = state.devices[polls[0].fields["device_code"]].user_code
    assert f"{ISSUER}activate?user_code={code}" in shown and code in shown
    assert tokens.refresh_token not in shown  # type: ignore[attr-defined]


async def test_slow_down_adds_five_seconds_to_the_interval_for_good() -> None:
    clock = Clock()
    state = tenant(clock)
    clock.scale = [0.5]  # the first pause ends early (a suspended laptop, a skewed clock): too fast
    clock.on_sleep = [None, None, lambda: approve(state)]
    tokens, _ = await run_device_login(state, clock)
    assert tokens.refresh_token  # type: ignore[attr-defined]
    assert clock.asked == [5, 10, 10]


@pytest.mark.parametrize(
    ("user", "words"),
    [("deny", "declined"), ("nothing", "expired")],
)
async def test_a_declined_or_expired_login_stores_nothing(user: str, words: str, tmp_path: Path) -> None:
    clock = Clock()
    state = tenant(clock)
    state.device_expires_in = 12
    if user == "deny":
        clock.on_sleep = [lambda: state.deny_device(state.pending_user_codes()[0])]
    config = config_for(tmp_path)
    with pytest.raises(LoginError, match=words):
        await login(config, out=io.StringIO(), transport=transport(state), sleep=clock.sleep, clock=clock)
    assert not config.credentials_file.exists()


async def test_a_confidential_client_is_told_to_use_a_native_app(tmp_path: Path) -> None:
    clock = Clock()
    state = tenant(clock)
    with pytest.raises(LoginError, match="TVM_LOGIN_CLIENT_ID to a Native application"):
        await login(config_for(tmp_path, TVM_LOGIN_CLIENT_ID=BROKER_ID), out=io.StringIO(),
                    transport=transport(state), sleep=clock.sleep, clock=clock)


def test_login_needs_a_tenant(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AUTH0_DOMAIN"):
        asyncio.run(login(load_config({"TVM_DATABASE": str(tmp_path / "v.db")}, dotenv=False), out=io.StringIO()))


async def test_login_stores_a_verified_login_in_a_private_file(tmp_path: Path) -> None:
    clock = Clock()
    state = tenant(clock, interval=1)
    state.auto_approve_sub = USER
    config = config_for(tmp_path)
    out = io.StringIO()
    stored = await login(config, out=out, transport=transport(state), sleep=clock.sleep, clock=clock)
    path = config.credentials_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["credentials.json"]  # no temporary left behind
    data = json.loads(path.read_text())
    assert data["refresh_token"] in state.refresh_tokens
    assert state.refresh_tokens[data["refresh_token"]].client_id == NATIVE_ID
    assert (data["client_id"], data["account"], data["issuer"], data["audience"]) == (NATIVE_ID, USER, ISSUER, AUDIENCE)
    assert read_credentials(path) == stored
    assert data["refresh_token"] not in out.getvalue() and data["refresh_token"] not in repr(stored)


def test_credentials_are_written_0600_whatever_the_umask_and_replace_a_loose_file(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    path = tmp_path / "credentials.json"
    path.write_text("{}")
    path.chmod(0o644)
    old = os.umask(0)
    try:
        write_credentials(path, StoredLogin("rt-secret", client_id=NATIVE_ID))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755  # an existing directory is left alone
    assert read_credentials(path) == StoredLogin("rt-secret", client_id=NATIVE_ID)


def test_a_missing_or_broken_file_is_no_login(tmp_path: Path) -> None:
    assert read_credentials(tmp_path / "nope.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.json").write_text('{"refresh_token": ""}')
    assert read_credentials(tmp_path / "bad.json") is None and read_credentials(tmp_path / "empty.json") is None


async def test_status_says_who_without_the_token_and_logout_revokes_and_removes(tmp_path: Path) -> None:
    state = make_tenant()
    config = config_for(tmp_path)
    assert status(config) == (False, status(config)[1]) and "not logged in" in status(config)[1]
    refresh = state.issue_refresh_token(USER, NATIVE_ID, ["offline_access"], AUDIENCE)
    write_credentials(config.credentials_file, StoredLogin(refresh, client_id=NATIVE_ID, issuer=ISSUER, account=USER,
                                                           created_at="2026-11-28T12:00:00Z"))
    logged_in, text = status(config)
    assert logged_in and USER in text and ISSUER in text and NATIVE_ID in text and refresh not in text
    config.credentials_file.chmod(0o644)
    assert "chmod 600" in status(config)[1]
    assert "another tenant" in status(config_for(tmp_path, AUTH0_DOMAIN="other.example"))[1]

    said = await logout(config, transport=transport(state))
    assert "revoked" in said and "could not" not in said and refresh not in said
    assert refresh not in state.refresh_tokens and not config.credentials_file.exists()
    assert "not logged in" in await logout(config)


async def test_logout_removes_the_file_even_when_auth0_cannot_be_reached(tmp_path: Path) -> None:
    state = make_tenant()
    state.faults.fail_next(503, count=10)
    config = config_for(tmp_path, TVM_AUTH0_TIMEOUT="0.5")
    write_credentials(config.credentials_file, StoredLogin("rt", client_id=NATIVE_ID, issuer=ISSUER))
    said = await logout(config, transport=transport(state))
    assert "could not be revoked" in said and not config.credentials_file.exists()


async def run(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", *args, env=env, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_login_then_serve_then_logout_through_the_real_commands(tmp_path: Path) -> None:
    """The login's refresh token belongs to the Native app, so a successful request_token proves that
    serve exchanged the access token (the emulator refuses another client's refresh token as subject)."""
    credentials = tmp_path / "config" / "credentials.json"
    market = tmp_path / "market.toml"
    market.write_text(
        '[[listing]]\nid = "gh"\ntitle = "GitHub read"\nconnection = "github"\nscopes = ["repo:read"]\n'
        'supply = 10\nstart_price = 10\nfloor_price = 5\nopens_at = 2026-01-01T00:00:00Z\n'
        'closes_at = 2099-01-01T00:00:00Z\n'
    )
    async with emulator_process(tmp_path, "--auto-approve", "--device-interval", "0") as emulator:
        env = {**clean_env(), **emulator.env, "TVM_CREDENTIALS_FILE": str(credentials),
               "TVM_DATABASE": str(tmp_path / "vault.db"), "TVM_MARKET_FILE": str(market)}
        del env["TVM_REFRESH_TOKEN"]  # the stored login, not the emulator's demo token
        code, out, err = await run("login", env={**env, "TVM_LOGIN_CLIENT_ID": DEMO_LOGIN_CLIENT_ID}, cwd=tmp_path)
        assert code == 0, err
        assert "activate?user_code=" in err and f"logged in as {DEMO_ACCOUNT}" in err and out == ""
        assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
        assert stat.S_IMODE(credentials.parent.stat().st_mode) == 0o700
        refresh = json.loads(credentials.read_text())["refresh_token"]
        assert refresh not in err

        code, out, err = await run("login", "--status", env=env, cwd=tmp_path)
        assert code == 0 and f"logged in as {DEMO_ACCOUNT}" in out and refresh not in out + err
        db = await Database.open(tmp_path / "vault.db")
        try:
            await Broker(db).credit(DEMO_ACCOUNT, 100)
        finally:
            await db.close()

        params = StdioServerParameters(
            command=sys.executable, args=["-m", "server", "serve"], env=env, cwd=str(tmp_path)
        )
        async with held(Client(params)) as client:
            await ok(client, "buy_quota", {"listing_id": "gh", "units": 1, "max_unit_price": 10})
            token = await ok(client, "request_token", {"connection": "github", "scopes": ["repo:read"],
                                                       "purpose": "login e2e"})
        assert token["access_token"].startswith("gho_")

        code, out, err = await run("logout", env=env, cwd=tmp_path)
        assert code == 0 and "revoked at Auth0" in out and not credentials.exists()
