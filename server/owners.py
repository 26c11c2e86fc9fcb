"""Who holds a reservation: a process, named so that a dead one is recognisable (SPEC §5).

An owner is `host:pid:start` (the process's start time in clock ticks since boot, from /proc), so
a pid reused by another program is not mistaken for the process that reserved.
"""

from __future__ import annotations

import os
import socket


def process_owner() -> str:
    """Who holds a reservation: host, pid and the process's start, so a dead owner is recognisable."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


def _process_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def owner_alive(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname():
        return True  # another machine's reservation: not ours to judge
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return start in ("?", _process_start(pid))
