"""What the console tests share: the KV snapshot's invariants, and headless
Chromium (Debian's `chromium`, driven by selenium through `chromium-driver`).

Browser downloads (selenium-manager, playwright) are impossible here, so
both binaries come from apt; `make browser` (a step of `make test`)
installs them when missing. Without them the console tests fail, saying so:
they are meant to run in CI, never to be skipped.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM_BINARIES = ("chromium", "chromedriver")
WINDOW_SIZE = (1440, 900)
T = TypeVar("T")


def snapshot_problems(snapshot: dict[str, Any]) -> list[str]:
    """How a /debug/kv snapshot breaks the block manager's invariants (none: [])."""
    ref_cnts, stats = snapshot["ref_cnts"], snapshot["stats"]
    holders = Counter(block_id for request in snapshot["requests"] for block_id in request["block_table"])
    problems = [f"block {i}: ref_cnt {count}, in {holders.get(i, 0)} block tables"
                for i, count in enumerate(ref_cnts) if count != holders.get(i, 0)]
    num_free = sum(1 for count in ref_cnts if count == 0)
    num_used = len(ref_cnts) - num_free
    if num_free != stats["num_free_blocks"]:
        problems.append(f"{num_free} blocks with ref_cnt 0, stats say {stats['num_free_blocks']} free")
    if num_used != snapshot["num_used_blocks"] or num_free + num_used != stats["num_total_blocks"]:
        problems.append(f"free {num_free} + used {snapshot['num_used_blocks']} != total {stats['num_total_blocks']}")
    return problems


def start_chromium() -> webdriver.Chrome:
    paths = {name: shutil.which(name) for name in CHROMIUM_BINARIES}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run `make browser` as root "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = paths["chromium"]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=Service(executable_path=paths["chromedriver"]))


def save_screenshot(browser: webdriver.Chrome, path: Path) -> None:
    """The browser's window as a PNG at `path` (folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(path))
    print(f"saved {path} ({path.stat().st_size / 1024:.0f} KiB)")


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
