"""PostgreSQL against SQLite (SPEC §12): per-call latency, replicas' throughput, `audit verify` speed.

- Latency: the same product (`serve --transport http`, demo mode) on a fresh PostgreSQL database and on
  a SQLite file, one client, one call at a time, the two sides in alternating batches.
- Throughput: 32 clients spread over 1, 2 and 3 replicas on one PostgreSQL database, against one
  SQLite process, in alternating rounds; with the CPU seconds per call of every process involved (the
  servers and PostgreSQL's backends, from /proc), PostgreSQL transactions per call (pg_stat_database)
  and round trips per call (each replica's `tvm_db_round_trips_total` on /metrics), the figures that
  say how it scales on a machine with more cores.
- `audit verify` events per second over the same log on both backends.

The database server is the machine's PostgreSQL (`TVM_BENCH_PG`, default
postgresql://postgres@127.0.0.1:5432/postgres as the maintenance database); each run makes its own
databases and drops them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import workload
from bench.procs import (
    DEMO_ACCOUNT,
    Server,
    demo_bearer_token,
    free_port,
    product_cmd,
    product_env,
    run_cli,
    start,
)
from bench.stats import median
from bench.workload import CASES

MAINTENANCE = os.environ.get("TVM_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
LATENCY_CASES = ("check_balance", "buy_quota", "request_token", "call_api")
THROUGHPUT_CASE = "check_balance"
CLIENTS = 32
VERIFY_CHUNK = 5000  # audit events written per transaction when building the log to verify


@dataclass(frozen=True)
class PgLatency:
    case: str
    label: str
    postgres: list[float]
    sqlite: list[float]
    round_trips: float  # PostgreSQL round trips per timed call (what the replica's housekeeping made included)

    @property
    def ratio(self) -> float:
        return median(self.postgres) / median(self.sqlite)


@dataclass(frozen=True)
class PgThroughput:
    label: str  # "SQLite, 1 process" / "PostgreSQL, N replicas"
    calls: int
    seconds: float
    cpu_seconds: float
    transactions: int | None  # PostgreSQL commits during the rounds (None for SQLite)
    round_trips: float | None = None  # the replicas' round trips to PostgreSQL during the rounds (None for SQLite)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


@dataclass
class PgResults:
    latency: list[PgLatency]
    throughput: list[PgThroughput]
    verify: dict[str, float]  # backend → events per second
    clients: int = CLIENTS  # of the throughput rounds


def _admin() -> object:
    import psycopg

    return psycopg.connect(MAINTENANCE, autocommit=True)


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new empty PostgreSQL database for this run; dropped afterwards."""
    name = f"tvm_bench_{secrets.token_hex(4)}"
    with _admin() as admin:  # type: ignore[attr-defined]
        admin.execute(f'CREATE DATABASE "{name}"')
    base = MAINTENANCE.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with _admin() as admin:  # type: ignore[attr-defined]
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _commits(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()
        return int(row[0]) if row else 0


def _cpu(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) each of these processes has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            used[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return used


def _cpu_since(before: dict[int, float], pids: list[int]) -> float:
    """CPU seconds used since `before` by these processes (new ones counted whole; exited ones are lost)."""
    return sum(now - before.get(pid, 0.0) for pid, now in _cpu(pids).items())


def _postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("postgres", "postgresql"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def round_trips(servers: list[Server]) -> float:
    """The round trips to the database the servers' stores have made so far (their /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for server in servers:
        text = httpx.get(f"http://127.0.0.1:{server.env['TVM_METRICS_PORT']}/metrics", timeout=10).text
        total += sum(
            sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "tvm_db_round_trips_total"
        )
    return total


async def _timed(server_client: object, key: str, count: int, start_at: int, out: list[float]) -> None:
    case = CASES[key]
    for i in range(start_at, start_at + count):
        began = time.perf_counter()
        result = await server_client.call_tool(case.tool, case.args(i))  # type: ignore[attr-defined]
        out.append(time.perf_counter() - began)
        case.answer(result)


async def latency(pg: Server, lite: Server, calls: int, batch: int, warmup: int) -> list[PgLatency]:
    rows = []
    async with pg.client() as a, lite.client() as b:
        for key in LATENCY_CASES:
            scratch: list[float] = []
            await _timed(a, key, warmup, 0, scratch)
            await _timed(b, key, warmup, 0, scratch)
            samples: dict[str, list[float]] = {"pg": [], "lite": []}
            done = turn = 0
            trips = 0.0
            while done < calls:
                n = min(batch, calls - done)
                for side in (("pg", "lite") if turn % 2 == 0 else ("lite", "pg")):
                    before = round_trips([pg]) if side == "pg" else 0.0
                    await _timed(a if side == "pg" else b, key, n, warmup + done, samples[side])
                    trips += round_trips([pg]) - before if side == "pg" else 0.0
                done += n
                turn += 1
            rows.append(PgLatency(key, CASES[key].label, samples["pg"], samples["lite"], trips / calls))
    return rows


async def _load(clients: list[object], seconds: float) -> tuple[int, float]:
    """The clients call check_balance in a loop for `seconds`: (calls made, seconds taken)."""
    case = CASES[THROUGHPUT_CASE]
    calls = 0
    began = time.perf_counter()
    stop = began + seconds

    async def worker(client: object) -> None:
        nonlocal calls
        while time.perf_counter() < stop:
            result = await client.call_tool(case.tool, case.args(0))  # type: ignore[attr-defined]
            case.answer(result)
            calls += 1

    await asyncio.gather(*(worker(c) for c in clients))
    return calls, time.perf_counter() - began


class ExitStackAsync:
    """An AsyncExitStack whose `enter` reads shorter."""

    def __init__(self) -> None:
        from contextlib import AsyncExitStack

        self._stack = AsyncExitStack()

    async def __aenter__(self) -> ExitStackAsync:
        await self._stack.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.__aexit__(*exc)  # type: ignore[arg-type]

    async def enter(self, context: object) -> object:
        return await self._stack.enter_async_context(context)  # type: ignore[arg-type]


async def throughput(groups: dict[str, tuple[list[Server], str | None]], seconds: float, rounds: int,
                     clients: int = CLIENTS) -> list[PgThroughput]:
    totals = {label: [0, 0.0, 0.0, 0, 0.0] for label in groups}
    order = list(groups)
    async with ExitStackAsync() as stack:
        sessions = {
            label: [await stack.enter(servers[n % len(servers)].client()) for n in range(clients)]
            for label, (servers, _) in groups.items()
        }
        for label in order:  # warm every session once
            await _load(sessions[label], 0.2)
        for turn in range(rounds):
            for label in order if turn % 2 == 0 else list(reversed(order)):
                servers, url = groups[label]
                servers_pids = [s.process.pid for s in servers if s.process is not None]
                pids = servers_pids + (_postgres_pids() if url else [])
                before_cpu, before_tx = _cpu(pids), _commits(url) if url else 0
                before_trips = round_trips(servers) if url else 0.0
                calls, elapsed = await _load(sessions[label], seconds)
                totals[label][0] += calls
                totals[label][1] += elapsed
                totals[label][2] += _cpu_since(before_cpu, servers_pids + (_postgres_pids() if url else []))
                totals[label][3] += (_commits(url) - before_tx) if url else 0
                totals[label][4] += (round_trips(servers) - before_trips) if url else 0.0
    return [
        PgThroughput(
            label, int(t[0]), float(t[1]), float(t[2]), int(t[3]) if groups[label][1] else None,
            float(t[4]) if groups[label][1] else None,
        )
        for label, t in totals.items()
    ]


async def verify_speed(events: int, url: str, sqlite_path: Path) -> dict[str, float]:
    from server import audit
    from server.audit import Event
    from server.store import open_database

    speeds = {}
    for label, where in (("PostgreSQL", url), ("SQLite", str(sqlite_path))):
        db = await open_database(where, create=True)
        try:
            for start_at in range(0, events, VERIFY_CHUNK):
                def job(tx: object, start_at: int = start_at) -> None:
                    for n in range(start_at, min(events, start_at + VERIFY_CHUNK)):
                        audit.append(tx, Event(  # type: ignore[arg-type]
                            ts="2026-11-01T00:00:00.000000Z", transport="stdio", outcome="ok",
                            account=f"auth0|user-{n % 50}", agent="bench", tool="check_balance",
                            scope="read:balance", args={"purpose": "verify speed"}, latency_ms=1.0,
                        ))
                await db.write(job)  # type: ignore[arg-type]
            began = time.perf_counter()
            result = await db.read(audit.verify_log)
            elapsed = time.perf_counter() - began
            assert result.ok
            speeds[label] = result.checked / elapsed
        finally:
            await db.close()
    return speeds


def measure(workdir: Path, calls: int, batch: int, warmup: int, seconds: float, rounds: int, events: int,
            clients: int = CLIENTS) -> PgResults:
    """Every PostgreSQL figure of the report (a provider, market and policy as the other phases use)."""
    from bench.procs import start_provider

    provider = start_provider(workdir)
    try:
        assert provider.url is not None
        workload.use_provider(provider.url)
        market = workload.write_market(workdir, provider.url)
        policy = workload.write_policy(workdir)
        with fresh_database() as url, ExitStack() as stack:
            lite_db = workdir / "pg-vs-sqlite.db"
            env_pg = {**product_env(workdir, lite_db, market, policy), "TVM_DATABASE": url}
            env_lite = product_env(workdir, lite_db, market, policy)
            for env in (env_pg, env_lite):
                run_cli(workdir, env, "wallet", "credit", DEMO_ACCOUNT, str(10**12))
            replicas = [_served(stack, f"pg-replica{n}", workdir, env_pg) for n in range(3)]
            lite = _served(stack, "sqlite", workdir, env_lite)
            for server in (replicas[0], lite):
                asyncio.run(workload.stock_up(server, 10 * (calls + warmup) + 1000, 100))
            rows = asyncio.run(latency(replicas[0], lite, calls, batch, warmup))
            groups: dict[str, tuple[list[Server], str | None]] = {"SQLite, 1 process": ([lite], None)}
            for n in (1, 2, 3):
                groups[f"PostgreSQL, {n} replica{'s' if n > 1 else ''}"] = (replicas[:n], url)
            through = asyncio.run(throughput(groups, seconds, rounds, clients))
        with fresh_database() as url:
            speeds = asyncio.run(verify_speed(events, url, workdir / "verify.db"))
    finally:
        provider.stop()
    return PgResults(rows, through, speeds, clients)


def _served(stack: ExitStack, label: str, workdir: Path, env: dict[str, str]) -> Server:
    """`serve --transport http` under `label`, with the demo bearer token its banner prints and its
    metrics on a port of its own."""
    server = start(label, "http", workdir, product_cmd("serve"), {**env, "TVM_METRICS_PORT": str(free_port())})
    stack.callback(server.stop)
    assert server.errlog is not None
    server.token = demo_bearer_token(server.errlog, 0)
    return server


def render(results: PgResults, events: int) -> list[str]:
    lines = [
        "## 5. PostgreSQL against SQLite",
        "",
        "The same product over Streamable HTTP on a fresh PostgreSQL database (the machine's PostgreSQL 15, "
        "over TCP on 127.0.0.1) and on a SQLite file, alternating batches of sequential calls. "
        "Target: ≤ 1.5× per call.",
        "",
        "| call | PostgreSQL median ms | SQLite median ms | **ratio** | target | PostgreSQL round trips per call |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in results.latency:
        ok = row.ratio <= 1.5
        lines.append(f"| {row.label} | {median(row.postgres) * 1000:.2f} | {median(row.sqlite) * 1000:.2f} | "
                     f"**{row.ratio:.2f}×** | ≤ 1.5× {'✅' if ok else '❌'} | {row.round_trips:.2f} |")
    lines += [
        "",
        f"{results.clients} clients calling `{THROUGHPUT_CASE}` in a loop, spread over the replicas, alternating "
        "rounds with one SQLite process. All share this machine's 2 cores (and PostgreSQL's), so the replica rows "
        "measure contention more than scale: CPU seconds per call (servers and PostgreSQL backends), "
        "PostgreSQL transactions and round trips per call say what a bigger machine would get.",
        "",
        "| setup | calls/s | CPU ms per call | PostgreSQL transactions per call | round trips per call |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in results.throughput:
        per_call = (t.cpu_seconds / t.calls * 1000) if t.calls else float("nan")
        tx = f"{t.transactions / t.calls:.2f}" if t.transactions is not None and t.calls else "–"
        trips = f"{t.round_trips / t.calls:.2f}" if t.round_trips is not None and t.calls else "–"
        lines.append(f"| {t.label} | {t.rate:.0f} | {per_call:.2f} | {tx} | {trips} |")
    lines += [
        "",
        f"`audit verify` over {events:,} events: "
        + ", ".join(f"{label} {speed:,.0f} events/s" for label, speed in results.verify.items()) + ".",
        "",
    ]
    return lines
