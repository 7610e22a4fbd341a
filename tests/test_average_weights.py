"""scripts/average_weights.py: the saved mean of saved models, and refusal to mix architectures."""

from __future__ import annotations

import json
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
from pixelllm.config import load_config


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


def test_configs_that_differ_only_outside_the_architecture_average_with_a_warning(
    dirs: list[Path], tmp_path: Path
) -> None:
    """A stage renamed or given another caption prompt or caption length has the same weights: they average (the
    script used to refuse any config difference), keeping the first's config, with a warning naming the fields."""
    second = shutil.copytree(dirs[1], tmp_path / "renamed")
    config = json.loads((second / "config.json").read_text())
    config["name"] = "stage-2"
    config["caption_prompt"] = "a long caption: "
    config["language_model"]["max_text_tokens"] += 8
    (second / "config.json").write_text(json.dumps(config))
    result = average(dirs[0], second, "--out", tmp_path / "soup")
    assert result.returncode == 0, result.stderr
    assert "differ in ['caption_prompt', 'language_model.max_text_tokens', 'name']" in result.stderr
    assert json.loads((tmp_path / "soup" / "config.json").read_text()) == json.loads(
        (dirs[0] / "config.json").read_text()
    )


def test_refuses_models_of_another_architecture(dirs: list[Path], tmp_path: Path) -> None:
    with single_thread():
        save_pretrained(build_pixelllm(load_config("pixelllm-tiny").at_image_size(192)), tmp_path / "large")
    result = average(dirs[0], tmp_path / "large", "--out", tmp_path / "soup")
    assert result.returncode != 0
    assert f"{tmp_path / 'large'} is of another architecture than {dirs[0]} (" in result.stderr
    assert "shape mismatches" in result.stderr and not (tmp_path / "soup").exists()


def test_a_missing_input_is_one_line(dirs: list[Path], tmp_path: Path) -> None:
    result = average(dirs[0], tmp_path / "nowhere", "--out", tmp_path / "soup")
    assert result.returncode != 0
    assert result.stderr.startswith(f"error: {tmp_path / 'nowhere'} is not a PixelLLM model directory")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
