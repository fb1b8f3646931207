"""Headless Chromium driven by Playwright, for the tests of pages (dashboards, the explorer).

Playwright drives the distribution's Chromium (``/usr/bin/chromium``, which ``.ci/run``
installs); Playwright's own browser downloads are never used. ``watched`` records what a page
did: console errors, uncaught exceptions and every request it made; ``open_page`` loads one
``file://`` page, evaluates a JavaScript check and takes a screenshot.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
SCREENSHOT_DIR_ENV = "SAE_LENS_ATTN_SCREENSHOT_DIR"
"""Environment variable naming a folder that also receives the tests' screenshots."""
needs_browser = pytest.mark.skipif(
    not CHROMIUM.exists() or importlib.util.find_spec("playwright") is None,
    reason=f"needs Chromium at {CHROMIUM} and Playwright (the dev extra)",
)


@dataclass
class PageWatch:
    """What a page did while it was watched."""

    errors: list[str] = field(default_factory=list)
    """Console errors and uncaught exceptions, as text."""
    requests: list[str] = field(default_factory=list)
    """Every URL the page requested, in order."""

    def requests_outside(self, *prefixes: str) -> list[str]:
        """Requested URLs that start with none of ``prefixes``."""
        return [url for url in self.requests if not url.startswith(prefixes)]


@dataclass(frozen=True)
class PageReport:
    """What one page load showed."""

    errors: tuple[str, ...]
    """Console errors and uncaught exceptions, as text."""
    remote_requests: tuple[str, ...]
    """URLs requested that are not ``file:``, ``data:`` or ``about:``."""
    check: Any
    """The value of the JavaScript check expression."""
    screenshot: bytes
    """PNG of the page."""


@contextmanager
def chromium(*, timeout: float = 120.0) -> Iterator[Any]:
    """A fresh headless Chromium (a Playwright ``Browser``), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=list(FLAGS), timeout=timeout * 1000
        )
        try:
            yield browser
        finally:
            browser.close()


def watched(page: Any) -> PageWatch:
    """Start recording ``page``'s console errors, uncaught exceptions and requests."""
    watch = PageWatch()

    def console(message: Any) -> None:
        if message.type in ("error", "assert"):
            watch.errors.append(f"{message.text} ({message.location.get('url', '')})")

    page.on("console", console)
    page.on("pageerror", lambda error: watch.errors.append(f"uncaught: {error}"))
    page.on("request", lambda request: watch.requests.append(request.url))
    return watch


def open_page(page: Path, check: str, *, timeout: float = 120.0, settle: float = 0.5) -> PageReport:
    """Load ``page`` (a file) in headless Chromium, evaluate ``check`` (JavaScript), take a
    full-page screenshot."""
    with chromium(timeout=timeout) as browser:
        tab = browser.new_page(viewport={"width": 1280, "height": 1600})
        watch = watched(tab)
        tab.goto(page.resolve().as_uri(), wait_until="load", timeout=timeout * 1000)
        tab.wait_for_timeout(settle * 1000)  # let scripts that run after load (plots) finish
        value = tab.evaluate(check)
        shot = tab.screenshot(full_page=True)
    return PageReport(
        errors=tuple(watch.errors),
        remote_requests=tuple(watch.requests_outside("file:", "data:", "about:")),
        check=value,
        screenshot=shot,
    )


def save_screenshot(png: bytes, path: Path) -> list[Path]:
    """Write ``png`` to ``path``, and under ``$SAE_LENS_ATTN_SCREENSHOT_DIR`` too when set."""
    paths = [path]
    if os.environ.get(SCREENSHOT_DIR_ENV):
        paths.append(Path(os.environ[SCREENSHOT_DIR_ENV]) / path.name)
    for target in paths:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
        print(f"screenshot: {target}")
    return paths
