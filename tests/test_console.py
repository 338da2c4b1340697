"""The web console in a real headless Chromium against one real server.

The page is checked against the server's own answers: the playground's
streamed text against a non-streamed API call, the block map's cells against
/debug/kv, and every snapshot under load against the block manager's
invariants. Screenshots land in bench/out/console/.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from console_tools import snapshot_problems, start_chromium, wait_for
from PIL import Image
from selenium.webdriver import ActionChains
from server_fixtures import API_KEY, REPO, STRUCTURED_SERVER_ARGS, shared_server

pytestmark = pytest.mark.slow

# The structured-output tests' server, shared with them: one SmolLM2 start for both.
NUM_BLOCKS = int(STRUCTURED_SERVER_ARGS[STRUCTURED_SERVER_ARGS.index("--num-kv-blocks") + 1])
BLOCK_SIZE = 16
ARTIFACTS = REPO / "bench" / "out" / "console"
IN_USE = ("used", "shared")


@pytest.fixture(scope="module")
def server():
    return shared_server(*STRUCTURED_SERVER_ARGS)


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


def open_console(driver, server, key: str | None = API_KEY) -> None:
    driver.get(server.base_url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    if key is not None:
        set_field(driver, "api-key", key)
        driver.find_element("id", "api-key-save").click()
        wait_for(lambda: len(cells(driver)) == NUM_BLOCKS, 15, "the block map")


def set_field(driver, element_id: str, value) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]);"
        "if (e.type === 'checkbox') e.checked = arguments[1]; else e.value = arguments[1];"
        "e.dispatchEvent(new Event('change'));", element_id, value)


def cells(driver) -> dict[int, str]:
    """Block id -> state of every cell the page shows."""
    pairs = driver.execute_script(
        "return Array.from(document.querySelectorAll('#kv-grid .cell'), c => [c.dataset.blockId, c.dataset.state]);")
    return {int(block_id): state for block_id, state in pairs}


def num_in_use(driver) -> int:
    return sum(1 for state in cells(driver).values() if state in IN_USE)


def kv(server) -> dict:
    response = httpx.get(server.base_url + "/debug/kv", headers=server.headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def token_prompt(seed: int, length: int) -> list[int]:
    return random.Random(seed).choices(range(1000, 40000), k=length)


@contextmanager
def streaming(server, prompt: str | list[int], max_tokens: int) -> Iterator[threading.Event]:
    """A streamed completion in a thread; the event is set at its first token,
    and leaving the block closes the stream (the server then aborts it)."""
    first_token, leave = threading.Event(), threading.Event()
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}

    def run() -> None:
        with server.client() as client, client.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    first_token.set()
                if leave.is_set():
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield first_token
    finally:
        leave.set()
        thread.join(timeout=60)


def test_chat_streams_the_api_greedy_output(server, browser):
    open_console(browser, server)
    for field, value in (("mode", "chat"), ("system", "You answer in one short sentence."),
                         ("prompt", "Name three colors."), ("temperature", "0"), ("max_tokens", "24"),
                         ("seed", "7")):
        set_field(browser, field, value)
    browser.find_element("id", "send").click()
    wait_for(lambda: browser.find_element("id", "output").get_attribute("data-state") == "done", 60, "the reply")
    text = browser.execute_script("return document.getElementById('output').textContent")
    request = browser.execute_script("return pagedinfer.lastRequest")
    assert request["path"] == "/v1/chat/completions" and request["body"]["stream"] is True
    body = {k: v for k, v in request["body"].items() if k not in ("stream", "stream_options")}
    with server.client() as client:
        reply = client.post("/v1/chat/completions", json=body).json()
    assert text and text == reply["choices"][0]["message"]["content"]
    stats = browser.find_element("id", "reply-stats").text
    assert "TTFT" in stats and "tok/s" in stats
    assert f"completion {reply['usage']['completion_tokens']} tokens" in stats
    assert f"finish: {reply['choices'][0]['finish_reason']}" in stats

    browser.find_element("id", "copy-curl").click()
    curl = browser.find_element("id", "snippet").get_attribute("textContent")
    assert f"{server.base_url}/v1/chat/completions" in curl
    assert json.loads(curl[curl.index("-d '") + 4: curl.rindex("'")]) == request["body"]
    browser.find_element("id", "copy-python").click()
    python = browser.find_element("id", "snippet").get_attribute("textContent")
    compile(python, "snippet", "exec")
    assert "client.chat.completions.create(" in python and "temperature=0," in python


def test_block_map_matches_debug_kv(server, browser):
    open_console(browser, server)
    with streaming(server, "The zebrafish swims in the river and", max_tokens=400) as first_token:
        first_token.wait(60)
        # The map and /debug/kv are different instants: compare when the
        # page shows the same count before and after the fetch.
        for _ in range(100):
            before, snapshot, after = num_in_use(browser), kv(server), num_in_use(browser)
            if before == after == snapshot["num_used_blocks"] > 0:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"page showed {before}/{after} blocks in use, /debug/kv {snapshot['num_used_blocks']}")
        stats = snapshot["stats"]
        assert snapshot["num_used_blocks"] == stats["num_total_blocks"] - stats["num_free_blocks"]
        assert snapshot_problems(snapshot) == []
        assert "zebrafish" not in json.dumps(snapshot)  # ids only, never prompt text
    wait_for(lambda: num_in_use(browser) == 0, 10, "the blocks to be freed")
    assert set(cells(browser).values()) <= {"free", "cached"}
    assert kv(server)["num_used_blocks"] == 0


def test_shared_prefix_shows_shared_then_cached(server, browser):
    open_console(browser, server)
    prefix = token_prompt(1, 256)
    with streaming(server, prefix + token_prompt(2, 8), max_tokens=200) as first:
        first.wait(60)  # the prefix is computed and cached: the second request hits it
        with streaming(server, prefix + token_prompt(3, 8), max_tokens=200) as second:
            second.wait(60)
            shared = wait_for(lambda: [i for i, s in cells(browser).items() if s == "shared"], 15, "shared cells")
            assert len(shared) >= len(prefix) // BLOCK_SIZE
            cell = browser.find_element("css selector", f'#kv-grid .cell[data-block-id="{shared[0]}"]')
            ActionChains(browser).move_to_element(cell).perform()
            tooltip = wait_for(lambda: browser.find_element("id", "kv-tooltip").text, 5, "the tooltip")
            assert f"block {shared[0]}\nref count 2\nowners " in tooltip and ", " in tooltip  # two owner ids
            assert f"slots filled {BLOCK_SIZE}/{BLOCK_SIZE}" in tooltip and "prefix hash none" not in tooltip
    wait_for(lambda: num_in_use(browser) == 0, 10, "the blocks to be freed")
    page = cells(browser)
    assert all(page[i] == "cached" for i in shared), {i: page[i] for i in shared}


def test_stop_button_frees_the_blocks(server, browser):
    open_console(browser, server)
    for field, value in (("mode", "completions"), ("prompt", "Once upon a time"), ("temperature", "0"),
                         ("max_tokens", "600"), ("ignore_eos", True)):
        set_field(browser, field, value)
    browser.find_element("id", "send").click()
    wait_for(lambda: browser.find_element("id", "output").text, 60, "streamed text")
    assert kv(server)["num_used_blocks"] > 0
    browser.find_element("id", "stop-button").click()
    stopped = time.monotonic()
    wait_for(lambda: kv(server)["num_used_blocks"] == 0, 2.0, "the blocks to be freed within 2 s", interval=0.02)
    print(f"blocks freed {time.monotonic() - stopped:.3f} s after Stop")
    assert browser.find_element("id", "output").get_attribute("data-state") == "stopped"


def test_api_key_required(server, browser):
    for path in ("/debug/kv", "/debug/kv/stream", "/debug/stats"):
        response = httpx.get(server.base_url + path, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.get(server.base_url + "/", timeout=10).status_code == 200

    open_console(browser, server, key=None)
    status = browser.find_element("id", "status")
    wait_for(lambda: status.get_attribute("data-state") == "error", 10, "the error state")
    assert "API key" in status.text
    assert cells(browser) == {} and browser.find_element("id", "kv-header").text == ""

    open_console(browser, server)  # types the key into the form
    status = browser.find_element("id", "status")
    wait_for(lambda: status.get_attribute("data-state") == "ok", 10, "the live state")
    assert browser.execute_script("return sessionStorage.getItem('pagedinfer-api-key')") == API_KEY
    assert browser.execute_script("return localStorage.length") == 0


async def _load(server, num_streams: int, done: threading.Event) -> list[dict]:
    """`num_streams` concurrent streams; returns every /debug/kv/stream
    snapshot seen meanwhile."""
    snapshots: list[dict] = []

    async def watch(client: httpx.AsyncClient) -> None:
        async with client.stream("GET", "/debug/kv/stream") as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    snapshots.append(json.loads(line[6:]))
                if done.is_set():
                    return

    async def one(client: httpx.AsyncClient, index: int) -> None:
        # Mixed lengths, so requests end at different times and leave holes.
        body = {"prompt": token_prompt(100 + index, 8 + 5 * (index % 16)), "max_tokens": 12, "ignore_eos": True,
                "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for _ in response.aiter_lines():
                pass

    async with server.async_client() as client:
        watcher = asyncio.create_task(watch(client))
        await asyncio.gather(*(one(client, i) for i in range(num_streams)))
        done.set()
        await watcher
    return snapshots


def test_snapshots_consistent_under_load_and_screenshot(server, browser):
    open_console(browser, server)
    browser.find_element("id", "send").click()  # the playground streams too
    done, result = threading.Event(), {}
    load = threading.Thread(target=lambda: result.update(snapshots=asyncio.run(_load(server, 64, done))))
    load.start()
    wait_for(lambda: num_in_use(browser) >= 40 or done.is_set(), 120, "the load to fill the map")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "console_under_load.png"
    browser.save_screenshot(str(screenshot))
    load.join(timeout=300)
    snapshots = result["snapshots"]
    assert len(snapshots) >= 4
    assert max(s["num_used_blocks"] for s in snapshots) > 0
    for snapshot in snapshots:
        assert snapshot_problems(snapshot) == []
    gaps = [b["time"] - a["time"] for a, b in zip(snapshots, snapshots[1:])]
    assert min(gaps) > 0.2  # at most 4 updates a second

    image = Image.open(screenshot).convert("RGB")
    assert image.size[0] > 1000 and len(image.getcolors(maxcolors=1 << 20)) > 50, "blank screenshot"
    points = httpx.get(server.base_url + "/debug/stats", headers=server.headers, timeout=10).json()["points"]
    assert any(p["output_tokens_per_s"] > 0 for p in points) and any(p["ttft_s"] for p in points)
    wait_for(lambda: kv(server)["num_used_blocks"] == 0, 60, "every block to be freed")
    browser.save_screenshot(str(ARTIFACTS / "console_after_load.png"))
    assert Path(screenshot).stat().st_size > 10_000
