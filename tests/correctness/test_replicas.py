"""Replicas on one PostgreSQL database (SPEC §12, issue 14), as real processes.

Several `serve --transport http` processes share one database and one emulated tenant; clients talk
Streamable HTTP to them. Each test has its own database (tests.conftest.pg_database); the restart
test runs a private PostgreSQL instance of its own (never the machine's shared one).

Replicas run each in a UTS namespace of its own (`unshare --uts`, when allowed) under a hostname of
its own, so they look like processes on different machines: only the lease can refund a dead
replica's reservations, never the same-host "owner process died" check.

Fast by default; `TVM_SLOW=1` runs more kill and restart rounds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from server.broker import Broker
from server.invariants import check_invariants
from server.store import AuditFilter, Database, open_database
from server.store.postgres import CONNECT_TIMEOUT
from tests.conftest import pg_database
from tests.correctness.crash_harness import RawSession, Tenant, free_port, write_market

SLOW = os.environ.get("TVM_SLOW") == "1"
KILL_ROUNDS = 6 if SLOW else 2
RESTART_ROUNDS = 4 if SLOW else 2
LEASE = 2  # TVM_RESERVATION_LEASE for the kill test, seconds
ROOT = Path(__file__).resolve().parents[2]
SCOPES = ["read:market", "read:balance", "buy:quota", "request:token"]

SCARCE = """
[[listing]]
id = "last-units"
title = "scarce"
connection = "github"
scopes = ["repo:read"]
supply = 10
start_price = 1
floor_price = 1
opens_at = 2026-01-01T00:00:00Z
closes_at = 2030-01-01T00:00:00Z

[[listing]]
id = "flat-ten"
title = "flat"
connection = "stripe"
scopes = ["read_only"]
supply = 100000
start_price = 10
floor_price = 10
opens_at = 2026-01-01T00:00:00Z
closes_at = 2030-01-01T00:00:00Z
"""


# ---- processes ------------------------------------------------------------------------------------
def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--uts", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


OWN_HOSTS = _can_unshare()


class Replica:
    """`token-vault-mcp serve --transport http` as a process, as if on a machine called `hostname`."""

    def __init__(self, env: dict[str, str], log: Path, hostname: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hostname = hostname if OWN_HOSTS else socket.gethostname()
        self.log = log
        command = [sys.executable, "-m", "server", "serve", "--transport", "http", "--port", str(self.port)]
        if OWN_HOSTS:  # unshare and sh exec in place: the pid is the server's own
            command = ["unshare", "--uts", "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", hostname,
                       *command]
        self._stderr = open(log, "ab")  # closed in kill(); a pipe nobody reads would fill up
        self.proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._stderr)

    @property
    def owner_prefix(self) -> str:
        """The start of the reservation owner this process writes (server.owners.process_owner)."""
        return f"{self.hostname}:{self.proc.pid}:"

    def ready(self, timeout: float = 30) -> Replica:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve did not start: " + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no cleanup of any kind
        self.proc.wait()
        self._stderr.close()


def start_replicas(env: dict[str, str], tmp: Path, names: list[str]) -> list[Replica]:
    """Start them all at once (schema and market loaded by whichever comes first), then wait for each."""
    replicas = [Replica(env, tmp / f"{name}.log", name) for name in names]
    try:
        return [r.ready() for r in replicas]
    except BaseException:
        for r in replicas:
            r.kill()
        raise


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def verify_ledger(env: dict[str, str]) -> None:
    verify = cli(env, "audit", "verify", "--ledger")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def mint(tenant: Tenant, account: str, agent: str) -> str:
    answer = httpx.post(tenant.url + "/emulator/tokens", json={"sub": account, "azp": agent, "scopes": SCOPES},
                        timeout=10)
    answer.raise_for_status()
    return str(answer.json()["access_token"])


def code_of(result: dict[str, Any]) -> str:
    """`ok`, or the error's code from its `[code] message` text."""
    if not result.get("isError"):
        return "ok"
    return str(result["content"][0]["text"]).split("]", 1)[0].lstrip("[")


