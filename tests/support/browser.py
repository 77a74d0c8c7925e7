"""The web page in a real browser (Debian's chromium driven headless by Playwright): what
the browser tests share. The `browser` fixture is in tests/slow/conftest.py."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


async def open_page(browser: Any, base: str, bearer: str) -> tuple[Any, Any, list[str]]:
    context = await browser.new_context(accept_downloads=True)
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.goto(base + "/")
    await page.fill("#token", bearer)
    await page.click("#login-form button[type=submit]")
    await page.wait_for_selector("#targets tbody tr[data-target=main]")
    return context, page, problems


async def backed_up_on_the_page(browser: Any, base: str, bearer: str
                                ) -> tuple[Any, Any, list[str], Any]:
    """The page open as `bearer`, target `main` chosen, a backup made from it: the context,
    the page, the problems it logs, and the new backup's row."""
    context, page, problems = await open_page(browser, base, bearer)
    await page.click("#targets a:text('main')")
    await page.click("#backup-now")
    row = page.locator("#backups tbody tr").first
    await row.wait_for(timeout=60_000)
    return context, page, problems, row
