"""The browser fixture itself: Debian's Chromium starts headless and renders a page."""

from __future__ import annotations

from typing import Any


async def test_headless_chromium_renders_a_page(browser: Any) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    await page.set_content("<p id=claim>rendered</p>")
    assert await page.inner_text("#claim") == "rendered"
    await context.close()
