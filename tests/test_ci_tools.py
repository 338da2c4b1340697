"""`ci_tools`: a missing hard dependency skips a module, except on CI, where the run fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GUARDED_MODULE = """
from ci_tools import require_module

require_module("pagedinfer_no_such_module", "nothing provides it")


def test_never_runs():
    pass
"""


@pytest.mark.parametrize("ci, exit_code, outcome", [
    (None, 5, "1 skipped"),  # 5: no test left to run
    ("true", 2, "CI is set, where a hard test dependency must not skip"),  # 2: a collection error
    ("false", 5, "1 skipped"),
])
def test_missing_module_skips_except_on_ci(tmp_path: Path, ci: str | None, exit_code: int, outcome: str) -> None:
    (tmp_path / "test_guarded.py").write_text(GUARDED_MODULE)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # no hypothesis or schemathesis plugins: 0.3 s a run, not 4
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "test_guarded.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == exit_code, done.stdout + done.stderr
    assert outcome in done.stdout and "cannot import pagedinfer_no_such_module" in done.stdout, done.stdout
