"""Cold start: from process start to the first `tools/list` answer over stdio, product and floor alternating."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError

_INIT = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}
_SCRIPT = b"".join(
    (json.dumps(m) + "\n").encode()
    for m in (
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": _INIT},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    )
)


@dataclass(frozen=True)
class ColdStart:
    product: list[float]
    floor: list[float]
    tools: int


def first_tools_list(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    """Seconds from spawning `cmd` to its tools/list answer, and how many tools it listed."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=cwd
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(_SCRIPT)
        proc.stdin.flush()
        while True:
            line = proc.stdout.readline()
            if not line:
                raise BenchError(f"{cmd[2:4]} closed stdout before answering tools/list")
            message = json.loads(line)
            if message.get("id") == 2:
                elapsed = time.perf_counter() - began
                return elapsed, len(message["result"]["tools"])
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cold_starts(
    product: tuple[list[str], dict[str, str]], floor: tuple[list[str], dict[str, str]], cwd: Path, rounds: int
) -> ColdStart:
    first_tools_list(*product, cwd)  # a first start creates the database and warms the OS file cache
    first_tools_list(*floor, cwd)
    times: dict[str, list[float]] = {"product": [], "floor": []}
    tools = 0
    for turn in range(rounds):
        for side in (("product", "floor") if turn % 2 == 0 else ("floor", "product")):
            cmd, env = product if side == "product" else floor
            elapsed, listed = first_tools_list(cmd, env, cwd)
            times[side].append(elapsed)
            tools = listed if side == "product" else tools
    return ColdStart(times["product"], times["floor"], tools)
