"""A long soak of `pagedinfer serve`: does memory stay flat over 50,000 requests?

Mixed requests at concurrency 32: temperatures 0-1.2, prompts of 3-200
words, /v1/completions and /v1/chat/completions, streamed and not, and 30%
of the streams cut (the client disconnects) after their first chunk. The
run is cut into rounds (default 2,000 requests); after each round drains it
records the front end's and the engine core's RSS (the core is the server's
spawned child, read from /proc), and /metrics' running requests and KV usage,
both under load (the highest seen, polled once a second) and idle (which
must be 0: a request or block left behind is a leak too). It reports the
core's RSS growth over the last 80% of the requests, after warm-up.

The default model is tiny-qwen3 with random weights (bench/gpu_models.py)
and max_tokens 1-16: a forward pass then costs about a millisecond, so on 2
CPU cores 50,000 requests finish in minutes, and what the soak exercises is
what every request goes through whatever the model: HTTP, tokenization,
output processing, the transport, the scheduler, the block manager and the
sampler's per-request state. That is where leaks live; the model's weights
and KV cache are allocated once at start-up.

    nice -n 10 python -m bench.soak --out bench/out/soak.json              # 50,000 requests
    python -m bench.soak --requests 2000 --round 500 --time-limit-s 300     # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import git_commit, load_tokenizer, machine_info, now_utc, write_json
from bench.overhead import prepare_model
from bench.peers.servers import ServerProcess, display, free_port

# The random-weight models' tokenizers have no chat template; this one joins
# the messages' words, which is all the soak needs from it.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
WARM_UP_SHARE = 0.2  # growth is measured over the requests after this share
METRICS_POLL_S = 1.0
IDLE_WAIT_S = 10.0  # how long an idle engine may take to show 0 running after a round


@dataclass(slots=True)
class RoundResult:
    requests: int  # sent so far, this round included
    wall_s: float
    requests_per_s: float
    errors: int
    cut_streams: int
    frontend_rss_mb: float
    core_rss_mb: float
    max_running: float
    max_kv_usage: float
    idle_running: float
    idle_kv_usage: float


@dataclass(slots=True)
class Tally:
    errors: int = 0
    cut_streams: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(text[:200])


def prompt_words(tokenizer) -> list[str]:
    """The tokenizer's tokens that decode to a plain word: a prompt of N of
    them is about N tokens (exactly N with the random models' word-level tokenizer)."""
    words = (tokenizer.decode([token_id]).strip() for token_id in range(tokenizer.vocab_size))
    return list(dict.fromkeys(word for word in words if word.isalnum()))


def request_spec(seed: int, index: int, words: list[str], max_tokens: int) -> tuple[str, dict, bool]:
    """(path, body, cut after the first chunk) of request `index`, the same on every run."""
    rng = random.Random(seed * 1_000_003 + index)
    prompt = " ".join(rng.choice(words) for _ in range(rng.randint(3, 200)))
    stream = rng.random() < 0.5
    body: dict = {"max_tokens": rng.randint(1, max_tokens), "temperature": round(rng.uniform(0.0, 1.2), 2),
                  "stream": stream}
    if rng.random() < 0.5:
        path, body["prompt"] = "/v1/completions", prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return path, body, stream and rng.random() < 0.3


async def send(client: httpx.AsyncClient, path: str, body: dict, cut: bool, tally: Tally) -> None:
    try:
        if not body["stream"]:
            response = await client.post(path, json=body)
            if response.status_code != 200 or not response.json().get("choices"):
                tally.error(f"HTTP {response.status_code}: {response.text}")
            return
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                tally.error(f"HTTP {response.status_code}: {(await response.aread())!r}")
                return
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if cut:  # leaving the block unread closes the connection: the server sees a disconnect
                    tally.cut_streams += 1
                    return
                if line == "data: [DONE]":
                    done = True
                elif "error" in json.loads(line[6:]):
                    tally.error(line)
            if not done:
                tally.error("stream ended without [DONE]")
    except (httpx.HTTPError, ValueError) as exc:
        tally.error(f"{type(exc).__name__}: {exc}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def core_pid(server_pid: int) -> int:
    """The engine core: the server's child started by multiprocessing's spawn
    (not its resource tracker)."""
    children = [int(pid) for task in Path(f"/proc/{server_pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    [core] = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return core


async def engine_gauges(client: httpx.AsyncClient) -> tuple[float, float]:
    """(running requests, KV usage 0-1) from /metrics."""
    text = (await client.get("/metrics")).text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    return samples["pagedinfer_num_requests_running"], samples["pagedinfer_kv_cache_usage_ratio"]


async def run_round(client: httpx.AsyncClient, indices: range, args: argparse.Namespace, words: list[str],
                    deadline: float) -> tuple[Tally, int, float, float]:
    """Send `indices` at the concurrency; returns the tally, how many were
    sent (fewer past the deadline) and the highest running / KV usage seen."""
    tally, pending, peaks = Tally(), iter(indices), [0.0, 0.0]
    sent = 0

    async def worker() -> None:
        nonlocal sent
        for index in pending:  # a shared iterator: each index goes to one worker
            if time.monotonic() > deadline:
                return
            sent += 1
            await send(client, *request_spec(args.seed, index, words, args.max_tokens), tally)

    async def poll() -> None:
        while True:
            running, kv_usage = await engine_gauges(client)
            peaks[:] = max(peaks[0], running), max(peaks[1], kv_usage)
            await asyncio.sleep(METRICS_POLL_S)

    poller = asyncio.create_task(poll())
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    poller.cancel()
    return tally, sent, peaks[0], peaks[1]


async def wait_idle(client: httpx.AsyncClient) -> tuple[float, float]:
    """The gauges once the engine is idle (cut streams abort asynchronously),
    or as they are after IDLE_WAIT_S."""
    deadline = time.monotonic() + IDLE_WAIT_S
    running, kv_usage = await engine_gauges(client)
    while (running or kv_usage) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        running, kv_usage = await engine_gauges(client)
    return running, kv_usage


async def soak(base_url: str, server_pid: int, args: argparse.Namespace,
               words: list[str]) -> tuple[list[RoundResult], float]:
    """The rounds, and the wall time they took."""
    core = core_pid(server_pid)
    start = time.monotonic()
    deadline = start + args.time_limit_s
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    rounds: list[RoundResult] = []
    total = 0
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=120) as client:
        while total < args.requests and time.monotonic() < deadline:
            round_start = time.monotonic()
            tally, sent, max_running, max_kv = await run_round(
                client, range(total, min(total + args.round, args.requests)), args, words, deadline)
            total += sent
            wall = time.monotonic() - round_start
            idle_running, idle_kv = await wait_idle(client)
            rounds.append(RoundResult(total, wall, sent / wall, tally.errors, tally.cut_streams, rss_mb(server_pid),
                                      rss_mb(core), max_running, max_kv, idle_running, idle_kv))
            print(format_row(rounds[-1]), flush=True)
            for sample in tally.error_samples:
                print(f"  error: {sample}", flush=True)
    return rounds, time.monotonic() - start


def growth(rounds: list[RoundResult], key: str) -> dict:
    """RSS growth from the first round past the warm-up share of the requests to the last."""
    base = next(r for r in rounds if r.requests >= WARM_UP_SHARE * rounds[-1].requests)
    first, last = getattr(base, key), getattr(rounds[-1], key)
    num = rounds[-1].requests - base.requests
    return {"from_requests": base.requests, "to_requests": rounds[-1].requests, "from_mb": first, "to_mb": last,
            "growth_pct": 100 * (last - first) / first, "kb_per_request": 1024 * (last - first) / num if num else 0.0}


def format_row(r: RoundResult) -> str:
    return (f"| {r.requests:,} | {r.requests_per_s:.1f} | {r.errors} | {r.cut_streams} | {r.frontend_rss_mb:.1f} "
            f"| {r.core_rss_mb:.1f} | {r.max_running:.0f} / {r.idle_running:.0f} "
            f"| {r.max_kv_usage:.3f} / {r.idle_kv_usage:.3f} |")


def format_table(rounds: list[RoundResult]) -> str:
    lines = ["| requests | req/s | errors | cut streams | front end RSS MB | core RSS MB "
             "| running max / idle | KV usage max / idle |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return "\n".join(lines + [format_row(r) for r in rounds])


def summarize(rounds: list[RoundResult], wall: float) -> dict:
    num = rounds[-1].requests
    return {"requests": num, "errors": sum(r.errors for r in rounds), "cut_streams": sum(r.cut_streams for r in rounds),
            "wall_s": wall, "requests_per_s": num / wall, "core_rss": growth(rounds, "core_rss_mb"),
            "frontend_rss": growth(rounds, "frontend_rss_mb")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen3",
                        help="a model folder, or tiny-qwen3 / tiny-llama for random weights of that shape")
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--time-limit-s", type=float, default=1800.0, help="no new request after this")
    parser.add_argument("--round", type=int, default=2000, help="requests between two RSS readings")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16, help="each request asks for 1 to this many")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON report")
    parser.add_argument("--log", default=None, help="server log (default: a temp file)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pagedinfer-soak-"))
    try:
        model = prepare_model(args.model, "cpu", workdir / "model")
        tokenizer = load_tokenizer(model)
        if tokenizer.chat_template is None:
            if model == args.model:  # never write into the caller's folder
                raise SystemExit(f"{model} has no chat template: the soak sends chat requests")
            tokenizer.chat_template = CHAT_TEMPLATE
            tokenizer.save_pretrained(model)
        port = free_port()
        blocks = args.concurrency * -(-args.max_model_len // 16) + 16  # every request at full length fits
        command = [sys.executable, "-m", "server.cli", "serve", "--model", model, "--host", "127.0.0.1",
                   "--port", str(port), "--max-model-len", str(args.max_model_len), "--num-kv-blocks", str(blocks)]
        log = Path(args.log) if args.log else workdir / "server.log"
        # One torch thread: on a small box the front end and this client need the other core.
        with ServerProcess(command, f"http://127.0.0.1:{port}/ready", log, {"OMP_NUM_THREADS": "1"}) as server:
            rounds, wall = asyncio.run(soak(f"http://127.0.0.1:{port}", server.proc.pid, args,
                                            prompt_words(tokenizer)))
        if not rounds:
            raise SystemExit(f"no request sent within --time-limit-s {args.time_limit_s}")
        summary = summarize(rounds, wall)
        report = {"when": now_utc(), "commit": git_commit(), "machine": machine_info(),
                  "command": display(" ".join(["python -m bench.soak", *(argv if argv is not None else sys.argv[1:])])),
                  "args": vars(args), "server": display(" ".join(command)), "summary": summary,
                  "rounds": [asdict(r) for r in rounds]}
        core = summary["core_rss"]
        print(f"{format_table(rounds)}\n{summary['requests']:,} requests in {wall:.0f} s "
              f"({summary['requests_per_s']:.1f}/s), {summary['errors']} errors; core RSS {core['from_mb']:.1f} -> "
              f"{core['to_mb']:.1f} MB from request {core['from_requests']:,}: {core['growth_pct']:+.2f}% "
              f"({core['kb_per_request']:+.3f} KB/request)")
        if args.out:
            write_json(args.out, report)
        return 0 if summary["errors"] == 0 else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
