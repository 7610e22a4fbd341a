"""Checkpoints that would run code when unpickled are refused, and their code never runs."""

from __future__ import annotations

import builtins
import shutil
from pathlib import Path

import pytest
import torch
from conftest import official_tiny_config
from transformers import T5Config

from pixelllm import build_pixelllm
from pixelllm.build import load_model
from pixelllm.checkpoints import CheckpointError, load_eva_checkpoint, load_sam_checkpoint, load_t5, read_state_dict
from server import Settings
from server.inference import load_predictor

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this runs `exec(code)`: what a malicious checkpoint does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


def write_payload(path: Path, marker: Path) -> Path:
    """A state dict with real tensors, and a payload that creates `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2, 2), "x": Payload(f"open({str(marker)!r}, 'w').close()")}, path)
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "payload-ran"


def assert_refused(error: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    message = str(error.value)
    assert f"refused {path}" in message and "pickled Python code (exec)" in message, message
    assert "weights_only=True" in message
    assert not marker.exists(), "the payload ran"


def test_the_payload_is_live(tmp_path: Path, marker: Path) -> None:
    """The control: an unsafe load does run it, so the refusals below are not vacuous."""
    path = write_payload(tmp_path / "evil.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_official_checkpoint_loaders_refuse_it(tmp_path: Path, marker: Path) -> None:
    path = write_payload(tmp_path / "sam_vit_h.pth", marker)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    assert_refused(e, path, marker)
    model = build_pixelllm(official_tiny_config())
    for loader in (load_sam_checkpoint, load_eva_checkpoint):
        with pytest.raises(CheckpointError) as e:
            loader(model, path)
        assert_refused(e, path, marker)


def test_t5_directory_with_a_pickled_bin_is_refused(tmp_path: Path, marker: Path) -> None:
    """transformers reads `pytorch_model.bin` weights-only; the refusal is our CheckpointError."""
    t5 = tmp_path / "flan-t5"
    T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2).save_pretrained(t5)
    write_payload(t5 / "pytorch_model.bin", marker)
    (t5 / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        load_t5(t5)
    assert_refused(e, t5, marker)


def test_the_service_refuses_it(tmp_path: Path, marker: Path) -> None:
    """The service's loader, with the operator's PIXELLLM_SAM_CHECKPOINT pointing at the file."""
    path = write_payload(tmp_path / "sam.pth", marker)
    with pytest.raises(CheckpointError) as e:
        load_predictor(Settings(model="pixelllm-tiny", sam_checkpoint=str(path), device="cpu"))
    assert_refused(e, path, marker)


def test_our_format_reads_only_safetensors(tmp_path: Path, marker: Path, tiny_model) -> None:
    """A saved model directory is `model.safetensors` or nothing: a pickle under that name, or beside it, is
    never unpickled."""
    saved = tmp_path / "saved"
    tiny_model.save_pretrained(saved)
    assert load_model(saved) is not None
    renamed = tmp_path / "renamed"
    shutil.copytree(saved, renamed)
    write_payload(renamed / "model.safetensors", marker)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(renamed)
    beside = tmp_path / "beside"
    shutil.copytree(saved, beside)
    (beside / "model.safetensors").unlink()
    for name in ("pytorch_model.bin", "model.pth", "model.pt"):
        write_payload(beside / name, marker)
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(beside)
    assert not marker.exists()
