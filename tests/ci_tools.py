"""Hard test dependencies: a skip on a developer's machine, a failure on CI.

CI runs `make test` with the environment variable CI set (CI=true), and there
every test must run: a missing `triton`, `xgrammar`, kustomize (kubectl's),
kubernetes-validate or hadolint (all from `make install`), or a failed apt
install of Prometheus, means a broken environment, and the modules they guard
would otherwise pass unseen as skips. Elsewhere (a GPU box with only torch and
transformers, a laptop without root for apt) the tests skip, saying why.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

ON_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str) -> NoReturn:
    """Skip the calling test (its module, when called at import) because of `what`; fail instead on CI."""
    if ON_CI:
        pytest.fail(f"{what}; CI is set, where a hard test dependency must not skip", pytrace=False)
    pytest.skip(what, allow_module_level=True)


def require_module(name: str, hint: str) -> ModuleType:
    """`pytest.importorskip(name)`, failing on CI; `hint` says how to get the module."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"cannot import {name} ({exc}): {hint}")