async def sessions(http: httpx.AsyncClient, targets: list[tuple[Replica, str]]) -> list[RawSession]:
    """One started session per (replica, bearer)."""
    opened = [RawSession(http, replica.url, bearer) for replica, bearer in targets]
    await asyncio.gather(*(s.start() for s in opened))
    return opened


@asynccontextmanager
async def store(url: str) -> AsyncIterator[Database]:
    db = await open_database(url)
    try:
        yield db
    finally:
        await db.close()


async def credit(url: str, amounts: dict[str, int]) -> None:
    async with store(url) as db:
        broker = Broker(db)
        for account, amount in amounts.items():
            await broker.credit(account, amount)


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)  # type: ignore[arg-type]
        return list(cur.fetchall()) if cur.description else []


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200, max_keepalive_connections=200))


# ---- 1. three replicas, 24 clients ------------------------------------------------------------------
async def test_three_replicas_sell_the_last_units_once_spend_a_wallet_to_zero_and_charge_a_key_once(
    tmp_path: Path,
) -> None:
    tenant = Tenant(latency=0)
    replicas: list[Replica] = []
    started = time.monotonic()
    try:
        with pg_database() as url:
            env = tenant.env(url, write_market(tmp_path / "market.toml", SCARCE))  # type: ignore[arg-type]
            await credit(url, {"auth0|alice": 1000, "auth0|bob": 1000, "auth0|carol": 100, "auth0|dave": 100})
            replicas = start_replicas(env, tmp_path, ["replica-a", "replica-b", "replica-c"])
            clients = 24
            async with http_client() as http:
                # 1. the last 10 units: 24 clients (alice and bob) on 3 replicas, 3 tries each
                racers = await sessions(http, [
                    (replicas[n % 3], mint(tenant, ("auth0|alice", "auth0|bob")[n % 2], f"agent-{n}"))
                    for n in range(clients)])

                async def buy_last(s: RawSession) -> list[str]:
                    return [code_of(await s.call("buy_quota", {"listing_id": "last-units", "units": 1,
                                                               "max_unit_price": 5})) for _ in range(3)]

                codes = Counter(c for cs in await asyncio.gather(*(buy_last(s) for s in racers)) for c in cs)
                assert codes == {"ok": 10, "sold_out": 3 * clients - 10}, codes

                # 2. carol's 100 credits on 10-credit units: 24 clients, 2 tries each
                spenders = await sessions(http, [(replicas[n % 3], mint(tenant, "auth0|carol", f"agent-{n}"))
                                                 for n in range(clients)])

                async def spend(s: RawSession) -> list[dict[str, Any]]:
                    return [await s.call("buy_quota", {"listing_id": "flat-ten", "units": 1, "max_unit_price": 10})
                            for _ in range(2)]

                spent = [r for rs in await asyncio.gather(*(spend(s) for s in spenders)) for r in rs]
                codes = Counter(code_of(r) for r in spent)
                assert codes == {"ok": 10, "insufficient_funds": 2 * clients - 10}, codes
                # each success saw its own balance on the way down: the spends were one after another
                after = sorted(r["structuredContent"]["balance_after"] for r in spent if code_of(r) == "ok")
                assert after == list(range(0, 100, 10)), after

                # 3. one idempotency key, 24 clients on 3 replicas, all at the same instant
                retries = await sessions(http, [(replicas[n % 3], mint(tenant, "auth0|dave", f"agent-{n}"))
                                                for n in range(clients)])
                gate = asyncio.Event()

                async def retry(s: RawSession) -> dict[str, Any]:
                    await gate.wait()
                    return await s.call("buy_quota", {"listing_id": "flat-ten", "units": 2, "max_unit_price": 10,
                                                      "idempotency_key": "one-order"})

                racing = [asyncio.create_task(retry(s)) for s in retries]
                await asyncio.sleep(0.05)
                gate.set()
                receipts = await asyncio.gather(*racing)
                assert all(code_of(r) == "ok" for r in receipts), Counter(code_of(r) for r in receipts)
                assert len({json.dumps(r["structuredContent"], sort_keys=True) for r in receipts}) == 1, receipts

            # the books, in the database
            assert sql(url, "SELECT supply, sold FROM listings WHERE id = 'last-units'") == [(10, 10)]
            assert sql(url, "SELECT sum(units), count(*) FROM purchases WHERE listing_id = 'last-units'") == [(10, 10)]
            assert sql(url, "SELECT sum(units_bought) FROM holdings h JOIN listings l ON l.id = h.listing_id "
                            "WHERE l.id = 'last-units'") == [(10,)]
            assert sql(url, "SELECT balance FROM accounts WHERE name = 'auth0|carol'") == [(0,)]
            assert sql(url, "SELECT min(balance_after) FROM purchases WHERE account = 'auth0|carol'") == [(0,)]
            assert sql(url, "SELECT balance FROM accounts WHERE name = 'auth0|dave'") == [(80,)]
            assert sql(url, "SELECT count(*), min(id) FROM purchases WHERE account = 'auth0|dave'") == [
                (1, receipts[0]["structuredContent"]["purchase_id"])]
            async with store(url) as db:
                assert await db.read(check_invariants) == []
                events = await db.read(lambda tx: tx.find_audit(AuditFilter(tool="buy_quota")))
            assert len(events) == 3 * clients + 2 * clients + clients  # every call, on whichever replica, once
            verify_ledger(env)
    finally:
        for r in replicas:
            r.kill()
        tenant.stop()
    print(f"3 replicas, 24 clients: {time.monotonic() - started:.1f} s")


