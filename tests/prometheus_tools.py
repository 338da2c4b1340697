"""Prometheus' own programs for the metrics tests: `promtool` and `prometheus`.

Both come with Debian's `prometheus` package. When one is missing and the
tests run as root on a Debian-like system (as in CI), `require()` installs
the package with apt-get; otherwise, or when that install fails, the calling
test is skipped, saying why, and fails on CI (`ci_tools.missing`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ci_tools import missing

APT_PACKAGE = "prometheus"
APT_TIMEOUT_S = 600


def _apt_install() -> str | None:
    """Install the package; None on success, else what went wrong."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # One install at a time, also across pytest worker processes.
    with open(Path(tempfile.gettempdir()) / "pagedinfer-apt-prometheus.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if shutil.which("promtool") and shutil.which("prometheus"):
            return None
        for command in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", APT_PACKAGE]):
            try:
                done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return f"`{' '.join(command)}` took over {APT_TIMEOUT_S} s"
            if done.returncode != 0:
                return f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr[-500:]}"
    return None


def require(binary: str) -> str:
    """Path of `binary` ("promtool" or "prometheus"); installs it if missing, else skips (fails on CI)."""
    path = shutil.which(binary)
    if path:
        return path
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        missing(f"{binary} not found, and apt-get install {APT_PACKAGE} needs root on a Debian-like system")
    problem = _apt_install()
    path = shutil.which(binary)
    if path is None:
        missing(f"{binary} not found after apt-get install {APT_PACKAGE}: {problem or 'not in the package'}")
    return path


def check_metrics(text: str) -> list[str]:
    """Problems `promtool check metrics` reports for an exposition text."""
    done = subprocess.run([require("promtool"), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode != 0 and not problems:
        problems = [f"promtool exited with {done.returncode}"]
    return problems
