"""`python -m bench`: run every benchmark and write `docs/benchmarks.md`.

    python -m bench                 # the full run (about 10 minutes on 2 cores)
    python -m bench --smoke         # tiny sizes, seconds: keeps the bench working (CI)
    python -m bench --only latency,coldstart --transports stdio --out /tmp/b.md
    python -m bench --only console --out /tmp/console.md   # the console's Audit page over 1 M events
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import coldstart, console, growth, latency, postgres, report, throughput, workload
from bench.procs import ROOT, Server, child_env, floor_cmd, product_cmd, product_env, start, start_provider

PHASES = ("latency", "throughput", "coldstart", "growth", "postgres", "console")
THROUGHPUT_CASES = ("check_balance", "buy_quota", "request_token", "call_api")
FULL = {
    "calls": 600, "batch": 5, "warmup": 30, "levels": "1,8,32,64", "seconds": 1.5, "rounds": 6,
    "coldstarts": 20, "events": "10000,1000000", "repeat": 300, "pg_clients": 32,
}
SMOKE = {
    "calls": 6, "batch": 3, "warmup": 1, "levels": "2", "seconds": 0.2, "rounds": 2,
    "coldstarts": 1, "events": "300,1000", "repeat": 3, "pg_clients": 4,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds); writes nothing unless --out")
    p.add_argument("--out", type=Path, help="report file (default docs/benchmarks.md; none in --smoke)")
    p.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases of {', '.join(PHASES)}")
    p.add_argument("--transports", default="stdio,http,sse", help="for sequential latency")
    p.add_argument("--cases", default=",".join(workload.CASES), help="latency cases")
    p.add_argument("--calls", type=int, help="timed sequential calls per side per case")
    p.add_argument("--batch", type=int, help="calls per interleaved batch")
    p.add_argument("--warmup", type=int, help="untimed calls per side first")
    p.add_argument("--levels", help="concurrent clients, comma-separated")
    p.add_argument("--seconds", type=float, help="length of one throughput round")
    p.add_argument("--rounds", type=int, help="throughput rounds per side")
    p.add_argument("--coldstarts", type=int, help="cold starts per side")
    p.add_argument("--pg-clients", type=int, help="clients of the PostgreSQL replicas' throughput rounds")
    p.add_argument("--events", help="audit events of the growth databases, comma-separated")
    p.add_argument("--repeat", type=int, help="timed repetitions of each growth query")
    p.add_argument("--workdir", type=Path, help="keep databases and logs here (default: a temporary dir)")
    args = p.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None and not args.smoke:
        args.out = ROOT / "docs" / "benchmarks.md"
    return args


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@contextmanager
def _pair(transport: str, workdir: Path, env: dict[str, str], answers: Path) -> Iterator[tuple[Server, Server]]:
    """The product and its floor serving over `transport`; both stopped on the way out."""
    with ExitStack() as stack:
        product = start("product", transport, workdir, product_cmd("serve"), env)
        stack.callback(product.stop)
        floor = start("floor", transport, workdir, floor_cmd(answers), child_env(workdir))
        stack.callback(floor.stop)
        yield product, floor


async def _networked(args: argparse.Namespace, workdir: Path, env: dict[str, str], answers: Path,
                     phases: set[str], transports: list[str], results: report.Results) -> None:
    database = Path(env["TVM_DATABASE"])
    cases = [c for c in args.cases.split(",") if c] if "latency" in phases else []
    late = [c for c in cases if c in workload.LEAVES_GRANTS]  # after everything check_balance is timed in
    for transport in transports:
        with _pair(transport, workdir, env, answers) as (product, floor):
            if early := [c for c in cases if c not in late]:
                _say(f"sequential latency over {transport}")
                results.latency += await latency.sequential(product, floor, early, args.calls, args.batch,
                                                            args.warmup)
            if transport == "http" and "throughput" in phases:
                _say("throughput over Streamable HTTP")
                results.throughput = await throughput.concurrent(
                    product, floor, database, _ints(args.levels), list(THROUGHPUT_CASES), args.seconds, args.rounds
                )
    for transport in transports if late else []:
        with _pair(transport, workdir, env, answers) as (product, floor):
            _say(f"sequential latency over {transport}: {', '.join(late)}")
            results.latency += await latency.sequential(product, floor, late, args.calls, args.batch, args.warmup)
    results.latency.sort(key=lambda r: (transports.index(r.transport), cases.index(r.case)))


def _units_needed(args: argparse.Namespace, transports: list[str]) -> tuple[int, int]:
    """Units to buy first: (request_token's listing, call_api's proxy listing)."""
    sequential = len(transports) * 2 * (args.calls + args.warmup)
    concurrent = sum(_ints(args.levels)) * 0 + len(_ints(args.levels)) * (args.rounds * args.seconds + 1) * 600
    # one unit per opened grant: every call of "opening a grant", one grant per agent inside a grant (plus
    # the units of first calls that raced and were refunded)
    grants = len(transports) * (args.calls + args.warmup) + len(transports) + sum(_ints(args.levels))
    return int(sequential + concurrent + 1000), grants + 100


def _measure_product(args: argparse.Namespace, workdir: Path, phases: set[str], transports: list[str],
                     results: report.Results) -> None:
    """Every phase that talks to the product: its provider API, market and wallet first, then the runs."""
    provider = start_provider(workdir)
    try:
        assert provider.url is not None
        workload.use_provider(provider.url)
        market = workload.write_market(workdir, provider.url)
        database = workdir / "product.db"
        env = product_env(workdir, database, market, workload.write_policy(workdir))
        _say(f"preparing the product (database {database}, provider API {provider.url})")
        workload.fund(workdir, env)
        stdio = start("product", "stdio", workdir, product_cmd("serve"), env)
        try:
            asyncio.run(workload.stock_up(stdio, *_units_needed(args, transports)))
            answers, tools = asyncio.run(workload.capture(stdio, workdir))
        finally:
            stdio.stop()
        if phases & {"latency", "throughput"}:
            asyncio.run(_networked(args, workdir, env, answers, phases, transports, results))
        if "coldstart" in phases:
            _say("cold start over stdio")
            results.cold = coldstart.cold_starts(
                (product_cmd("serve"), env), (floor_cmd(answers, "--tools", str(tools)), child_env(workdir)),
                workdir, args.coldstarts,
            )
    finally:
        provider.stop()


def run(args: argparse.Namespace, workdir: Path) -> report.Results:
    phases = {p for p in args.only.split(",") if p}
    unknown = phases - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phase(s): {', '.join(sorted(unknown))}")
    transports = [t for t in args.transports.split(",") if t]
    if "throughput" in phases and "http" not in transports:
        transports.append("http")
    command = "python -m " + " ".join(["bench", *map(shlex.quote, sys.argv[1:])])
    results = report.Results(command=command.strip())
    results.settings = {k: getattr(args, k) for k in ("calls", "batch", "warmup", "levels", "seconds", "rounds",
                                                      "coldstarts", "events", "repeat", "pg_clients")}
    began = time.perf_counter()
    if phases & {"latency", "throughput", "coldstart"}:
        _measure_product(args, workdir, phases, transports, results)
    if "growth" in phases:
        _say(f"growth: {args.events} events")
        results.growth = growth.growth(workdir, _ints(args.events), args.repeat)
    if "postgres" in phases:
        _say("PostgreSQL against SQLite: latency, replicas, audit verify")
        pg_events = min(_ints(args.events)[-1], 100_000)
        results.postgres = postgres.render(
            postgres.measure(
                workdir, args.calls, args.batch, args.warmup, args.seconds, args.rounds, pg_events, args.pg_clients
            ),
            pg_events,
        )
    if "console" in phases:
        events = _ints(args.events)[-1]
        _say(f"console: the Audit page over {events} events")
        results.console = console.render(console.console_bench(workdir, events, min(args.repeat, 20)), events)
    results.seconds = time.perf_counter() - began
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="tvm-bench-") as tmp:
            results = run(args, Path(tmp))
    notes = report.kept_notes(args.out) if args.out else ""
    text = report.render(results, notes)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        _say(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
