"""Shared pieces of the benchmark scripts: workloads, statistics, machine facts
and plots.

Workloads are token ids first: lengths are what a throughput number depends
on, so we draw lengths, then random ids, and only decode to text when a
server needs a string (re-encoding and trimming so the server sees about the
intended length).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("random", "sharegpt")


@dataclass(slots=True)
class Request:
    prompt_ids: list[int]
    output_len: int
    prompt_text: str | None = None  # set when the prompt goes to a server as text


@dataclass(slots=True)
class Workload:
    dataset: str = "random"
    num_prompts: int = 64
    input_len: int = 256
    output_len: int = 128
    range_ratio: float = 0.0
    shared_prefix_len: int = 0
    seed: int = 0
    output_range_ratio: float | None = None  # None: same as range_ratio
    # sharegpt only: the clamps of the lognormal lengths
    max_input_len: int = 1024
    min_output_len: int = 4
    max_output_len: int = 1024


def default_model() -> str:
    from inference.prepare import default_model_dir

    return str(default_model_dir())


def uniform_lengths(n: int, mean: int, range_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Lengths uniform in [mean*(1-r), mean*(1+r)], the `vllm bench` random dataset rule."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def sharegpt_like_lengths(
    n: int, rng: np.random.Generator, max_input: int = 1024, max_output: int = 1024, min_output: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Input/output lengths shaped like ShareGPT conversations, made locally.

    Lognormal fits of the ShareGPT V3 set as vLLM filters it: prompts have a
    median near 110 tokens with a long tail (mean ~230), replies a median near
    150 (mean ~250). Good enough to exercise mixed lengths; not the real data.
    """
    inputs = rng.lognormal(mean=np.log(110), sigma=1.2, size=n)
    outputs = rng.lognormal(mean=np.log(150), sigma=1.0, size=n)
    return np.clip(inputs, 4, max_input).astype(int), np.clip(outputs, min_output, max_output).astype(int)


def _random_ids(n: int, low: int, vocab_size: int, rng: np.random.Generator) -> list[int]:
    return rng.integers(low, vocab_size, size=n).tolist()


def build_requests(workload: Workload, vocab_size: int, tokenizer=None, as_text: bool = False) -> list[Request]:
    """Seeded prompts for `workload`; with `as_text`, also a decoded string per prompt.

    Ids start above the special tokens (the first few hundred ids of every
    tokenizer we use are specials or bytes), so a prompt never holds an EOS.
    """
    rng = np.random.default_rng(workload.seed)
    n = workload.num_prompts
    if workload.dataset == "random":
        input_lens = uniform_lengths(n, workload.input_len, workload.range_ratio, rng)
        out_ratio = workload.range_ratio if workload.output_range_ratio is None else workload.output_range_ratio
        output_lens = uniform_lengths(n, workload.output_len, out_ratio, rng)
    elif workload.dataset == "sharegpt":
        input_lens, output_lens = sharegpt_like_lengths(
            n, rng, workload.max_input_len, workload.max_output_len, workload.min_output_len
        )
    else:
        raise ValueError(f"dataset must be one of {DATASETS}, got {workload.dataset!r}")
    low = min(1000, vocab_size // 4)
    prefix = _random_ids(workload.shared_prefix_len, low, vocab_size, rng)
    requests = []
    for input_len, output_len in zip(input_lens.tolist(), output_lens.tolist()):
        ids = prefix + _random_ids(max(1, input_len - len(prefix)), low, vocab_size, rng)
        if not as_text:
            requests.append(Request(ids, output_len))
            continue
        # Decoding random ids and encoding the text again merges or splits some
        # tokens; trim and redo once so the server sees about input_len tokens.
        # Decoding prefix and suffix together keeps the shared text identical.
        ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)[:input_len]
        text = tokenizer.decode(ids)
        requests.append(Request(tokenizer.encode(text, add_special_tokens=False), output_len, text))
    return requests


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def prompt_vocab_size(model: str, tokenizer=None) -> int:
    """Ids a random prompt may use: the embedding rows the tokenizer can also decode.

    Configs often pad the embedding past the tokenizer (Qwen: 151936 rows,
    ~151665 tokens); ids in the padding would break detokenization.
    """
    tokenizer = tokenizer or load_tokenizer(model)
    config = json.loads((Path(model) / "config.json").read_text())
    return min(int(config["vocab_size"]), tokenizer.vocab_size)


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="random",
                        help="random: uniform lengths; sharegpt: lognormal lengths shaped like ShareGPT")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="random lengths uniform in [len*(1-r), len*(1+r)]")
    parser.add_argument("--output-range-ratio", type=float, default=None,
                        help="the same for output lengths only (default: --range-ratio)")
    parser.add_argument("--shared-prefix-len", type=int, default=0,
                        help="every prompt starts with the same N random tokens")
    parser.add_argument("--max-input-len", type=int, default=1024, help="sharegpt: longest prompt")
    parser.add_argument("--min-output-len", type=int, default=4, help="sharegpt: shortest output")
    parser.add_argument("--max-output-len", type=int, default=1024, help="sharegpt: longest output")
    parser.add_argument("--seed", type=int, default=0)


