"""Throughput: N concurrent clients over Streamable HTTP, product and floor in alternating timed rounds."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from mcp import Client

from bench.procs import Server
from bench.workload import CASES


@dataclass(frozen=True)
class Throughput:
    case: str
    clients: int
    product_calls: int
    product_seconds: float
    product_errors: int
    floor_calls: int
    floor_seconds: float
    floor_errors: int
    audited: int  # ok events the product's database gained for this tool during the product's rounds

    @property
    def product_rate(self) -> float:
        return self.product_calls / self.product_seconds if self.product_seconds else 0.0

    @property
    def floor_rate(self) -> float:
        return self.floor_calls / self.floor_seconds if self.floor_seconds else 0.0


async def _load(clients: list[Client], key: str, seconds: float) -> tuple[int, int, float]:
    """Every client calls in a loop until the deadline; return (ok calls, errors, elapsed)."""
    case = CASES[key]
    counts = [0, 0]
    began = time.perf_counter()
    deadline = began + seconds

    async def worker(client: Client, n: int) -> None:
        i = n * 1_000_000
        while time.perf_counter() < deadline:
            try:
                case.answer(await client.call_tool(case.tool, case.args(i)))
                counts[0] += 1
            except Exception:
                counts[1] += 1
            i += 1

    await asyncio.gather(*(worker(c, n) for n, c in enumerate(clients)))
    return counts[0], counts[1], time.perf_counter() - began


def ok_events(database: Path, tool: str) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        query = "SELECT count(*) FROM audit_events WHERE tool = ? AND outcome = 'ok'"
        return int(conn.execute(query, (tool,)).fetchone()[0])


async def concurrent(
    product: Server, floor: Server, database: Path, levels: list[int], cases: list[str], seconds: float, rounds: int
) -> list[Throughput]:
    rows = []
    for level in levels:
        async with AsyncExitStack() as stack:
            prods = [await stack.enter_async_context(product.client()) for _ in range(level)]
            flos = [await stack.enter_async_context(floor.client()) for _ in range(level)]
            for key in cases:
                await _load(prods, key, min(0.5, seconds))  # warm both
                await _load(flos, key, min(0.5, seconds))
                totals = [0, 0.0, 0, 0, 0.0, 0, 0]
                for turn in range(rounds):
                    for side in (("product", "floor") if turn % 2 == 0 else ("floor", "product")):
                        if side == "product":
                            before = ok_events(database, CASES[key].tool)
                            ok, errors, elapsed = await _load(prods, key, seconds)
                            totals[6] += ok_events(database, CASES[key].tool) - before
                            totals[0] += ok
                            totals[1] += elapsed
                            totals[2] += errors
                        else:
                            ok, errors, elapsed = await _load(flos, key, seconds)
                            totals[3] += ok
                            totals[4] += elapsed
                            totals[5] += errors
                rows.append(
                    Throughput(key, level, int(totals[0]), totals[1], int(totals[2]), int(totals[3]), totals[4],
                               int(totals[5]), int(totals[6]))
                )
    return rows
