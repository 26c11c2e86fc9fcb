"""SIGKILL a loaded `serve` at random moments; after each restart the books balance and nothing is pending.

Fast by default (3 rounds); `TVM_SLOW=1` runs 10.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx

from tests.correctness.crash_harness import RawSession, Serve, Tenant, write_market

ROUNDS = 10 if os.environ.get("TVM_SLOW") == "1" else 3
WORKERS = 6


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args], env=env, capture_output=True, text=True,
                          timeout=60)


async def load(serve: Serve, bearers: list[str], stop: asyncio.Event, counts: dict[str, int]) -> None:
    async def worker(n: int) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            session = RawSession(http, serve.url, bearers[n])
            try:
                await session.start()
                while not stop.is_set():
                    if random.random() < 0.3:
                        await session.call("buy_quota", {"listing_id": "gh-read", "units": 2, "max_unit_price": 1})
                    else:
                        result = await session.call("request_token", {
                            "connection": "github", "scopes": ["repo:read"], "purpose": "crash test",
                            "login_hint": f"{n}-{random.random()}"})  # a fresh exchange: slow, in flight at the kill
                        counts["tokens" if not result.get("isError") else "refused"] += 1
            except (httpx.HTTPError, ValueError, KeyError):
                counts["cut"] += 1

    await asyncio.gather(*(worker(n) for n in range(WORKERS)))


def pending(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return int(db.execute("SELECT count(*) FROM reservations WHERE status = 'pending'").fetchone()[0])


def recovered_events(database: Path) -> int:
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT args FROM audit_events WHERE tool = 'request_token' AND outcome = 'error'").fetchall()
    return sum(1 for (args,) in rows if json.loads(args).get("reason") == "owner process died")


async def test_sigkill_under_load_loses_nothing(tmp_path: Path) -> None:
    tenant = Tenant(latency=0.15)
    database = tmp_path / "crash.db"
    env = tenant.env(database, write_market(tmp_path / "market.toml"))
    try:
        assert cli(env, "market", "load", str(tmp_path / "market.toml")).returncode == 0
        assert cli(env, "wallet", "credit", tenant.info["account"], "100000").returncode == 0
        counts = {"tokens": 0, "refused": 0, "cut": 0}
        bearers = [tenant.bearer(f"agent-{n}") for n in range(WORKERS)]
        killed_pending = 0
        for _ in range(ROUNDS):
            serve = Serve(env, tmp_path)
            stop = asyncio.Event()
            issued = counts["tokens"]
            loader = asyncio.create_task(load(serve, bearers, stop, counts))
            for _ in range(200):  # under load, wait until tokens flow (at most 10 s), then kill at random
                if counts["tokens"] > issued:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(random.uniform(0.0, 0.6))
            serve.kill()
            stop.set()
            await loader
            killed_pending += pending(database)
            restarted = Serve(env, tmp_path)  # start-up refunds what the dead process had reserved
            assert pending(database) == 0
            restarted.kill()
            verify = cli(env, "audit", "verify", "--ledger")
            assert verify.returncode == 0, verify.stdout + verify.stderr
        assert counts["tokens"] > 0, counts
        assert killed_pending > 0, "no reservation was in flight at any kill; the test proved nothing"
        assert recovered_events(database) == killed_pending
    finally:
        tenant.stop()
    print(f"crash test: {ROUNDS} kills, {counts}, {killed_pending} in-flight reservations refunded")


GATED = """
[[listing]]
id = "gh-gated"
title = "GitHub read, approved by the owner"
connection = "github"
scopes = ["repo:read", "read:user"]
supply = 10
start_price = 1
floor_price = 1
opens_at = 2026-01-01T00:00:00Z
closes_at = 2030-01-01T00:00:00Z
approval = "grant"
"""


def units_held(database: Path, listing: str) -> int:
    with sqlite3.connect(database) as db:
        return int(db.execute("SELECT units_held FROM holdings WHERE listing_id = ?", (listing,)).fetchone()[0])


async def test_a_sigkill_while_an_approval_is_pending_leaves_a_refund_at_restart(tmp_path: Path) -> None:
    tenant = Tenant(latency=0, ciba="manual")  # the owner never answers: the call waits
    database = tmp_path / "approval.db"
    env = tenant.env(database, write_market(tmp_path / "market.toml", GATED))
    serve = None
    try:
        assert cli(env, "wallet", "credit", tenant.info["account"], "100").returncode == 0
        serve = Serve(env, tmp_path)
        async with httpx.AsyncClient(timeout=30) as http:
            session = RawSession(http, serve.url, tenant.bearer("agent-0"))
            await session.start()
            bought = await session.call("buy_quota", {"listing_id": "gh-gated", "units": 2, "max_unit_price": 1})
            assert not bought.get("isError"), bought
            waiting = asyncio.create_task(session.call("request_token", {
                "connection": "github", "scopes": ["repo:read", "read:user"], "purpose": "crash while approving"}))
            for _ in range(200):
                asked = (await http.get(tenant.url + "/emulator/approvals")).json()["approvals"]
                if asked:
                    break
                await asyncio.sleep(0.05)
            assert len(asked) == 1 and pending(database) == 1 and units_held(database, "gh-gated") == 1
            serve.kill()
            serve = None
            try:
                await waiting
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # the server died mid-call: the client's answer is lost, the unit must not be
        restarted = Serve(env, tmp_path)
        restarted.kill()
        assert pending(database) == 0 and units_held(database, "gh-gated") == 2
        assert recovered_events(database) == 1
        verify = cli(env, "audit", "verify", "--ledger")
        assert verify.returncode == 0, verify.stdout + verify.stderr
    finally:
        if serve is not None:
            serve.kill()
        tenant.stop()
