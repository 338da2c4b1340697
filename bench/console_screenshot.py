"""The README's console screenshot: headless Chromium on a server under load.

    python -m bench.console_screenshot [--out server/static/console.png]

Starts `pagedinfer serve` (the prepared SmolLM2, prefix caching on), opens
the console, streams a chat reply in the playground while 48 requests with
mixed prompt lengths (a third of them sharing a 128-token prefix) run, and
saves the page once the block map is busy. Needs Debian's chromium and
chromedriver (`make browser`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the console tests' browser and server helpers

from console_tools import save_screenshot, start_chromium, wait_for  # noqa: E402
from server_fixtures import start_server  # noqa: E402

SERVER_ARGS = ("--max-model-len", "1024", "--num-kv-blocks", "384", "--max-num-seqs", "48")
NUM_REQUESTS = 48


async def _load(server) -> None:
    shared = random.Random(0).choices(range(1000, 40000), k=128)

    async def one(client, index: int) -> None:
        own = random.Random(index).choices(range(1000, 40000), k=16 + 13 * (index % 12))
        prompt = shared + own if index % 3 == 0 else own
        body = {"prompt": prompt, "max_tokens": 48 + 8 * (index % 5), "ignore_eos": True}
        try:
            await client.post("/v1/completions", json=body)
        except httpx.HTTPError:
            pass  # the server stops once the screenshot is taken

    async with server.async_client() as client:
        await asyncio.gather(*(one(client, i) for i in range(NUM_REQUESTS)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "server" / "static" / "console.png")
    args = parser.parse_args()
    server = start_server(*SERVER_ARGS)
    browser = start_chromium()
    try:
        browser.set_window_size(1440, 900)
        browser.get(server.base_url + "/")
        wait_for(lambda: browser.find_elements("css selector", "#kv-grid .cell"), 15, "the block map")
        time.sleep(3)  # a few seconds of idle history for the charts
        browser.execute_script("document.getElementById('max_tokens').value = 64")
        browser.find_element("id", "send").click()
        load = threading.Thread(target=asyncio.run, args=(_load(server),), daemon=True)
        load.start()
        in_use = "return document.querySelectorAll('#kv-grid .cell[data-state=used], #kv-grid .cell[data-state=shared]').length"
        wait_for(lambda: browser.execute_script(in_use) >= 150, 300, "a busy block map", interval=0.2)
        time.sleep(2)  # let the charts take the load in
        save_screenshot(browser, args.out)
    finally:
        browser.quit()
        server.stop()


if __name__ == "__main__":
    main()