# ---- 2. SIGKILL of a replica under load ----------------------------------------------------------
async def load(replicas: list[Replica], bearers: list[str], stop: asyncio.Event, counts: Counter[str]) -> None:
    """Workers spread over the replicas: mostly fresh token exchanges (slow: in flight at a kill), some buys."""

    async def worker(n: int) -> None:
        async with http_client() as http:
            session = RawSession(http, replicas[n % len(replicas)].url, bearers[n])
            try:
                await session.start()
                while not stop.is_set():
                    if random.random() < 0.3:
                        await session.call("buy_quota", {"listing_id": "gh-read", "units": 3, "max_unit_price": 1})
                        continue
                    result = await session.call("request_token", {
                        "connection": "github", "scopes": ["repo:read"], "purpose": "replica kill test",
                        "login_hint": f"{n}-{random.random()}"})  # a fresh exchange each time
                    counts[code_of(result)] += 1
            except (httpx.HTTPError, ValueError, KeyError):
                counts["cut"] += 1

    await asyncio.gather(*(worker(n) for n in range(len(bearers))))


def micros(rfc3339: str) -> int:
    moment = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return int(moment.timestamp() * 1_000_000)


async def test_a_killed_replicas_reservations_are_refunded_by_the_others_after_the_lease(tmp_path: Path) -> None:
    tenant = Tenant(latency=0.8)  # a slow Token Vault: reservations wait, and are in flight at the kill
    replicas: list[Replica] = []
    started = time.monotonic()
    orphans_total = 0
    waits: list[float] = []
    counts: Counter[str] = Counter()
    try:
        with pg_database() as url:
            env = tenant.env(url, write_market(tmp_path / "market.toml")) | {  # type: ignore[arg-type]
                "TVM_RESERVATION_LEASE": str(LEASE)}
            await credit(url, {tenant.info["account"]: 1_000_000})
            replicas = start_replicas(env, tmp_path, ["host-0", "host-1", "host-2"])
            bearers = [tenant.bearer(f"agent-{n}") for n in range(9)]
            next_host = 3
            for round_ in range(KILL_ROUNDS):
                victim = replicas[round_ % 3]
                stop = asyncio.Event()
                loader = asyncio.create_task(load(replicas, bearers, stop, counts))
                deadline = time.monotonic() + 15
                while not sql(url, "SELECT id FROM reservations WHERE status = 'pending' AND owner LIKE %s",
                              (victim.owner_prefix + "%",)):
                    assert time.monotonic() < deadline, "the victim never held a reservation"
                    await asyncio.sleep(0.02)
                await asyncio.sleep(random.uniform(0.0, 0.3))
                victim.kill()
                killed, killed_wall = time.monotonic(), time.time()
                orphans = sql(url, "SELECT id, created_at, lease_until FROM reservations "
                                   "WHERE status = 'pending' AND owner LIKE %s", (victim.owner_prefix + "%",))
                stop.set()
                await loader
                for _, created, lease_until in orphans:  # a lease is TVM_RESERVATION_LEASE from its last renewal
                    assert lease_until <= (killed_wall + LEASE + 0.5) * 1_000_000, (
                        f"a reservation made at {created} holds a lease of "
                        f"{(lease_until - micros(created)) / 1e6:.0f} s, not TVM_RESERVATION_LEASE={LEASE}")
                # the dead replica is not restarted: only the survivors' housekeeping can refund
                ids = [row[0] for row in orphans]
                while sql(url, "SELECT count(*) FROM reservations WHERE status = 'pending' AND id = ANY(%s)",
                          (ids,)) != [(0,)]:
                    assert time.monotonic() < killed + LEASE + 6, "the dead replica's reservations were not refunded"
                    await asyncio.sleep(0.05)
                waits.append(time.monotonic() - killed)
                assert sql(url, "SELECT count(*) FROM reservations WHERE id = ANY(%s) AND status = 'refunded'",
                           (ids,)) == [(len(ids),)]
                async with store(url) as db:
                    events = await db.read(lambda tx: tx.find_audit(AuditFilter(tool="request_token")))
                refunds: dict[str, list[dict[str, Any]]] = {}
                for event in events:
                    args = json.loads(event.args)
                    if args.get("reservation_id") in ids and args.get("reason"):
                        refunds.setdefault(args["reservation_id"], []).append(
                            {"ts": event.ts, "code": event.code, "reason": args["reason"]})
                for rid, _, lease_until in orphans:
                    assert len(refunds.get(rid, [])) == 1, (rid, refunds.get(rid))  # its own event, once
                    (refund,) = refunds[rid]
                    assert refund["code"] == "vault_unavailable"
                    if OWN_HOSTS:  # another machine's process: only its lease can have lapsed
                        assert refund["reason"] == "lease lapsed", refund
                        assert micros(refund["ts"]) >= lease_until - 1000, "refunded before its lease lapsed"
                    else:
                        assert refund["reason"] in ("lease lapsed", "owner process died"), refund
                orphans_total += len(ids)
                verify_ledger(env)
                replicas[round_ % 3] = Replica(env, tmp_path / f"host-{next_host}.log", f"host-{next_host}").ready()
                next_host += 1
            async with store(url) as db:
                assert await db.read(check_invariants) == []
            assert sql(url, "SELECT count(*) FROM reservations WHERE status = 'pending' AND owner NOT LIKE ALL(%s)",
                       ([r.owner_prefix + "%" for r in replicas],)) == [(0,)]
    finally:
        for r in replicas:
            r.kill()
        tenant.stop()
    assert counts["ok"] > 0, counts
    print(f"{KILL_ROUNDS} kills ({'own hostnames' if OWN_HOSTS else 'one host'}): {orphans_total} reservations "
          f"refunded after {', '.join(f'{w:.1f}' for w in waits)} s; calls {dict(counts)}; "
          f"{time.monotonic() - started:.1f} s")


