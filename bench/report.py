"""The Markdown report (`docs/benchmarks.md`): machine, versions, command, date, one table per question.

Text below the `<!-- notes -->` marker of an existing report is kept, so hand-written notes
survive a rerun.
"""

from __future__ import annotations

import math
import os
import platform
import sqlite3
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench.coldstart import ColdStart
from bench.growth import Growth
from bench.latency import Latency
from bench.stats import median, ratio
from bench.throughput import Throughput

NOTES_MARKER = "<!-- notes -->"
# (median ratio limit) per latency case, against the floor
LATENCY_TARGETS = {
    "list_market": 1.25,
    "check_balance": 1.25,
    "buy_quota": 1.35,
    "request_token": 1.6,
    "request_token_fresh": 2.5,
    "call_api": 1.3,
    "call_api_fresh": 2.5,
}
# share of the floor's calls/s at 32 clients
THROUGHPUT_TARGETS = {"check_balance": 0.85, "buy_quota": 0.70, "request_token": 0.70, "call_api": 0.75}
TARGET_CLIENTS = 32
COLD_START_TARGET = 1.3
GROWTH_TARGET = 2.0
BYTES_TARGET = 400
VERIFY_TARGET = 100_000


@dataclass
class Results:
    command: str
    seconds: float = 0.0
    settings: dict[str, object] = field(default_factory=dict)
    latency: list[Latency] = field(default_factory=list)
    throughput: list[Throughput] = field(default_factory=list)
    cold: ColdStart | None = None
    growth: list[Growth] = field(default_factory=list)
    postgres: list[str] = field(default_factory=list)  # its section, rendered by bench.postgres
    console: list[str] = field(default_factory=list)  # its section, rendered by bench.console


