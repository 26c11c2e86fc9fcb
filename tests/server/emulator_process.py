"""`token-vault-mcp emulator` as a real process on an ephemeral loopback port, flags and all."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.server.emulator.helpers import parse_exports

SETTINGS = {"AUTH0_DOMAIN", "AUTH0_AUDIENCE", "AUTH0_CLIENT_ID", "AUTH0_CLIENT_SECRET", "TVM_REFRESH_TOKEN"}


@dataclass
class Emulator:
    env: dict[str, str]  # the printed settings
    banner: str  # everything printed before the settings were complete

    @property
    def url(self) -> str:
        return self.env["AUTH0_DOMAIN"]


def clean_env() -> dict[str, str]:
    """The parent's PATH and friends only: no developer's AUTH0_* or TVM_* leaks into a child."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "SYSTEMROOT")}


@asynccontextmanager
async def emulator_process(cwd: Path, *flags: str) -> AsyncIterator[Emulator]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "emulator", "--port", "0", *flags,
        stderr=asyncio.subprocess.PIPE, env=clean_env(), cwd=cwd,
    )
    assert process.stderr is not None
    drain: asyncio.Task[bytes] | None = None
    try:
        printed = ""
        while not SETTINGS <= set(parse_exports(printed)):
            line = await asyncio.wait_for(process.stderr.readline(), timeout=20)
            assert line, f"emulator exited early: {printed}"
            printed += line.decode()
        # Keep reading: a full stderr pipe would block the emulator (it logs injected resets).
        drain = asyncio.create_task(process.stderr.read())
        yield Emulator(parse_exports(printed), printed)
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), timeout=10)
        if drain is not None:
            await drain
