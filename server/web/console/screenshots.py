"""`python -m server.web.console.screenshots [--out docs/console]`: a PNG of each console page of the demo.

Runs the demo (`serve --transport http` without a tenant, on a temporary database and a loopback
port), lets a few agents work (quota bought, a token, brokered calls, a refusal, a blocked agent),
signs in with the one-time link in headless Chromium (Debian's `/usr/bin/chromium`, driven by
Playwright from the `test` extra; no browser is downloaded) and saves each page's screenshot.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import tempfile
from pathlib import Path

from server.app import Runtime, open_runtime
from server.broker import Call
from server.config import load_config
from server.emulator.demo import DEMO_SCOPES
from server.principal import Principal
from server.web.console.app import PAGES

CHROMIUM = os.environ.get("TVM_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


async def _activity(runtime: Runtime) -> None:
    """What a few agents do in the demo, through the broker as their tool calls would."""
    broker = runtime.broker
    assert runtime.tenant is not None
    account = runtime.tenant.account
    for agent in ("claude-desktop", "nightly-report-bot", "ci-triage-agent"):
        who = Principal(account=account, agent=agent, scopes=frozenset(DEMO_SCOPES))
        call = Call(tool="buy_quota", scope="buy:quota", transport="http",
                    args={"listing_id": "github-repo-read-api", "units": 3, "max_unit_price": 100})
        await broker.buy_quota(call, who, listing_id="github-repo-read-api", units=3, max_unit_price=100,
                               idempotency_key=None)
        check = Call(tool="check_balance", scope="read:balance", transport="http")
        await broker.check_balance(check, who)
    await broker.credit("auth0|ops-team", 2500, transport="console", by="console:demo")
    await broker.block_agent("ci-triage-agent", "looping on the same issue", "console:demo", transport="console")


async def shoot(out: Path) -> list[Path]:
    """Start the demo, make some activity, and save `out/<page>.png` for each page. Returns the files."""
    from playwright.async_api import async_playwright

    from server.web.loopback import port_of, serving, tcp_socket
    from server.web.remote import build_remote_app, remote_settings

    with tempfile.TemporaryDirectory(prefix="tvm-screens-") as tmp:
        runtime = await open_runtime(load_config({"TVM_DATABASE": str(Path(tmp) / "demo.db")}, dotenv=False))
        try:
            await _activity(runtime)
            sock = tcp_socket()
            port = port_of(sock)
            app = build_remote_app(runtime, remote_settings(runtime.config, "http", "127.0.0.1", port))
            app.state.console.signin.out = io.StringIO()
            base = f"http://127.0.0.1:{port}"
            saved = []
            async with serving(app, sock):
                async with async_playwright() as pw:
                    browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                    page = await browser.new_page(viewport={"width": 1360, "height": 900})
                    await page.goto(app.state.console.signin.announce(base))
                    await page.wait_for_url("**/console/market")
                    for name in PAGES:
                        await page.goto(f"{base}/console/{name}")
                        if name == "audit":
                            await page.wait_for_selector("#chain-line")
                        path = out / f"{name}.png"
                        await page.screenshot(path=str(path), full_page=True)
                        saved.append(path)
                    await browser.close()
        finally:
            await runtime.aclose()
    return saved


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m server.web.console.screenshots", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("docs/console"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for path in asyncio.run(shoot(args.out)):
        print(path)


if __name__ == "__main__":
    main()
