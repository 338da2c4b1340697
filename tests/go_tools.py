"""Real peers written in Go (Jaeger, llm-d's KV-cache indexer), built once and cached.

Each peer is a small Go module under tests/tools/<name>/ whose go.mod and
go.sum pin every dependency. `go_tool(name)` builds the package PEERS names
in that module into ~/.cache/pagedinfer/go-tools/<name>-<key>/<name>, where the key is
a hash of the module's go.mod, go.sum and Go sources (and the Go version): a
second `make test` finds the binary and builds nothing, and a changed pin
builds a new one. A file lock keeps two test processes from building at once.

Builds run under `nice -n 19`. When the collected tests use a peer,
conftest starts `prebuild()` on a thread as the session starts, so a cold
build overlaps the tests before them instead of adding to the run; the
test's own `go_tool` call then waits on the lock for that build.

Without Go the calling test module skips (fails on CI, where Go is part of
the machine), saying why.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ci_tools import missing

TOOLS_DIR = Path(__file__).resolve().parent / "tools"
CACHE_DIR = Path(os.environ.get("PAGEDINFER_GO_TOOLS_CACHE",
                                Path.home() / ".cache" / "pagedinfer" / "go-tools"))
BUILD_TIMEOUT_S = 1800
# Each peer: its module under tests/tools/ -> the package to build there.
PEERS = {"kvindexer": ".", "jaeger": "github.com/jaegertracing/jaeger/cmd/jaeger"}


def _go_binary() -> str:
    go = shutil.which("go")
    if go is None:
        missing("the Go toolchain is not on PATH; the tests' Go peers (tests/tools/) need it")
    return go


def _module_key(module_dir: Path, go: str) -> str:
    digest = hashlib.sha256()
    version = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=True)
    digest.update(version.stdout.encode())
    for path in sorted(module_dir.rglob("*")):
        if path.is_file() and (path.name in ("go.mod", "go.sum") or path.suffix in (".go", ".c", ".h")):
            digest.update(str(path.relative_to(module_dir)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def go_tool(name: str) -> Path:
    """The path of the built peer `name` (a key of PEERS); builds it on first use."""
    go = _go_binary()
    module_dir = TOOLS_DIR / name
    out_dir = CACHE_DIR / f"{name}-{_module_key(module_dir, go)}"
    binary = out_dir / name
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():  # built by another process while this one waited
            return binary
        partial = out_dir / f".{name}.partial"
        build_env = {**os.environ, "GOFLAGS": "-mod=readonly -buildvcs=false", "GOTOOLCHAIN": "local"}
        done = subprocess.run(["nice", "-n", "19", go, "build", "-trimpath", "-o", str(partial), PEERS[name]], cwd=module_dir,
                              env=build_env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"go build of tests/tools/{name} ({PEERS[name]}) failed:\n{done.stderr[-4000:]}")
        partial.rename(binary)  # atomic: a reader sees the whole binary or none
    return binary


def prebuild() -> None:
    """Build every peer that is not cached yet; a failure is left for the test's own `go_tool` call to report."""
    if shutil.which("go") is None:
        return
    for name in PEERS:
        try:
            go_tool(name)
        except Exception:  # noqa: BLE001 - reported again, with its output, by the test that needs it
            pass
