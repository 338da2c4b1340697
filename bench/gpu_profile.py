"""torch.profiler summary of an engine's decode steps: where a step's time goes.

For one batch of requests, once every request is past its prefill and a few
decode steps have warmed up, `profile_decode` records `num_steps` steps
(each inside a `decode_step` range) and reports per step:
- `step_ms`: wall time of `engine.step()` under the profiler (which adds a
  few microseconds per recorded op, so it reads above the unprofiled step);
- `host_ms`: that time minus the time the host sat in CUDA calls that wait
  for the GPU (`cuda*Synchronize`, and `cudaMemcpy*`, which for a copy to
  pageable host memory waits for the kernels queued before it), i.e. what
  the CPU itself spent scheduling, launching and sampling;
- `gpu_busy`: the fraction of the steps' wall-clock window in which some
  kernel or copy ran on the GPU (the union of device intervals);
- `launches_per_step`: host launch calls (`cudaLaunchKernel`,
  `cuLaunchKernel(Ex)`, `cudaGraphLaunch`; one graph launch replays a whole
  captured forward), with the count of each kind in `launches`.
On the CPU (the dry run) there are no device or launch events: `gpu_busy` is
None and the launch counts are 0.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

STEP_RANGE = "decode_step"
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
_WARM_STEPS = 2


@dataclass(slots=True)
class DecodeProfile:
    batch: int
    steps: int
    step_ms: float
    host_ms: float
    gpu_busy: float | None
    launches_per_step: float
    launches: dict[str, float]


def _union_us(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of [a, b) intervals, clipped to [start, end)."""
    total, covered_to = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, covered_to), min(b, end)
        if b > a:
            total += b - a
            covered_to = b
    return total


def summarize(events: list, batch: int, num_steps: int) -> DecodeProfile:
    """Per-step numbers from the profiler's events of `num_steps` `decode_step` ranges."""
    steps = [e for e in events if e.name == STEP_RANGE and e.device_type == DeviceType.CPU]
    assert len(steps) == num_steps, f"expected {num_steps} {STEP_RANGE} ranges, got {len(steps)}"
    start = min(e.time_range.start for e in steps)
    end = max(e.time_range.end for e in steps)
    device = [(e.time_range.start, e.time_range.end) for e in events
              if e.device_type == DeviceType.CUDA and e.name != STEP_RANGE
              and not getattr(e, "is_user_annotation", False)]
    step_us = sum(e.time_range.elapsed_us() for e in steps)
    # Host calls inside the steps only: the trace also holds the closing synchronize.
    host = [e for e in events if e.device_type == DeviceType.CPU and start <= e.time_range.start < end]
    wait_us = sum(e.time_range.elapsed_us() for e in host
                  if e.name.startswith("cuda") and ("Synchronize" in e.name or e.name.startswith("cudaMemcpy")))
    launches = Counter(e.name for e in host if e.name in LAUNCH_EVENTS)
    return DecodeProfile(
        batch=batch, steps=num_steps, step_ms=step_us / num_steps / 1e3,
        host_ms=(step_us - wait_us) / num_steps / 1e3,
        gpu_busy=_union_us(device, start, end) / (end - start) if device else None,
        launches_per_step=sum(launches.values()) / num_steps,
        launches={name: count / num_steps for name, count in sorted(launches.items())},
    )


def profile_decode(engine, prompts: list[list[int]], num_steps: int, tag: str) -> dict:
    """Profile `num_steps` pure decode steps of `prompts` on `engine`; the requests are aborted after."""
    from inference import SamplingParams

    max_tokens = _WARM_STEPS + num_steps + 4  # no request finishes inside the profiled window
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    while len(started) < len(ids):  # prefill (maybe chunked) until every request has a token
        started.update(out.request_id for out in engine.step())
    for _ in range(_WARM_STEPS):
        engine.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(num_steps):
            with record_function(STEP_RANGE):
                engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # every kernel of the window ends before the trace does
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return asdict(summarize(prof.events(), len(prompts), num_steps))


def profile_table(models: list[dict]) -> list[str]:
    """Markdown lines for the profiles in `gpu_bench` results (none when nothing was profiled)."""
    rows = [(r["model"], prof) for r in models for prof in r.get("profile", [])]
    if not rows:
        return []
    lines = ["", "Decode step profile (torch.profiler; step and host ms include its overhead):", "",
             "| model | graphs | batch | step ms | host ms | GPU busy | launches / step |",
             "|---|---|---:|---:|---:|---:|---|"]
    for model, p in rows:
        busy = "–" if p["gpu_busy"] is None else f"{p['gpu_busy']:.1%}"
        kinds = ", ".join(f"{name} {count:g}" for name, count in p["launches"].items())
        lines.append(f"| {model} | {p['graphs']} | {p['batch']} | {p['step_ms']:.2f} | {p['host_ms']:.2f} | {busy} | "
                     f"{p['launches_per_step']:g}{f' ({kinds})' if kinds else ''} |")
    return lines
