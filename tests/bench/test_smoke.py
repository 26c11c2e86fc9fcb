"""The bench's smoke run (tiny sizes): every phase still runs end to end and writes its report.

Not a timed test: it checks that the bench works and that its own correctness checks hold
(no failed calls, every call audited, the seeded chains verify), never how fast anything is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_every_table_with_no_errors_and_every_call_audited(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text(encoding="utf-8")
    for heading in ("## 1. Sequential latency", "## 2. Throughput", "## 3. Cold start", "## 4. Growth",
                    "## 5. PostgreSQL against SQLite", "## 6. Console: the Audit page"):
        assert heading in report
    postgres = report.split("## 5. PostgreSQL against SQLite", 1)[1]
    for setup in ("SQLite, 1 process", "PostgreSQL, 1 replica", "PostgreSQL, 2 replicas", "PostgreSQL, 3 replicas"):
        [row] = [r for r in postgres.splitlines() if r.startswith(f"| {setup} |")]
        assert int(row.split("|")[2]) > 0, row  # calls/s
    assert "PostgreSQL" in postgres.split("`audit verify`", 1)[1]
    for transport in ("stdio", "http", "sse"):
        for case in ("request_token, fresh exchange", "call_api, inside a live grant", "call_api, opening a grant"):
            assert f"| {transport} | {case} |" in report
    throughput = report.split("## 2. Throughput", 1)[1].split("## 3.", 1)[0]
    rows = [line for line in throughput.splitlines() if line.startswith("| ") and "calls/s" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["check_balance", "buy_quota", "request_token", "call_api"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[6] == "0", row  # errors
        calls, audited = cells[7].split(" ")[0], cells[7].split(" ")[2]
        assert calls == audited and int(calls) > 0, row
    console = report.split("## 6. Console", 1)[1]
    assert console.count("| ✅ |") + console.count("| ❌ |") == 10  # every filter was asked and answered
    growth = report.split("## 4. Growth", 1)[1]
    assert "❌ |\n" not in growth.split("| from", 1)[0], "a seeded chain failed to verify"
