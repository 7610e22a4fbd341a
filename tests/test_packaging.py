"""The wheel `pip install` makes: it must carry every file the package reads at run time."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from server_helpers import ROOT


def test_the_wheel_carries_every_config_tokenizer_and_static_file(tmp_path: Path) -> None:
    """Outside the checkout, a preset without its tokenizer could not caption (it was left out of the wheel)."""
    source = tmp_path / "src"  # a copy: the checkout's build/ may hold files of an earlier build
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for package in ("pixelllm", "server"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(tmp_path)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("pixelllm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = [p for p in (ROOT / "server" / "static").rglob("*") if p.is_file()]
    needed = [*(ROOT / "pixelllm" / "configs").rglob("*.json"), *static]
    assert (ROOT / "pixelllm/configs/tokenizers/pixelllm-tiny.json") in needed
    assert (ROOT / "server/static/docs/swagger-ui-bundle.js") in needed
    missing = [str(p.relative_to(ROOT)) for p in needed if str(p.relative_to(ROOT)) not in names]
    assert not missing, f"left out of the wheel: {missing}"
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)  # Apache-2.0 ships its text


def test_every_dependency_is_pinned_to_the_installed_version() -> None:
    """`make setup` and the Docker images install with `-c constraints.txt`: each dependency pyproject.toml names
    (every extra too) must be pinned there, at the version these tests run with (`make constraints` rewrites it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for requirement in map(Requirement, wanted):
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        assert name in pins, f"{requirement.name} is not pinned in constraints.txt: run make constraints"
        assert requirement.specifier.contains(pins[name]), f"constraints.txt pins {name}=={pins[name]}, {requirement}"
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{requirement.name} is not installed: run make setup")
        assert installed == pins[name], f"{name} {installed} installed, {pins[name]} pinned: run make constraints"
