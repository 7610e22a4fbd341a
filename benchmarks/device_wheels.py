"""Wheels for a GPU machine that has PyTorch but no network: the project's runtime packages at this venv's versions,
less what such a machine's image ships (torch and its CUDA libraries, numpy, scipy, Pillow, pytest, ...), for its
Python. `benchmarks/device_check.sh` installs them there with `pip install --no-index --no-deps --target`.

    .venv/bin/python benchmarks/device_wheels.py            # -> .whl/ (ignored by git), for CPython 3.12
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# In the GPU image, built against its own torch (binary), or needed by the tests as that image has them.
SHIPPED = re.compile(
    r"(torch|torchvision|triton|nvidia-.*|cuda-.*|numpy|scipy|pillow|sympy|mpmath|networkx|jinja2|markupsafe|psutil"
    r"|pyyaml|regex|setuptools|pytest|pluggy|iniconfig|pygments)"
)
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def runtime_closure(roots: list[str], python_version: str) -> dict[str, str]:
    """Every installed distribution `roots` need at run time (no extras) on `python_version`, by normalized name ->
    version."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in found:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # needed on another platform or Python only
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": python_version}):
                todo.append(req.name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: 3.12)")
    args = parser.parse_args()
    closure = runtime_closure(["pixelllm", "pytest-timeout"], args.python_version)
    left = sorted(n for n in closure if SHIPPED.fullmatch(n))
    wanted = {n: v for n, v in closure.items() if n != "pixelllm" and n not in left}
    shutil.rmtree(args.out, ignore_errors=True)
    platforms = [f"--platform={p}" for p in PLATFORMS]
    pins = [f"{n}=={v}" for n, v in sorted(wanted.items())]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--implementation=cp",
         f"--python-version={args.python_version}", *platforms, "--dest", str(args.out), *pins],
        check=True,
    )  # fmt: skip
    wheels = sorted(args.out.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {args.out}; left to the GPU image: {', '.join(left)}")


if __name__ == "__main__":
    main()