# ---- 3. PostgreSQL restarted under load ---------------------------------------------------------------
class PrivatePostgres:
    """A PostgreSQL instance of this test's own (initdb in a temporary directory), on a free port."""

    def __init__(self) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        assert versions, "no PostgreSQL server binaries under /usr/lib/postgresql"
        self.bin = versions[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="tvm-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0  # initdb refuses root: run the server as the postgres user
        if self.as_root:
            shutil.chown(self.dir, "postgres")
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.pg_ctl("start")

    def run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{tool} {args}: {done.stdout}{done.stderr}"

    def pg_ctl(self, action: str, *args: str) -> None:
        extra = ["-o", self.options, "-l", str(self.dir / "log")] if action in ("start", "restart") else []
        self.run("pg_ctl", "-D", str(self.data), "-w", *extra, *args, action)

    def database(self, name: str) -> str:
        sql(self.url, f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        try:
            self.pg_ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    instance = PrivatePostgres()
    try:
        yield instance
    finally:
        instance.close()


async def test_postgresql_restarted_under_load_fails_closed_and_service_resumes(tmp_path: Path) -> None:
    tenant = Tenant(latency=0)
    replicas: list[Replica] = []
    started = time.monotonic()
    seen: list[tuple[int, float, str, str | None]] = []  # (worker, time answered, outcome, idempotency key)
    unknown: set[str | None] = set()  # keys answered "may or may not have taken effect"
    slowest = 0.0
    account = tenant.info["account"]
    try:
        with private_postgres() as pg:
            url = pg.database("tvm")
            env = tenant.env(url, write_market(tmp_path / "market.toml"))  # type: ignore[arg-type]
            await credit(url, {account: 1_000_000})
            replicas = start_replicas(env, tmp_path, ["pg-host-0", "pg-host-1"])
            bearers = [tenant.bearer(f"agent-{n}") for n in range(8)]
            stop = asyncio.Event()

            async def worker(n: int) -> None:
                async with http_client() as http:
                    session = RawSession(http, replicas[n % 2].url, bearers[n])
                    await session.start()
                    i = 0
                    nonlocal slowest
                    while not stop.is_set():
                        i += 1
                        key = f"w{n}-{i}" if i % 2 else None
                        asked = time.monotonic()
                        try:
                            if key:
                                result = await session.call("buy_quota", {
                                    "listing_id": "gh-read", "units": 1, "max_unit_price": 1,
                                    "idempotency_key": key})
                            else:
                                result = await session.call("check_balance", {})
                            outcome = code_of(result)
                            if outcome == "audit_unavailable" and "may or may not" in result["content"][0]["text"]:
                                unknown.add(key)  # lost while committing and still away: it may be kept
                        except httpx.HTTPStatusError as exc:
                            outcome = f"http {exc.response.status_code}"
                        except (httpx.HTTPError, ValueError, KeyError) as exc:
                            outcome = f"transport {type(exc).__name__}"
                        seen.append((n, time.monotonic(), outcome, key))
                        slowest = max(slowest, time.monotonic() - asked)
                        if outcome != "ok":
                            await asyncio.sleep(0.02)

            workers = asyncio.gather(*(worker(n) for n in range(len(bearers))))
            resumed: list[float] = []
            try:
                for round_ in range(RESTART_ROUNDS):
                    await asyncio.sleep(1.0)  # under load
                    if round_ % 2 == 0:  # a quick restart: calls wait for a connection (CONNECT_TIMEOUT) and go on
                        await asyncio.to_thread(pg.pg_ctl, "restart", "-m", "fast")
                    else:  # a crash (no shutdown checkpoint, sessions cut), down longer than CONNECT_TIMEOUT
                        await asyncio.to_thread(pg.pg_ctl, "stop", "-m", "immediate")
                        await asyncio.sleep(CONNECT_TIMEOUT + 1.5)
                        await asyncio.to_thread(pg.pg_ctl, "start")
                    back = time.monotonic()
                    while not all(any(w % 2 == r and t > back and o == "ok" for w, t, o, _ in seen) for r in (0, 1)):
                        assert time.monotonic() < back + 20, "service did not resume on every replica"
                        await asyncio.sleep(0.05)
                    resumed.append(time.monotonic() - back)
                await asyncio.sleep(0.5)
            finally:
                stop.set()
                await workers
            assert all(r.proc.poll() is None for r in replicas), "a replica died"
            outcomes = Counter(o for _, _, o, _ in seen)
            assert set(outcomes) <= {"ok", "audit_unavailable"}, outcomes
            assert outcomes["audit_unavailable"] > 0, f"no call met the outage; the test proved nothing: {outcomes}"

            bought = {key for _, _, o, key in seen if key and o == "ok"}
            refused = {key for _, _, o, key in seen if key and o != "ok"}
            rows = sql(url, "SELECT idempotency_key, count(*), sum(total) FROM purchases GROUP BY idempotency_key")
            in_db = {key: count for key, count, _ in rows}
            assert all(count == 1 for count in in_db.values()), "a purchase was doubled"
            assert bought <= set(in_db), "a purchase answered ok was lost"
            assert set(in_db) <= bought | refused
            # answered audit_unavailable "nothing was done", yet committed (an answer that said the call may or
            # may not have taken effect — the database still away after a commit was cut — is honest either way)
            kept_anyway = (refused - unknown) & set(in_db)
            spent = sum(total for _, _, total in rows)
            assert sql(url, "SELECT balance FROM accounts WHERE name = %s", (account,)) == [(1_000_000 - spent,)]
            async with store(url) as db:
                assert await db.read(check_invariants) == []
                events = await db.read(lambda tx: tx.find_audit(AuditFilter(tool="buy_quota", outcome="ok")))
            per_key = Counter(json.loads(e.args).get("idempotency_key") for e in events)
            # every purchase kept has exactly one event (nothing half-done), and no other event claims one
            assert per_key == Counter(set(in_db)), "a purchase without its event, or an event without its purchase"
            verify_ledger(env)
            assert not kept_anyway, (
                f"answered audit_unavailable ('nothing was done'), yet committed with its event: {sorted(kept_anyway)}"
                f" (calls {dict(Counter(o for _, _, o, _ in seen))}; service back after {resumed} s)")
            for r in replicas:
                r.kill()
            replicas = []
    finally:
        for r in replicas:
            r.kill()
        tenant.stop()
    print(f"{RESTART_ROUNDS} PostgreSQL restarts: calls {dict(outcomes)}; service back after "
          f"{', '.join(f'{t:.1f}' for t in resumed)} s; slowest call {slowest:.1f} s; "
          f"{time.monotonic() - started:.1f} s")


# ---- 4. the kill switch across replicas ----------------------------------------------------------------
async def test_a_block_refuses_the_agent_on_replica_b_within_a_second_while_it_is_calling(
    tmp_path: Path,
) -> None:
    tenant = Tenant(latency=0)
    replicas: list[Replica] = []
    try:
        with pg_database() as url:
            env = tenant.env(url, write_market(tmp_path / "market.toml"))  # type: ignore[arg-type]
            a, b = replicas = start_replicas(env, tmp_path, ["block-a", "block-b"])
            async with http_client() as http:
                rogue_a, rogue_b, other_b = await sessions(http, [
                    (a, tenant.bearer("rogue")), (b, tenant.bearer("rogue")), (b, tenant.bearer("honest"))])
                assert code_of(await rogue_b.call("check_balance", {})) == "ok"
                stop = asyncio.Event()
                answers: list[tuple[float, str, str]] = []

                async def poll() -> None:
                    while not stop.is_set():
                        result = await rogue_b.call("check_balance", {})
                        answers.append((time.time(), code_of(result), str(result["content"][0]["text"])))
                        await asyncio.sleep(0.01)

                poller = asyncio.create_task(poll())
                blocked = await asyncio.to_thread(cli, env, "agent", "block", "rogue", "--reason", "replica test")
                assert blocked.returncode == 0, blocked.stdout + blocked.stderr
                ((blocked_at,),) = sql(url, "SELECT blocked_at FROM agent_blocks WHERE agent = 'rogue'")
                deadline = time.monotonic() + 3
                while not any(code == "agent_blocked" for _, code, _ in answers) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                stop.set()
                await poller
                first = next((t for t, code, _ in answers if code == "agent_blocked"), None)
                assert first is not None, "replica B never refused the blocked agent"
                lag = first - micros(blocked_at) / 1e6
                assert lag <= 1.0, f"replica B refused the agent {lag:.2f} s after the block"
                later = [(code, text) for t, code, text in answers if t >= first]
                assert all(code == "agent_blocked" and "replica test" in text for code, text in later), later
                assert code_of(await rogue_a.call("check_balance", {})) == "agent_blocked"
                assert code_of(await other_b.call("check_balance", {})) == "ok"
    finally:
        for r in replicas:
            r.kill()
        tenant.stop()
    print(f"block on A refused on B {lag * 1000:.0f} ms after it was written (blocked_at)")
