"""scripts/average_weights.py: the saved mean of saved models, and refusal to mix architectures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb_, single_thread
from server_helpers import ROOT

from pixelllm.build import build_pixelllm
from pixelllm.checkpoints import from_pretrained, save_pretrained


def average(*args: Path | str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/average_weights.py", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two saved random `pixelllm-tiny` models that differ in every parameter."""
    out = []
    with single_thread():
        for seed in (1, 2):
            torch.manual_seed(seed)
            out.append(tmp_path_factory.mktemp(f"m{seed}"))
            save_pretrained(perturb_(build_pixelllm("pixelllm-tiny"), seed=seed), out[-1])
    return out


def test_saved_model_is_the_mean_of_the_inputs(dirs: list[Path], tmp_path: Path) -> None:
    result = average(*dirs, "--out", tmp_path / "soup")
    assert result.returncode == 0, result.stderr
    with single_thread():
        inputs = [from_pretrained(d, device="cpu").state_dict() for d in dirs]
        soup = from_pretrained(tmp_path / "soup", device="cpu").state_dict()
    differing = 0
    for k, t in soup.items():
        if t.is_floating_point():
            mean = (inputs[0][k].double() + inputs[1][k].double()) / 2
            torch.testing.assert_close(t.double(), mean, rtol=0, atol=1e-6, msg=k)
            differing += not torch.equal(inputs[0][k], inputs[1][k])
        else:
            assert torch.equal(t, inputs[0][k]), k
    assert differing > 100  # the inputs really differ, so the mean is not one of them


def test_refuses_models_with_other_tokenizers(dirs: list[Path], tmp_path: Path) -> None:
    first, second = (shutil.copytree(d, tmp_path / d.name) for d in dirs)
    tokenizer = ROOT / "pixelllm" / "configs" / "tokenizers" / "pixelllm-tiny.json"
    shutil.copy(tokenizer, second / "tokenizer.json")
    (first / "tokenizer.json").unlink(missing_ok=True)
    result = average(first, second, "--out", tmp_path / "soup")
    assert result.returncode != 0
    assert "tokenizers differ" in result.stderr
    assert not (tmp_path / "soup").exists()
