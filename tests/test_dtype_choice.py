"""`dtype="auto"`: bfloat16 on CPUs with native bf16 (AVX512-BF16 or AMX) and on
GPUs, float32 on other CPUs; `serve` and `generate` say which and why."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from server_fixtures import start_server

from inference.config import EngineConfig, auto_dtype


@pytest.mark.parametrize("amx,avx512_bf16,expected", [
    (True, True, ("bfloat16", "AMX")),
    (False, True, ("bfloat16", "AVX512-BF16")),
    (False, False, ("float32", "no native bf16")),
])
def test_auto_follows_the_cpu_bf16_instructions(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    dtype, reason = auto_dtype("cpu")
    assert dtype == expected[0] and expected[1] in reason
    assert auto_dtype("cuda")[0] == "bfloat16"


def test_this_machine_gets_what_its_flags_say(tiny_llama_dir):
    config = EngineConfig.create(model=str(tiny_llama_dir), device="cpu", num_kv_blocks=8)
    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    native = " amx_bf16" in flags or " avx512_bf16" in flags
    assert config.dtype == ("bfloat16" if native else "float32")
    assert config.dtype_reason.startswith("auto")
    pinned = EngineConfig.create(model=str(tiny_llama_dir), dtype="float32", device="cpu", num_kv_blocks=8)
    assert pinned.describe_dtype() == "dtype float32 on cpu: asked for"


def test_serve_logs_the_choice_and_answers_at_once_when_ready(tiny_llama_dir):
    dtype, reason = auto_dtype("cpu")
    server = start_server("--model", str(tiny_llama_dir), "--dtype", "auto", "--num-kv-blocks", "16")
    try:
        log = server.log_tail(100_000)
        assert f"dtype {dtype} on cpu: {reason}" in log
        assert "CPU ops: C++" in log
        # Everything is built and warmed before /ready: the first request is quick.
        start = time.monotonic()
        with server.client() as client:
            reply = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert reply.status_code == 200 and time.monotonic() - start < 10
    finally:
        server.stop()


def test_generate_prints_the_choice(tiny_llama_dir):
    expected = auto_dtype("cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "hello", "--model", str(tiny_llama_dir), "--max-tokens", "2",
         "--num-kv-blocks", "8"], capture_output=True, text=True, timeout=300, check=True,
    )
    assert f"dtype {expected[0]} on cpu: {expected[1]}" in proc.stderr