def workload_from_args(args: argparse.Namespace, num_prompts: int | None = None) -> Workload:
    return Workload(
        dataset=args.dataset, num_prompts=num_prompts or args.num_prompts or 0, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio, shared_prefix_len=args.shared_prefix_len,
        seed=args.seed, output_range_ratio=args.output_range_ratio, max_input_len=args.max_input_len,
        min_output_len=args.min_output_len, max_output_len=args.max_output_len,
    )


def summarize(values_s: list[float]) -> dict[str, float]:
    """mean/median/p90/p99 in milliseconds; zeros for an empty list."""
    if not values_s:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    ms = np.asarray(values_s) * 1000.0
    return {
        "mean": float(ms.mean()),
        "median": float(np.median(ms)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
    }


# The vector features that decide which CPU kernels run (and how fast), as /proc/cpuinfo's flags name them.
CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}


def cpu_features() -> list[str]:
    """This CPU's vector features among CPU_FEATURES: results from CPUs that differ here never compare."""
    from kernels.cpu_ops import cpu_info

    flags = cpu_info("flags").split()
    return [name for flag, name in CPU_FEATURES.items() if flag in flags]


def cpu_line(machine: dict[str, Any]) -> str:
    """`model (features), N cores`, for every table a CPU result appears in."""
    features = ", ".join(machine.get("cpu_features") or ["no AVX2"])
    return f"{machine['cpu']} ({features}), {machine['cores']} cores"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_features": cpu_features(), "cores": os.cpu_count(),
                            "python": platform.python_version()}
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * page_size / 1024**3, 1)
    except (ValueError, OSError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _subplots(ncols: int, width: float):
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, 4))


def _save(fig, legend_ax, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    legend_ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdfs(runs: list[dict], path: str | Path) -> None:
    fig, axes = _subplots(3, 15)
    for ax, key, title in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT", "TPOT", "E2E latency")):
        for run in runs:
            values = np.sort(np.asarray(run["raw"][key]) * 1000.0)
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", label=run["label"])
        ax.set(xlabel=f"{title} (ms)", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
    _save(fig, axes[0], path)


def plot_scaling(series: dict[str, list[dict]], path: str | Path) -> None:
    """Output tok/s and median TPOT against concurrency, one line per server."""
    fig, (left, right) = _subplots(2, 11)
    for name, runs in series.items():
        runs = [r for r in runs if r["max_concurrency"]]
        xs = [r["max_concurrency"] for r in runs]
        left.plot(xs, [r["metrics"]["output_throughput"] for r in runs], marker="o", label=name)
        if all("tpot_ms" in r["metrics"] for r in runs):  # offline baselines have no per-token latency
            right.plot(xs, [r["metrics"]["tpot_ms"]["median"] for r in runs], marker="o", label=name)
    levels = sorted({r["max_concurrency"] for runs in series.values() for r in runs if r["max_concurrency"]})
    for ax, ylabel in ((left, "output tok/s"), (right, "median TPOT (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.minorticks_off()
        ax.set(xlabel="max concurrency", ylabel=ylabel)
        ax.grid(alpha=0.3)
    _save(fig, left, path)
