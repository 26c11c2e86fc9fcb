"""A real headless Chromium for the web pages' tests: Debian's `chromium`, driven by Playwright.

Playwright only drives it (`executable_path`); no browser is ever downloaded. Without the binary the
tests skip, except under CI (`CI` set), where they fail: `.ci/run` installs it.
Use the `browser` fixture (one browser per test module is cheap enough: ~0.3 s to start) and open a
fresh context per test so cookies never leak between tests.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

CHROMIUM = os.environ.get("TVM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """The browser binary; skips the test without it (fails under CI)."""
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if path is None:
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + " — CI must run the browser tests", pytrace=False)
        pytest.skip(message)
    return path


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[object]:
    """A launched `playwright.async_api.Browser` (typed `object` so tests import Playwright's types themselves)."""
    from playwright.async_api import async_playwright

    path = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        try:
            yield launched
        finally:
            await launched.close()