def _ms(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


def _x(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}×"


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def machine() -> list[str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    versions = ", ".join(
        f"{name} {_version(name)}" for name in ("mcp", "pydantic", "starlette", "uvicorn", "httpx", "aiosqlite")
    )
    return [
        f"- **Machine**: {cpu}, {os.cpu_count()} cores, {memory} RAM; {platform.system()} {platform.release()}",
        f"- **Versions**: Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {versions}",
    ]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def render(results: Results, notes: str) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Every figure is a ratio against a baseline measured in the same run, interleaved with it "
        "(batches or rounds alternate A B, B A, …), so drift on a noisy machine hits both.",
        "",
        *machine(),
        f"- **Command**: `{results.command}` (took {results.seconds / 60:.1f} min)",
        f"- **Date**: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- **Settings**: {', '.join(f'{k}={v}' for k, v in results.settings.items())}",
        "",
        "**The floor** of a tool is a bare `MCPServer` (`bench/floor.py`) with a tool of the same name, "
        "built on the product's own pydantic input and output models, that returns the product's real "
        "answer (captured once at the start of the run) with nothing behind it: what the SDK alone costs "
        "for that exact answer on that transport. `call_api` is the exception, as its answer is a provider's: "
        "the floor's `call_api` sends the same request with one pooled httpx client to the same loopback "
        "provider API and returns the provider's status, header subset and body. That provider "
        "(`bench/provider.py`, its own process, plain asyncio HTTP/1.1 with keep-alive) answers a fixed "
        "small JSON body to any bearer token; the product reaches it through the market's proxy listing "
        "(`api` = its loopback URL). Over HTTP and SSE the floor has no authentication (the "
        "SDK's floor); the product checks a bearer JWT on every request (its RS256 signature once per token, "
        "remembered 5 minutes; its claims every time). The product runs "
        "`token-vault-mcp serve` in demo mode (the Auth0 emulator in process), durable as always (WAL, "
        "`synchronous=FULL`), every call audited, with a policy file that lifts the per-agent call rate to its "
        "maximum (every call still passes the policy's checks in its transaction; the default 600 calls a "
        "minute would refuse most of a run). Servers and the measuring client are separate processes.",
        "",
    ]
    if results.latency:
        lines += _latency(results.latency)
    if results.throughput:
        lines += _throughput(results.throughput)
    if results.cold is not None:
        lines += _cold(results.cold)
    if results.growth:
        lines += _growth(results.growth)
    lines += results.postgres
    lines += results.console
    lines += [NOTES_MARKER, notes.strip("\n"), ""]
    return "\n".join(lines)


def _latency(rows: list[Latency]) -> list[str]:
    out = [
        "## 1. Sequential latency",
        "",
        "One client, one call at a time; product, floor and a no-op tool (on the floor server) in "
        "alternating batches. `request_token` in steady state reuses the Token Vault answer (SPEC §4: same "
        "account, connection, scopes and login_hint within 60 s; each call still spends a unit and writes "
        "its event); on a fresh exchange every call carries a new `login_hint`, so the reuse cache misses "
        "and the in-process emulator answers a real Token Vault exchange. The market holds 100 open "
        "listings (one of them the proxy listing `call_api` spends); `list_market` asks for all of them. "
        "`call_api` *inside a live grant*: the same terms every call, so the first call (in the warm-up) "
        "opens a grant for the whole run (`TVM_GRANT_TTL=86400`, capped 30 s before its token's expiry) and "
        "the timed calls spend nothing: two short transactions (find the grant; write the event) around the "
        "provider's round trip. *Opening a grant*: a new `login_hint` every call is a new grant key, so every "
        "call reserves a unit, makes a fresh Token Vault exchange, calls the provider and commits the grant "
        "with its event; these rows run after every other case and the throughput phase, as the grants they "
        "leave show in `check_balance`. Targets are on the median ratio.",
        "",
        "| transport | call | product median ms | floor median ms | **ratio** | target | product p99 ms | "
        "floor p99 ms | p99 ratio | no-op median ms | product / no-op |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        med = ratio(r.med("product"), r.med("floor"))
        target = LATENCY_TARGETS[r.case]
        out.append(
            f"| {r.transport} | {r.label} | {_ms(r.med('product'))} | {_ms(r.med('floor'))} | **{_x(med)}** | "
            f"≤ {target}× {_mark(med <= target)} | {_ms(r.p99('product'))} | {_ms(r.p99('floor'))} | "
            f"{_x(ratio(r.p99('product'), r.p99('floor')))} | {_ms(r.med('noop'))} | "
            f"{_x(ratio(r.med('product'), r.med('noop')))} |"
        )
    return [*out, ""]


def _throughput(rows: list[Throughput]) -> list[str]:
    out = [
        "## 2. Throughput over Streamable HTTP",
        "",
        "N clients (each its own MCP session) call in a loop for a fixed time; product and floor rounds "
        "alternate (short rounds, several per side: `seconds`, `rounds` in Settings), and each rate is "
        "calls over time summed across its side's rounds. The server runs with a 0.5 ms GIL switch "
        "interval (`server/serve.py`). All clients act for the demo account, so every `buy_quota` and "
        "`request_token` writes to one wallet and one holding. *audited* = `ok` events the product's "
        "database gained for that tool during the product's rounds (must equal its successful calls). Targets apply at "
        f"{TARGET_CLIENTS} clients.",
        "",
        "| call | clients | product calls/s | floor calls/s | **product / floor** | target | errors | "
        "calls = audited events |",
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        share = ratio(r.product_rate, r.floor_rate)
        target = THROUGHPUT_TARGETS.get(r.case)
        shown = (
            f"≥ {target:.0%} {_mark(share >= target and r.product_errors == 0 and r.audited == r.product_calls)}"
            if target is not None and r.clients == TARGET_CLIENTS
            else ""
        )
        out.append(
            f"| {r.case} | {r.clients} | {r.product_rate:.0f} | {r.floor_rate:.0f} | **{share:.0%}** | {shown} | "
            f"{r.product_errors + r.floor_errors} | "
            f"{r.product_calls} = {r.audited} {_mark(r.audited == r.product_calls)} |"
        )
    return [*out, ""]


def _cold(cold: ColdStart) -> list[str]:
    prod, flo = median(cold.product), median(cold.floor)
    r = ratio(prod, flo)
    return [
        "## 3. Cold start over stdio",
        "",
        "From spawning the process to the answer to the first `tools/list` (after `initialize`), "
        "product and floor alternating. The product: `python -m server serve` in demo mode on an existing "
        "database (it opens the database, makes its demo tenant, loads the 100-listing market file, "
        "refunds dead reservations). The floor: `python -m bench.floor --tools …`, an `MCPServer` with "
        f"the same {cold.tools} tool definitions (the captured `tools/list`), importing nothing of the product.",
        "",
        "| product median ms | floor median ms | **ratio** | target | starts each |",
        "|---:|---:|---:|---|---:|",
        f"| {_ms(prod)} | {_ms(flo)} | **{_x(r)}** | ≤ {COLD_START_TARGET}× {_mark(r <= COLD_START_TARGET)} | "
        f"{len(cold.product)} |",
        "",
    ]


def _growth(rows: list[Growth]) -> list[str]:
    out = [
        "## 4. Growth of the database",
        "",
        "Databases made by the product and seeded by bulk inserts (`bench/growth.py`): 100 accounts, each "
        "cycling through a purchase, five tokens, two balance checks and two market looks, with the "
        "matching ledger rows (credits, purchases, committed reservations, holdings) and a valid hash "
        "chain. Timed through the product's code: the store query behind `audit list --account` (newest "
        "50 of one account), behind `audit lookup --token-stdin` (one token's fingerprint), the broker's "
        "audited `check_balance` (with its durable commit), and `audit verify` over the whole chain. "
        "Bytes on disk = database file (+ WAL) / events, ledger included.",
        "",
        "| events | audit list ms | audit lookup ms | check_balance ms | bytes / event | verify events/s | "
        "chain ok |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for g in rows:
        out.append(
            f"| {g.events:,} | {_ms(g.audit_list)} | {_ms(g.audit_lookup)} | {_ms(g.check_balance)} | "
            f"{g.bytes_per_event:.0f} | {g.verify_rate:,.0f} | {_mark(g.verify_ok)} |"
        )
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        grow = [
            ("audit list", ratio(large.audit_list, small.audit_list)),
            ("audit lookup", ratio(large.audit_lookup, small.audit_lookup)),
            ("check_balance", ratio(large.check_balance, small.check_balance)),
        ]
        out += ["", f"| from {small.events:,} to {large.events:,} events | growth | target |", "|---|---:|---|"]
        for name, value in grow:
            out.append(f"| {name} | {_x(value)} | ≤ {GROWTH_TARGET}× {_mark(value <= GROWTH_TARGET)} |")
        bpe = large.bytes_per_event
        out.append(
            f"| bytes on disk per event at {large.events:,} | {bpe:.0f} | "
            f"< {BYTES_TARGET} {_mark(bpe < BYTES_TARGET)} |"
        )
        rate = large.verify_rate
        out.append(
            f"| `audit verify` at {large.events:,} | {rate:,.0f} events/s | ≥ {VERIFY_TARGET:,} "
            f"{_mark(rate >= VERIFY_TARGET)} |"
        )
    return [*out, ""]


def kept_notes(path: Path) -> str:
    if not path.exists():
        return "## Notes\n\n(none yet)\n"
    text = path.read_text(encoding="utf-8")
    _, found, rest = text.partition(NOTES_MARKER)
    return rest if found else "## Notes\n\n(none yet)\n"
