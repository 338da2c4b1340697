"""The web console with LoRA adapters, in a real headless Chromium against a real server.

The playground lists the base model and its adapters (from /v1/models) and
sends the chosen adapter as `model`: its streamed text equals the API's
greedy reply for that adapter, which differs from the base model's. While an
adapter's request runs, the block map marks its blocks with the adapter
(`data-adapter`, the tooltip) and the header counts its running requests, as
/debug/kv says.
"""

from __future__ import annotations

import pytest
from console_tools import start_chromium, wait_for
from selenium.webdriver import ActionChains
from server_fixtures import API_KEY, start_server
from test_console import set_field

from conftest import build_tiny_model
from lora_fixtures import build_adapters

pytestmark = pytest.mark.slow

NUM_BLOCKS = 48


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("console-lora")
    build_tiny_model("llama", root / "base")
    adapters = build_adapters(root / "base", root)
    server = start_server("--model", str(root / "base"), "--served-model-name", "tiny", "--api-key", API_KEY,
                          "--enable-lora", "--lora-modules", f"code={adapters['code']}", f"sql={adapters['sql']}",
                          "--max-loras", "2", "--max-lora-rank", "16", "--num-kv-blocks", str(NUM_BLOCKS),
                          "--block-size", "32")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(server):
    driver = start_chromium()
    driver.get(server.base_url + "/")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    set_field(driver, "api-key", API_KEY)
    driver.find_element("id", "api-key-save").click()
    wait_for(lambda: driver.execute_script("return document.querySelectorAll('#kv-grid .cell').length") == NUM_BLOCKS,
             15, "the block map")
    yield driver
    driver.quit()


def _send(browser, model: str, max_tokens: int) -> None:
    for field, value in (("model", model), ("mode", "completions"), ("prompt", "abc def"), ("temperature", "0"),
                         ("max_tokens", str(max_tokens)), ("ignore_eos", True)):
        set_field(browser, field, value)
    browser.find_element("id", "send").click()


def test_playground_sends_the_chosen_adapter(server, browser):
    options = wait_for(lambda: browser.execute_script(
        "return Array.from(document.querySelectorAll('#model option'), o => [o.value, o.textContent])") or None,
        10, "the model list")
    assert options == [["tiny", "tiny"], ["code", "code (LoRA adapter)"], ["sql", "sql (LoRA adapter)"]]
    _send(browser, "code", 12)
    wait_for(lambda: browser.find_element("id", "output").get_attribute("data-state") == "done", 60, "the reply")
    text = browser.execute_script("return document.getElementById('output').textContent")
    request = browser.execute_script("return pagedinfer.lastRequest")
    assert request["body"]["model"] == "code"
    body = {k: v for k, v in request["body"].items() if k not in ("stream", "stream_options")}
    with server.client() as client:
        tuned = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        base = client.post("/v1/completions", json={**body, "model": "tiny"}).json()["choices"][0]["text"]
    assert text == tuned and tuned != base
    browser.find_element("id", "copy-python").click()
    python = browser.find_element("id", "snippet").get_attribute("textContent")
    assert 'model="code",' in python and python.count("model=") == 1


def test_block_map_names_the_adapter(server, browser):
    _send(browser, "code", 900)
    cell = wait_for(lambda: browser.execute_script(
        "return document.querySelector('#kv-grid .cell[data-adapter=\"code\"]')"), 30, "a block marked with the adapter")
    header = browser.find_element("id", "kv-header").text
    with server.client() as client:
        requests = client.get("/debug/kv").json()["requests"]
    try:
        assert [r["lora_name"] for r in requests] == ["code"]
        assert "code ×1" in header
        ActionChains(browser).move_to_element(cell).perform()
        tooltip = wait_for(lambda: browser.find_element("id", "kv-tooltip").text, 5, "the tooltip")
        assert f"{requests[0]['request_id']} (adapter code)" in tooltip
    finally:
        browser.find_element("id", "stop-button").click()
    wait_for(lambda: browser.find_element("id", "output").get_attribute("data-state") in ("stopped", "done"), 30,
             "the stop")
