"""Packaging checks that need no model."""

from __future__ import annotations

import subprocess
import sys


def test_our_kernels_package_is_not_taken_for_hf_kernels():
    # transformers switches to hub kernels when it finds a package named
    # `kernels`; ours must not pass for it. Run in a fresh interpreter so
    # no cached check from another test leaks in.
    code = (
        "import kernels, transformers\n"
        "from transformers.utils import is_kernels_available\n"
        "assert kernels.__file__ is not None\n"
        "print(is_kernels_available())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_console_script_parses():
    from server.cli import build_parser

    args = build_parser().parse_args(["generate", "hi", "--max-tokens", "3"])
    assert args.max_tokens == 3 and args.prompt == "hi"
