"""How to keep one audit log across replicas on PostgreSQL: the two designs, measured on this machine.

    python -m bench.audit_chains [--writers 3] [--events 1500]

- **one chain**: every writer locks the one head row (as the product's `write_lock`), appends
  `id = head + 1` with a hash over the previous one, commits. Verify walks one chain by id.
- **per-replica chains**: each writer chains its own events (its own head row, no shared lock), and a
  verifier must then check each chain and tie them together (e.g. by timestamps or periodic
  cross-links) to prove completeness and order across replicas.

Each writer is a thread with its own connection, one event per transaction (the worst case: no group
commit), all on a fresh database, alternating the designs in rounds. Prints appends per second for
each design and how many writers; the product chose one chain (see server/store/postgres.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import threading
import time

import psycopg

MAINTENANCE = os.environ.get("TVM_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _setup(url: str, writers: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE heads (chain INT PRIMARY KEY, id BIGINT NOT NULL, hash BYTEA NOT NULL)")
        conn.execute("CREATE TABLE events (chain INT NOT NULL, id BIGINT NOT NULL, hash BYTEA NOT NULL, "
                     "body TEXT NOT NULL, PRIMARY KEY (chain, id))")
        for chain in range(writers + 1):
            conn.execute("INSERT INTO heads VALUES (%s, 0, %s)", (chain, bytes(32)))


def _writer(url: str, chain: int, events: int, out: list[float]) -> None:
    body = '{"tool":"check_balance","outcome":"ok"}'
    with psycopg.connect(url) as conn:
        began = time.perf_counter()
        for _ in range(events):
            with conn.transaction():
                head_id, head_hash = conn.execute(
                    "SELECT id, hash FROM heads WHERE chain = %s FOR UPDATE", (chain,)
                ).fetchone()  # type: ignore[misc]
                digest = hashlib.sha256(bytes(head_hash) + body.encode()).digest()
                conn.execute("INSERT INTO events VALUES (%s, %s, %s, %s)", (chain, head_id + 1, digest, body))
                conn.execute("UPDATE heads SET id = %s, hash = %s WHERE chain = %s", (head_id + 1, digest, chain))
        out.append(time.perf_counter() - began)


def _round(url: str, writers: int, events: int, shared: bool) -> float:
    times: list[float] = []
    threads = [threading.Thread(target=_writer, args=(url, 0 if shared else n + 1, events, times))
               for n in range(writers)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return writers * events / (time.perf_counter() - began)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.audit_chains", description=__doc__)
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--events", type=int, default=1500)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    name = f"tvm_chains_{secrets.token_hex(4)}"
    base = MAINTENANCE.rsplit("/", 1)[0]
    with psycopg.connect(MAINTENANCE, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"{base}/{name}"
        _setup(url, args.writers)
        rates: dict[str, list[float]] = {"one chain": [], "per-replica chains": []}
        for turn in range(args.rounds):
            for shared in ((True, False) if turn % 2 == 0 else (False, True)):
                rates["one chain" if shared else "per-replica chains"].append(
                    _round(url, args.writers, args.events, shared)
                )
        for label, values in rates.items():
            print(f"{label}: {sum(values) / len(values):,.0f} appends/s ({args.writers} writers, one event "
                  f"per transaction, {args.rounds} rounds)")
    finally:
        with psycopg.connect(MAINTENANCE, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
