"""The wheels a GPU run carries: what the server imports that the GPU image lacks.

The GPU image has Python 3.12 with torch, triton, transformers (and their
dependencies), numpy, pytest, httpx, anyio, h11, uvloop, prometheus-client
and msgpack, but no web stack and no network. `bench/gpu_check.sh --serve`
therefore installs the server's other dependencies from wheels laid out in
`.whl/` (git-ignored), downloaded here beforehand:

    python -m bench.gpu_wheels            # .whl/: Python 3.12 (the GPU image) and this interpreter's
    python -m bench.gpu_wheels --check    # run by gpu_check.sh under the layout: imports resolve

Versions are the ones this checkout's environment runs (tested together).
Both the 3.12 wheels and this interpreter's are kept, so the CPU dry run
installs from exactly the layout the GPU run does; `pip install --no-index
--no-deps --find-links .whl --target SITE` picks each interpreter's own.

`--check` follows the project's requirements, and those of each carried
wheel, and fails on one that is neither carried nor in the image's list
below (so a new dependency shows up in the dry run, not after a GPU run that
could not start); then it imports what the serve step imports (the server,
the engine core, xgrammar, the benchmarks) and fails if a carried
distribution came from anywhere but the installed wheel folder.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

WHEEL_DIR = Path(__file__).resolve().parents[1] / ".whl"
# What the GPU image lacks, by distribution name.
CARRIED = (
    "fastapi", "starlette", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "uvicorn",
    "httptools", "pyzmq", "msgspec", "xgrammar", "apache-tvm-ffi", "gguf", "opentelemetry-api", "cbor2",
    # pydantic needs a newer one than the image may have
    "typing-extensions",
)
# What the image has that the project's and the carried wheels' requirements name.
IMAGE = (
    "torch", "triton", "transformers", "tokenizers", "safetensors", "accelerate", "numpy", "tqdm", "pyyaml",
    "requests", "anyio", "h11", "click", "uvloop", "prometheus-client", "annotated-doc", "idna",
)
# Modules the serve step and the benchmarks load.
ENTRY_MODULES = ("server.cli", "server.api_server", "inference.core_process", "inference.engine_core",
                 "inference.structured_output", "xgrammar", "bench.overhead", "bench.serve")


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def download() -> None:
    WHEEL_DIR.mkdir(exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in CARRIED]
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    for python in sorted({"3.12", here}):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", python, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
             "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_17_x86_64",
             "--platform", "manylinux2014_x86_64", "-d", str(WHEEL_DIR), *pins],
            check=True,
        )
    size = sum(f.stat().st_size for f in WHEEL_DIR.glob("*.whl"))
    print(f"{WHEEL_DIR}: {len(list(WHEEL_DIR.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB for Python {here} "
          "and 3.12")


def _requirements(lines: list[str]) -> list[str]:
    """The names these requirement lines name on the GPU image's Linux x86-64 Python 3.12, extras left out."""
    environment = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                   "platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux", "extra": ""}
    names = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            names.append(_normal(requirement.name))
    return names


def check(site: Path) -> int:
    """0 if the project's requirements, and theirs, are all carried in `site` or on the image, and
    the serve step's modules import with each carried distribution loaded from `site`."""
    carried = {_normal(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site)])}
    image = {_normal(name) for name in IMAGE}
    # The project is not installed there (PYTHONPATH is the checkout): its requirements come from pyproject.
    project = tomllib.loads((WHEEL_DIR.parent / "pyproject.toml").read_text())["project"]
    needed = _requirements(project["dependencies"])
    missing, seen = [], set()
    while needed:
        name = needed.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in carried:
            needed += _requirements(carried[name].requires or [])
        elif name not in image:
            missing.append(name)
    for module in ENTRY_MODULES:
        importlib.import_module(module)
    outside = sorted(name for name, dist in carried.items()
                     if not Path(str(metadata.distribution(name).locate_file(""))).resolve() == site)
    for name in sorted(missing):
        print(f"{name}: required, but neither carried in {WHEEL_DIR.name}/ nor on the GPU image")
    for name in outside:
        print(f"{name}: carried, but loaded from outside {site}")
    print(f"wheel layout: {len(carried)} carried distributions in {site}, "
          f"{'complete' if not (missing or outside) else 'INCOMPLETE'}")
    return 1 if missing or outside else 0


def shadow_hub_kernels(site: Path) -> bool:
    """Hide Hugging Face's `kernels` distribution from transformers, where the image has one: a
    dist-info of version 0 in `site` (first on the path, so metadata finds it first). transformers
    from 5.25 imports `kernels` when its version check passes, and the import finds this project's
    `kernels/` package (the checkout is on the path) instead, which fails every model config; at
    version 0 the check fails and transformers never imports it. True if it wrote one."""
    try:
        metadata.version("kernels")
    except metadata.PackageNotFoundError:
        return False
    info = site / "kernels-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0\n")
    print(f"Hugging Face's kernels {metadata.version('kernels')} is installed: shadowed for transformers by {info}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", type=Path, metavar="SITE", help="check the imports under the installed layout")
    parser.add_argument("--shadow-hub-kernels", type=Path, metavar="SITE",
                        help="hide Hugging Face's kernels distribution from transformers (see shadow_hub_kernels)")
    args = parser.parse_args()
    if args.shadow_hub_kernels is not None:
        shadow_hub_kernels(args.shadow_hub_kernels.resolve())
        return 0
    if args.check is not None:
        return check(args.check.resolve())
    download()
    return 0


if __name__ == "__main__":
    sys.exit(main())
