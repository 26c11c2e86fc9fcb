"""Sequential latency: one client, one call at a time; product, floor and no-op interleaved in batches."""

from __future__ import annotations

import time
from dataclasses import dataclass

from mcp import Client

from bench.procs import Server
from bench.stats import median, percentile
from bench.workload import CASES, Case


@dataclass(frozen=True)
class Latency:
    transport: str
    case: str
    label: str
    product: list[float]  # seconds per call
    floor: list[float]
    noop: list[float]

    def med(self, side: str) -> float:
        return median(getattr(self, side))

    def p99(self, side: str) -> float:
        return percentile(getattr(self, side), 99)


async def _timed(client: Client, case: Case, count: int, start: int, out: list[float]) -> None:
    for i in range(start, start + count):
        args = case.args(i)
        began = time.perf_counter()
        result = await client.call_tool(case.tool, args)
        elapsed = time.perf_counter() - began
        case.answer(result)
        out.append(elapsed)


async def _timed_noop(client: Client, count: int, out: list[float]) -> None:
    for _ in range(count):
        began = time.perf_counter()
        result = await client.call_tool("noop", {})
        elapsed = time.perf_counter() - began
        if result.is_error:
            raise RuntimeError("noop failed")
        out.append(elapsed)


async def sequential(
    product: Server, floor: Server, cases: list[str], calls: int, batch: int, warmup: int
) -> list[Latency]:
    """For each case: `calls` timed calls per side, in alternating batches (A B N, then N B A, …)."""
    rows = []
    async with product.client() as prod, floor.client() as flo:
        for key in cases:
            case = CASES[key]
            samples: dict[str, list[float]] = {"product": [], "floor": [], "noop": []}
            scratch: list[float] = []
            await _timed(prod, case, warmup, 0, scratch)
            await _timed(flo, case, warmup, 0, scratch)
            await _timed_noop(flo, warmup, scratch)
            done = 0
            turn = 0
            while done < calls:
                n = min(batch, calls - done)
                order = ["product", "floor", "noop"] if turn % 2 == 0 else ["noop", "floor", "product"]
                for side in order:
                    if side == "product":
                        await _timed(prod, case, n, warmup + done, samples["product"])
                    elif side == "floor":
                        await _timed(flo, case, n, warmup + done, samples["floor"])
                    else:
                        await _timed_noop(flo, n, samples["noop"])
                done += n
                turn += 1
            rows.append(Latency(product.transport, key, case.label, samples["product"], samples["floor"],
                                samples["noop"]))
    return rows
