"""One HTTP client for every OpenAI-compatible server, like `vllm bench serve`.

Streams `/v1/completions` (with `stream_options.include_usage` and
`ignore_eos`, which vLLM, llama.cpp and pagedinfer all accept) and measures,
per request, TTFT (send -> first token), ITL (gaps between token chunks), TPOT
((E2E - TTFT) / (output tokens - 1)) and E2E. Arrivals are Poisson at
`--request-rate` (inf: all at once), optionally capped by `--max-concurrency`;
a comma list of concurrencies runs one benchmark per level. Example:

    python -m bench.serve --base-url http://127.0.0.1:8000 --max-concurrency 1,16,64 \
        --input-len 256 --output-len 128 --slo ttft:1000,tpot:100 --out bench/out/serve.json \
        --plot-dir bench/out
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
from tqdm import tqdm

from bench.common import (
    Request, Workload, add_workload_args, build_requests, default_model, git_commit, load_tokenizer, machine_info,
    now_utc, plot_cdfs, plot_scaling, prompt_vocab_size, summarize, workload_from_args, write_json,
)


@dataclass(slots=True)
class ClientConfig:
    base_url: str
    model: str
    request_rate: float = math.inf
    prompt_format: str = "text"  # "text" or "ids"
    ignore_eos: bool = True
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    total_timeout_s: float = 900.0  # per level; unfinished requests count as failed
    api_key: str | None = None
    warmup: bool = True
    structured: str = "none"  # "json": every request constrained by STRUCTURED_SCHEMA


# A schema whose one string cannot close before max_tokens (minLength), so
# constrained and free requests generate the same number of tokens (with
# ignore_eos; a finished grammar would end its request).
STRUCTURED_SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4096}},
                     "required": ["story"]}


@dataclass(slots=True)
class RequestResult:
    prompt_len: int
    requested_len: int
    output_len: int = 0
    success: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


def auto_num_prompts(concurrency: int | None) -> int:
    """Four waves at this concurrency: the drain at the end (fewer than `concurrency`
    requests left) is then a small share of the run, which two waves left noisy
    on 2 cores; still under 3 minutes a level there at c=48."""
    return max(8, 4 * concurrency) if concurrency else 64


def parse_slo(text: str | None) -> dict[str, float]:
    """"ttft:500,tpot:50" -> {"ttft": 500.0, "tpot": 50.0} (milliseconds; e2e allowed too)."""
    slo: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition(":")
        if key not in ("ttft", "tpot", "e2e") or not value:
            raise ValueError(f"bad SLO {part!r}: expected ttft:MS, tpot:MS or e2e:MS")
        slo[key] = float(value)
    return slo


async def send_request(client: httpx.AsyncClient, cfg: ClientConfig, req: Request, max_tokens: int) -> RequestResult:
    payload = {
        "model": cfg.model,
        "prompt": req.prompt_text if cfg.prompt_format == "text" else req.prompt_ids,
        "max_tokens": max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": cfg.ignore_eos,
    }
    if cfg.structured == "json":
        payload["structured_outputs"] = {"json": STRUCTURED_SCHEMA}
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    result = RequestResult(len(req.prompt_ids), max_tokens)
    chunks, usage_tokens = 0, None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", cfg.base_url.rstrip("/") + "/v1/completions", json=payload,
                                 headers=headers) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                choices = chunk.get("choices") or []
                # A chunk with empty text is still a token (its bytes are an
                # incomplete UTF-8 character) unless it only carries the finish
                # reason; counting those would add ~0 ms gaps for some servers.
                if not choices or (not choices[0].get("text") and choices[0].get("finish_reason")):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last, chunks = now, chunks + 1
        result.e2e = time.perf_counter() - start
        result.output_len = usage_tokens if usage_tokens is not None else chunks
        result.success = chunks > 0
        if not result.success:
            result.error = "stream ended with no token"
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:  # network, bad JSON, odd chunks
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


async def _run(requests: list[Request], cfg: ClientConfig, max_concurrency: int | None,
               seed: int) -> tuple[list[RequestResult], float, int]:
    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency or len(requests))
    in_flight = peak = 0

    async def one(req: Request) -> RequestResult:
        nonlocal in_flight, peak
        async with limit:
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await send_request(client, cfg, req, req.output_len)
            finally:
                in_flight -= 1
                bar.update()

    # disable=None: a bar on a terminal, nothing in logs and tests.
    bar = tqdm(total=len(requests), desc="requests", disable=None, leave=False)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if cfg.warmup:
            # Rotated by half so it warms the server without seeding the prefix
            # cache; reversed text would tokenize to far more tokens.
            r = requests[0]
            ids, text = r.prompt_ids, r.prompt_text or ""
            half_ids, half_text = len(ids) // 2, len(text) // 2
            warm = Request(ids[half_ids:] + ids[:half_ids], 4, (text[half_text:] + text[:half_text]) or None)
            result = await send_request(client, cfg, warm, 4)
            if not result.success:
                raise RuntimeError(f"warm-up request failed: {result.error}")
        start = time.perf_counter()
        deadline = start + cfg.total_timeout_s
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            if math.isfinite(cfg.request_rate) and time.perf_counter() < deadline:
                await asyncio.sleep(float(rng.exponential(1.0 / cfg.request_rate)))
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        duration = time.perf_counter() - start
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    bar.close()
    results = []
    for req, task in zip(requests, tasks):
        if task in done:
            results.append(task.result())
        else:
            results.append(RequestResult(len(req.prompt_ids), req.output_len, error="benchmark timeout"))
    return results, duration, peak


def compute_metrics(results: list[RequestResult], duration: float, peak: int, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpots = [t for r in ok if (t := r.tpot) is not None]
    metrics = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "peak_concurrency": peak,
        # A server that ignored ignore_eos would look fast; make it visible.
        "short_outputs": sum(r.output_len < r.requested_len for r in ok),
        "ttft_ms": summarize([r.ttft for r in ok]),
        "tpot_ms": summarize(tpots),
        "itl_ms": summarize([x for r in ok for x in r.itl]),
        "e2e_ms": summarize([r.e2e for r in ok]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    if slo:
        def good(r: RequestResult) -> bool:
            values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2e": r.e2e}
            return all(values[k] * 1000.0 <= limit for k, limit in slo.items())

        metrics["slo_ms"] = slo
        metrics["goodput"] = sum(map(good, ok)) / duration
    return metrics


def run_level(cfg: ClientConfig, requests: list[Request], max_concurrency: int | None,
              slo: dict[str, float] | None = None, label: str = "", seed: int = 0) -> dict:
    """One benchmark run; returns its metrics plus raw latencies for the plots."""
    results, duration, peak = asyncio.run(_run(requests, cfg, max_concurrency, seed))
    ok = [r for r in results if r.success]
    return {
        "label": label,
        "max_concurrency": max_concurrency,
        "request_rate": cfg.request_rate,
        "num_prompts": len(requests),
        "metrics": compute_metrics(results, duration, peak, slo or {}),
        "raw": {"ttft_s": [r.ttft for r in ok], "tpot_s": [r.tpot for r in ok if r.tpot is not None],
                "e2e_s": [r.e2e for r in ok]},
    }


def print_run(run: dict) -> None:
    m = run["metrics"]
    print(f"\n== {run['label'] or 'run'}: concurrency {run['max_concurrency'] or 'unbounded'}, "
          f"rate {run['request_rate']} req/s, {run['num_prompts']} prompts ==\n"
          f"completed {m['completed']}, failed {m['failed']}, short outputs {m['short_outputs']}, "
          f"duration {m['duration_s']:.2f} s, peak concurrency {m['peak_concurrency']}\n"
          f"request/s {m['request_throughput']:.2f}, output tok/s {m['output_throughput']:.1f}, "
          f"total tok/s {m['total_token_throughput']:.1f}, goodput {m.get('goodput', float('nan')):.2f} req/s\n"
          f"{'ms':<6}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}")
    for key in ("ttft", "tpot", "itl", "e2e"):
        print(f"{key.upper():<6}" + "".join(f"{v:>10.1f}" for v in m[f"{key}_ms"].values()))
    for error in m["errors"]:
        print(f"error: {error}")


def served_model_name(base_url: str, api_key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30.0)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def level_requests(workload: Workload, index: int, concurrency: int | None, tokenizer,
                   vocab_size: int) -> list[Request]:
    # A new seed per level: the same prompts again would hit the prefix cache.
    n = workload.num_prompts or auto_num_prompts(concurrency)
    return build_requests(replace(workload, num_prompts=n, seed=workload.seed + index), vocab_size, tokenizer,
                          as_text=True)


def parse_levels(text: str) -> list[int | None]:
    return [None if part in ("none", "inf", "0") else int(part) for part in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    parser.add_argument("--tokenizer", default=None, help="Hugging Face folder (default: the prepared SmolLM2)")
    add_workload_args(parser)
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="per level (default: max(8, 4 x concurrency); 64 when unbounded)")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson rate, req/s (inf: all at once)")
    parser.add_argument("--max-concurrency", default="none", help="comma list; 'none' = unbounded")
    parser.add_argument("--prompt-format", choices=["text", "ids"], default="text")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--structured", choices=["none", "json"], default="none",
                        help="json: constrain every request to a JSON schema (grammar cost)")
    parser.add_argument("--slo", default=None, help="goodput SLOs in ms, e.g. ttft:1000,tpot:100")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per level, all requests")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--label", default="", help="name in plots and JSON")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    parser.add_argument("--plot-dir", default=None, help="write latency-CDF and scaling PNGs here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    slo = parse_slo(args.slo)
    model = args.model or served_model_name(args.base_url, args.api_key)
    tokenizer_path = args.tokenizer or default_model()
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = prompt_vocab_size(tokenizer_path, tokenizer)
    cfg = ClientConfig(args.base_url, model, args.request_rate, args.prompt_format, args.ignore_eos,
                       args.temperature, args.request_timeout, args.timeout, args.api_key, args.warmup,
                       args.structured)
    workload = workload_from_args(args, args.num_prompts)
    label = args.label or model
    runs = []
    for index, concurrency in enumerate(parse_levels(args.max_concurrency)):
        requests = level_requests(workload, index, concurrency, tokenizer, vocab_size)
        run = run_level(cfg, requests, concurrency, slo, f"{label} c={concurrency or 'inf'}", seed=args.seed + index)
        print_run(run)
        runs.append(run)
    report = {
        "date": now_utc(), "commit": git_commit(), "machine": machine_info(),
        "command": " ".join(["python -m bench.serve", *sys.argv[1:]]),
        "client": asdict(cfg), "workload": asdict(workload), "runs": runs,
    }
    if args.out:
        write_json(args.out, report)
    if args.plot_dir:
        plot_cdfs(runs, Path(args.plot_dir) / "serve-latency-cdf.png")
        if len(runs) > 1:
            plot_scaling({label: runs}, Path(args.plot_dir) / "serve-scaling.png")
    return 0 if all(r["metrics"]["completed"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
