"""Headless Chromium driven over the Chrome DevTools protocol (a websocket), for dashboard tests.

``open_page`` starts a fresh Chromium with no network features, loads one ``file://`` page, and
returns what the page did: console errors, uncaught exceptions, requests that left the disk, the
value of a JavaScript check, and a PNG screenshot.
"""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


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


def open_page(page: Path, check: str, *, timeout: float = 120.0, settle: float = 0.5) -> PageReport:
    """Load ``page`` in headless Chromium, evaluate ``check`` (JavaScript), take a screenshot."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--window-size=1280,1600", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            port = _devtools_port(Path(profile), proc, timeout)
            return _drive(port, page, check, timeout, settle)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _devtools_port(profile: Path, proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before opening DevTools")
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        time.sleep(0.05)
    raise TimeoutError("chromium did not open its DevTools port")


def _drive(port: int, page: Path, check: str, timeout: float, settle: float) -> PageReport:
    import websocket

    with urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as response:
        targets = json.load(response)
    target = next(t for t in targets if t.get("type") == "page")
    ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=timeout)
    ids = itertools.count(1)
    events: list[dict[str, Any]] = []

    def call(method: str, **params: Any) -> dict[str, Any]:
        ident = next(ids)
        ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            events.append(message)

    def wait_for(event: str) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout}s")
            events.append(json.loads(ws.recv()))

    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            call(f"{domain}.enable")
        call("Page.navigate", url=page.resolve().as_uri())
        wait_for("Page.loadEventFired")
        time.sleep(settle)  # let scripts that run after load (plots) finish
        value = call("Runtime.evaluate", expression=check, returnByValue=True)
        shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    finally:
        ws.close()
    return PageReport(
        errors=tuple(_errors(events)),
        remote_requests=tuple(
            e["params"]["request"]["url"]
            for e in events
            if e.get("method") == "Network.requestWillBeSent"
            and not e["params"]["request"]["url"].startswith(("file:", "data:", "about:"))
        ),
        check=value.get("result", {}).get("value"),
        screenshot=base64.b64decode(shot["data"]),
    )


def _errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            out.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            out.append(f"{params['entry'].get('url', '')}: {params['entry']['text']}")
    return out
