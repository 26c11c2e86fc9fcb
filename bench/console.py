"""Console: the Audit page over a large log, first page and each `audit list` filter (SPEC §11: < 200 ms).

The database is seeded as for growth (bench.growth.seed: 1 M chained events, matching ledger), then the
console is served for real (`server.web.console.local_console` on uvicorn, 127.0.0.1) and signed in
with its one-time link; each row is the median wall time of GET /console/audit?… over HTTP, page
rendered, as a browser would ask it (the live refresh asks the same). Filters that match nothing or
only the oldest events are the worst case of a newest-first keyset page: the whole log is passed.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from bench.growth import account_name, agent_of, seed
from bench.stats import median
from server.broker import Broker
from server.store import Database
from server.web.console import local_console
from server.web.loopback import port_of, serving, tcp_socket

BUDGET_MS = 200.0


@dataclass(frozen=True)
class ConsoleRow:
    case: str
    query: str
    median_ms: float
    worst_ms: float
    rows: int
    complete: bool  # False: the page answered within its scan budget with the matches found so far

    @property
    def ok(self) -> bool:
        return self.median_ms < BUDGET_MS


def cases(events: int) -> list[tuple[str, str]]:
    return [
        ("first page (newest 50)", ""),
        ("account", f"account={account_name(3)}"),
        ("agent", f"agent={agent_of(3)}"),
        ("tool (frequent)", "tool=request_token"),
        ("tool (only the oldest events)", "tool=wallet_credit"),
        ("outcome (matches nothing)", "outcome=denied"),
        ("since … until (a month)", "since=2026-06-01T00:00:00Z&until=2026-06-30T00:00:00Z"),
        ("until (only the oldest events)", "until=2026-06-01T00:00:01Z"),
        ("account + tool + outcome", f"account={account_name(3)}&tool=buy_quota&outcome=ok"),
        ("second page (keyset: before=id)", f"before={events // 2}"),
    ]


async def _measure(path: Path, events: int, repeat: int) -> list[ConsoleRow]:
    db = await Database.open(path)
    console = local_console(Broker(db))
    console.signin.out = io.StringIO()  # type: ignore[union-attr]
    sock = tcp_socket()
    port = port_of(sock)
    app = Starlette(routes=[Mount("/console", app=console.app())])
    base = f"http://127.0.0.1:{port}"
    rows: list[ConsoleRow] = []
    try:
        async with serving(app, sock, lifespan="off"):
            link = console.signin.announce(base)  # type: ignore[union-attr]
            async with httpx.AsyncClient(base_url=base) as http:
                signed = await http.get(link.removeprefix(base))
                assert signed.status_code == 200, signed.status_code
                http.cookies = signed.cookies
                for case, query in cases(events):
                    times: list[float] = []
                    count, complete = 0, True
                    for _ in range(repeat + 1):
                        began = time.perf_counter()
                        answer = await http.get(f"/console/audit?{query}")
                        times.append(time.perf_counter() - began)
                        assert answer.status_code == 200, (case, answer.status_code)
                        count = answer.text.count("<tr data-id=")
                        complete = 'id="searched"' not in answer.text
                    timed = times[1:]  # the first warms the caches
                    rows.append(ConsoleRow(case, query, median(timed) * 1000, max(timed) * 1000, count, complete))
    finally:
        await db.close()
    return rows


def console_bench(workdir: Path, events: int, repeat: int) -> list[ConsoleRow]:
    """Seed `events` events (reusing a database seeded before at the same size) and time the Audit page."""
    path = workdir / f"console-{events}.db"
    if not path.exists():
        asyncio.run(seed(path, events))
    return asyncio.run(_measure(path, events, repeat))


def render(rows: list[ConsoleRow], events: int) -> list[str]:
    lines = [
        "## 6. Console: the Audit page over a large log",
        "",
        f"GET /console/audit over HTTP on 127.0.0.1 (page rendered), {events:,} events; budget {BUDGET_MS:.0f} ms.",
        "",
        "| filter | query | median | worst | rows | answer | under budget |",
        "|---|---|---:|---:|---:|:-:|:-:|",
    ]
    for r in rows:
        query = (r.query or "-").replace("|", "\\|")
        lines.append(f"| {r.case} | `{query}` | {r.median_ms:.1f} ms | {r.worst_ms:.1f} ms | {r.rows} | "
                     f"{'complete' if r.complete else 'partial: scan budget spent'} | {'✅' if r.ok else '❌'} |")
    return [*lines, ""]


def main() -> None:  # pragma: no cover - `python -m bench.console [EVENTS]`
    import sys
    import tempfile

    events = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    workdir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="tvm-console-bench-"))
    print("\n".join(render(console_bench(workdir, events, 5), events)))


if __name__ == "__main__":  # pragma: no cover
    main()
