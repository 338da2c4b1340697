"""How long until a new replica is ready? `pagedinfer serve` to /ready, against the bare imports.

A replica that KEDA adds for a burst serves nothing until /ready: start-up
time is the autoscaler's reaction time. This starts `pagedinfer serve` (the
default model unless --model) --repeats times, each a fresh process on a free
port, timing from the spawn to the first 200 from /ready, and reads each
start's phases from /metrics (`pagedinfer_startup_seconds{phase}`). In the
same run it times `python -c "import torch, transformers"` as often: the
floor a Python server on this stack cannot go under. Reports the best of
each, their ratio (the target: at most 2.0), and the phases of the best start.

    nice -n 10 python -m bench.startup --repeats 3 --out bench/out/startup.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.` imports resolve
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import git_commit, machine_info, now_utc, write_json
from bench.peers.servers import ServerProcess, free_port


def bare_import_s() -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True)
    return time.monotonic() - start


def phases(base_url: str) -> dict[str, float]:
    found = {}
    for line in httpx.get(base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("pagedinfer_startup_seconds{"):
            found[line.split('phase="')[1].split('"')[0]] = float(line.split()[-1])
    return found


def describe(found: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.2f} s" for name, seconds in found.items())


def one_start(args: argparse.Namespace, log: Path) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               *(["--model", args.model] if args.model else [])]
    base_url = f"http://127.0.0.1:{port}"
    # /ready asked every 100 ms: the figure is the server's to within that (a tighter poll
    # takes the front end's CPU from its own start-up).
    with ServerProcess(command, base_url + "/ready", log, startup_timeout=600, poll_s=0.1) as server:
        return {"ready_s": server.startup_s, "phases": phases(base_url)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model folder (default: the prepared SmolLM2)")
    parser.add_argument("--repeats", type=int, default=2, help="starts and bare imports each; the best counts")
    parser.add_argument("--out", default=None, help="JSON report")
    args = parser.parse_args(argv)
    starts, imports = [], []
    with tempfile.TemporaryDirectory(prefix="pagedinfer-startup-") as workdir:
        for i in range(args.repeats):  # alternating, so a change in the machine's load falls on both
            imports.append(bare_import_s())
            starts.append(one_start(args, Path(workdir) / f"server-{i}.log"))
            print(f"run {i}: import torch, transformers {imports[-1]:.2f} s; serve to /ready "
                  f"{starts[-1]['ready_s']:.2f} s ({describe(starts[-1]['phases'])})", flush=True)
    best = min(starts, key=lambda s: s["ready_s"])
    ratio = best["ready_s"] / min(imports)
    print(f"best: serve to /ready {best['ready_s']:.2f} s, bare imports {min(imports):.2f} s, ratio {ratio:.2f}")
    print(f"phases of the best start: {describe(best['phases'])}")
    if args.out:
        write_json(args.out, {"when": now_utc(), "commit": git_commit(), "machine": machine_info(),
                              "args": vars(args), "starts": starts, "imports_s": imports, "ratio": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
