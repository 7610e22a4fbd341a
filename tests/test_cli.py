"""The `pixelllm` command line, run in-process on a random tiny model saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pixelllm import build_pixelllm
from pixelllm.cli import main

SAMPLE = "assets/sample.jpg"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Random weights, but a seed whose captions of SAMPLE (whole, and the box below) have words."""
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(7)
    build_pixelllm("pixelllm-tiny").save_pretrained(path)
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_caption_json_has_words_with_pixel_coordinates(capsys, model_dir):
    code, out, _ = run(capsys, "caption", SAMPLE, "--model", model_dir, "--json", "--max-new-tokens", "8")
    assert code == 0
    result = json.loads(out)
    assert set(result) >= {"text", "words"} and len(result["words"]) >= 2
    for word in result["words"]:
        x0, y0, x1, y1 = word["box"]
        assert 0 <= x0 <= x1 <= 578 and 0 <= y0 <= y1 <= 530  # assets/sample.jpg is 578 x 530
        assert result["text"][word["start"] : word["end"]] == word["text"]


def test_region_caption_and_human_output(capsys, model_dir):
    code, out, _ = run(
        capsys, "caption", SAMPLE, "--model", model_dir, "--box", "10,20,200,220", "--max-new-tokens", "6"
    )
    assert code == 0
    lines = out.splitlines()
    assert len(lines) > 2, out  # the caption, then a line per word
    assert all("point=(" in line and "box=(" in line for line in lines[1:])


def test_localize_with_mask(capsys, model_dir):
    from PIL import Image

    from pixelllm.data.rle import decode_segmentation

    code, out, _ = run(capsys, "localize", SAMPLE, "the green square", "--model", model_dir, "--mask", "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["box"]) == 4 and 0 <= result["score"] <= 1
    assert [w["text"] for w in result["words"]] == ["the", "green", "square"]
    mask = decode_segmentation(result["mask"], *result["mask"]["size"])
    assert mask.shape == Image.open(SAMPLE).size[::-1] and result["mask_area"] == mask.sum() > 0
    code, out, _ = run(capsys, "localize", SAMPLE, "the green square", "--model", model_dir, "--mask")
    assert code == 0 and f"mask={result['mask_area']} px" in out.splitlines()[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["caption", "missing.png"], "image not found"),
        (["caption", SAMPLE, "--box", "1,2,3"], "--box must be 4"),
        (["caption", SAMPLE, "--point", "a,b"], "--point must be 2"),
        (["caption", SAMPLE, "--box", "100,100,50,50"], "box"),
        (["caption", SAMPLE, "--point", "9999,5"], "point"),
        (["caption", "pyproject.toml"], "cannot read image"),
        (["caption", SAMPLE, "--model", "no-such-model"], "unknown model"),
        (["eval", "--data", "pyproject.toml", "--out", "e.json"], "is not a folder written by `pixelllm data synth`"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, model_dir, argv, message):
    if "--model" not in argv:
        argv = [*argv, "--model", model_dir]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("pixelllm: error:") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["caption", SAMPLE, "--max-new-tokens", "0"],
        ["caption", SAMPLE, "--max-new-tokens", "-3"],
        ["caption", SAMPLE, "--num-beams", "0"],
        ["dense", SAMPLE, "--max-regions", "0"],
        ["data", "synth", "--out", "x", "--n", "-1"],
    ],
)
def test_counts_below_one_are_refused_by_argparse(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["65536", "-1", "http"])
def test_a_port_that_is_none_is_refused_before_the_model_loads(capsys, port):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", port])
    assert exited.value.code == 2 and "argument --port" in capsys.readouterr().err


def broken_source_config(tmp_path: Path) -> Path:
    """A training config whose one source's first record is not JSON."""
    (tmp_path / "ln.jsonl").write_text('{"image_id": \n')
    source = {"kind": "narratives", "path": str(tmp_path / "ln.jsonl"), "image_root": str(tmp_path)}
    config = tmp_path / "broken.json"
    config.write_text(json.dumps({"model": "pixelllm-tiny", "out_dir": str(tmp_path / "run"), "sources": [source]}))
    return config


def test_ordinary_mistakes_exit_2_with_one_line_not_a_traceback(capsys, tmp_path, model_dir, monkeypatch):
    from PIL import Image

    huge = tmp_path / "huge.png"  # a PNG header claiming 20000 x 20000 pixels: over Pillow's bomb limit
    Image.new("RGB", (8, 8)).save(huge)
    data = bytearray(huge.read_bytes())
    data[16:24] = (20000).to_bytes(4, "big") * 2
    huge.write_bytes(bytes(data))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["caption", str(huge), "--model", model_dir], "cannot read image"),
        (["caption", SAMPLE, "--model", model_dir, "--device", "bogus"], "--device bogus: not a device torch can use"),
        (["eval", "--model", model_dir, "--num-scenes", "1", "--device", "bogus"], "--device bogus: not a device"),
        (["visualize", SAMPLE, "--model", model_dir, "-o", str(tmp_path / "no" / "x.png")], "No such file"),
        (["api-key", "--keys-file", str(tmp_path / "no" / "keys")], "create it first"),
        (["caption", str(tmp_path), "--model", model_dir], "is a folder"),
        (["localize", SAMPLE, "  ", "--model", model_dir], "text to localize is empty"),
        (["localize", SAMPLE, "circle " * 60, "--model", model_dir], "tokens; the model reads at most 47"),
        (["visualize", SAMPLE, "--text", "", "--model", model_dir, "-o", "x.png"], "text to localize is empty"),
        (["visualize", SAMPLE, "--model", model_dir, "-o", str(tmp_path)], "it has no suffix; end it in .png"),
        (["visualize", SAMPLE, "--model", model_dir, "-o", "x.xyz"], "its suffix '.xyz'; end it in .png"),
        (["visualize", SAMPLE, "--model", model_dir, "-o", "x.psd"], "its suffix '.psd'"),  # Pillow reads, not writes
        (["visualize", SAMPLE, "--text", "circle " * 60, "--model", model_dir, "-o", "x.png"], "the model reads at"),
        (["data", "synth", "--out", str(a_file / "sub"), "--n", "1"], "Not a directory"),
        (["batch", SAMPLE, "-o", str(tmp_path / "o.jsonl"), "--server", "http://localhost:99999"], "not valid"),
        (["batch", SAMPLE, "-o", str(tmp_path / "o.jsonl"), "--server", "http://[::1"], "not valid"),
        (["batch", SAMPLE, "-o", str(tmp_path / "o.jsonl"), "--timeout", "nan"], "timeout"),
        (["eval", "--model", str(tmp_path / "no-model"), "--num-scenes", "1"], "no-model"),
        (["eval", "--model", model_dir, "--data", str(tmp_path / "no-data")], "no-data"),
        (["train", str(tmp_path / "no-config.json")], "no-config.json"),
        (["train", str(broken_source_config(tmp_path))], "ln.jsonl:1"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("pixelllm: error:") and message in err and err.count("\n") == 1, (argv, err)
    for name, value in (("PIXELLLM_MAX_QUEUE", "abc"), ("PIXELLLM_DEBUG_FAIL_STATUSES", "429,503")):
        monkeypatch.setenv(name, value)
        code, _, err = run(capsys, "serve")
        assert code == 2 and name in err and err.count("\n") == 1, err
        monkeypatch.delenv(name)


def test_api_key_appends_its_own_line_to_a_file_without_a_final_newline(capsys, tmp_path):
    from server.security import KeyStore, hash_key

    keys = tmp_path / "keys"
    keys.write_text(hash_key("alice") + "  # alice")  # no newline at the end
    code, out, _ = run(capsys, "api-key", "--keys-file", str(keys), "--note", "bob")
    assert code == 0
    bob = out.split("key:", 1)[1].split()[0]
    assert KeyStore(keys).hashes() == {hash_key("alice"), hash_key(bob)}
    keys.write_text("")
    assert run(capsys, "api-key", "--keys-file", str(keys))[0] == 0 and keys.read_text().count("\n") == 1


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
    import pixelllm.data.synthetic

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pixelllm.data.synthetic, "write_dataset", interrupted)
    code, _, err = run(capsys, "data", "synth", "--out", "unused", "--n", "1")
    assert code == 130 and err == "pixelllm: interrupted\n"


def test_visualize_writes_a_png(capsys, tmp_path, model_dir):
    from PIL import Image

    out = tmp_path / "overlay.png"
    code, _, _ = run(capsys, "visualize", SAMPLE, "--model", model_dir, "--text", "the green square", "-o", str(out))
    assert code == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width == 578 and im.height > 530


def test_data_synth_writes_a_dataset(capsys, tmp_path):
    code, out, _ = run(capsys, "data", "synth", "--out", str(tmp_path / "d"), "--n", "3", "--seed", "1")
    assert code == 0
    lines = (tmp_path / "d" / "annotations.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert len(list((tmp_path / "d" / "images").iterdir())) == 3


def test_eval_writes_metrics_json(capsys, tmp_path, model_dir):
    out_file = tmp_path / "eval.json"
    code, _, _ = run(capsys, "eval", "--model", model_dir, "--num-scenes", "2", "--seed", "4", "--out", str(out_file))
    assert code == 0
    metrics = json.loads(out_file.read_text())
    for key in (
        "referring_acc@0.5",
        "referring_mean_iou",
        "mask_iou",
        "referring_acc@0.5_regressed",
        "mask_iou_regressed",
        "region_caption_acc_box",
        "caption_word_point_acc",
    ):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["num_scenes"] == 2 and metrics["num_objects"] >= 2 and metrics["num_beams"] == 1
    assert metrics["quantize"] == "none"
    assert torch.is_grad_enabled(), "eval must not switch autograd off for the rest of the process"

    data = str(tmp_path / "synth")  # the same scenes written by `pixelllm data synth`, read back by --data
    assert run(capsys, "data", "synth", "--out", data, "--n", "2", "--seed", "4", "--renderer", "independent")[0] == 0
    code, _, _ = run(capsys, "eval", "--model", model_dir, "--data", data, "--out", str(out_file))
    on_disk = json.loads(out_file.read_text())
    assert code == 0 and on_disk["data"] == data
    assert (on_disk["num_scenes"], on_disk["num_objects"]) == (2, metrics["num_objects"])


def test_eval_num_beams(capsys, tmp_path, model_dir):
    out_file = tmp_path / "eval.json"
    code, _, _ = run(
        capsys, "eval", "--model", model_dir, "--num-scenes", "1", "--num-beams", "2", "--out", str(out_file)
    )
    assert code == 0 and json.loads(out_file.read_text())["num_beams"] == 2
    code, _, _ = run(
        capsys, "eval", "--model", model_dir, "--num-scenes", "1", "--quantize", "int8", "--out", str(out_file)
    )
    assert code == 0 and json.loads(out_file.read_text())["quantize"] == "int8"  # the evaluated model's state
    with pytest.raises(SystemExit) as exited:  # argparse refuses it
        main(["eval", "--model", model_dir, "--num-scenes", "1", "--num-beams", "0"])
    assert exited.value.code == 2 and "--num-beams: must be at least 1, got 0" in capsys.readouterr().err


def test_dense_lists_regions_in_image_pixels(capsys, model_dir):
    code, out, _ = run(
        capsys, "dense", SAMPLE, "--model", model_dir, "--json", "--score-threshold", "0", "--max-regions", "3"
    )
    assert code == 0
    regions = json.loads(out)
    assert 1 <= len(regions) <= 3
    for r in regions:
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 < x1 <= 578 and 0 <= y0 < y1 <= 530
        assert set(r["caption"]) >= {"text", "words"}
    code, out, _ = run(capsys, "dense", SAMPLE, "--model", model_dir, "--score-threshold", "1")
    assert code == 0 and "no region" in out
    code, _, err = run(capsys, "dense", SAMPLE, "--model", model_dir, "--nms-iou", "0")
    assert code == 2 and "nms_iou" in err


def test_visualize_dense_writes_a_png(capsys, model_dir, tmp_path):
    from PIL import Image

    out_png = tmp_path / "dense.png"
    code, _, _ = run(
        capsys,
        "visualize",
        SAMPLE,
        "--dense",
        "--score-threshold",
        "0",
        "--max-regions",
        "2",
        "--model",
        model_dir,
        "-o",
        str(out_png),
    )
    assert code == 0
    image = Image.open(out_png)
    assert image.width == 578 and image.height > 530  # the captions band below the image
    code, _, err = run(capsys, "visualize", SAMPLE, "--dense", "--text", "a", "--model", model_dir, "-o", str(out_png))
    assert code == 2 and "one of" in err


def test_the_default_model_is_found_from_any_folder_and_a_preset_warns_of_random_weights(monkeypatch, tmp_path, caplog):
    from pixelllm.build import load_model
    from pixelllm.config import DEFAULT_WEIGHTS
    from server.settings import Settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIXELLLM_MODEL", raising=False)
    assert DEFAULT_WEIGHTS.is_dir() and Settings().resolved_model() == str(DEFAULT_WEIGHTS)
    load_model(Settings().resolved_model())
    with pytest.raises(ValueError, match="unknown model") as raised:
        load_model("weights/pixelllm-tny")  # a typo: the error alone, no warning of weights never built
    assert f"(there is no weights/pixelllm-tny under {tmp_path}, where relative paths are read from)" in str(
        raised.value
    )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "model.txt").write_text("not a model")
    with pytest.raises(ValueError, match="unknown model") as raised:
        load_model("notes/model.txt")  # there, but not a model: no hint that it is missing
    assert "there is no" not in str(raised.value)
    assert "RANDOM" not in caplog.text
    load_model("pixelllm-tiny")
    assert "pixelllm-tiny is built with RANDOM weights" in caplog.text
    for preset in ("pixelllm-base", "pixelllm-t5xl"):  # refused before building billions of random weights
        with pytest.raises(ValueError, match=f"{preset} ships no tokenizer.*PIXELLLM_T5_PATH"):
            load_model(preset)


def test_without_a_model_setting_or_the_default_weights_the_service_does_not_start(monkeypatch, tmp_path) -> None:
    """A package installed from a wheel holds no weights/: the service served random weights, a warning in its log."""
    import server.settings
    from pixelllm.config import DEFAULT_WEIGHTS
    from server import Settings, StartupError
    from server.app import serving_settings

    monkeypatch.delenv("PIXELLLM_MODEL", raising=False)
    monkeypatch.setattr(server.settings, "DEFAULT_WEIGHTS", tmp_path / "weights" / "pixelllm-tiny")
    with pytest.raises(
        StartupError, match="PIXELLLM_MODEL is unset and the default model is not at .*set PIXELLLM_MODEL"
    ):
        serving_settings(Settings())
    given = str(DEFAULT_WEIGHTS)  # the real one: the setting is taken as given
    assert serving_settings(Settings(model=given)).model == given


def test_a_negative_coordinate_after_a_space_says_to_use_equals(capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["caption", SAMPLE, "--point", "-5,-5"])
    assert exit.value.code == 2
    assert "--point: expected one argument (a value that starts with '-' goes after '='" in capsys.readouterr().err
    assert main(["caption", SAMPLE, "--point=-5,-5"]) == 2  # then the one-line error about the point itself
    assert "point" in capsys.readouterr().err


def test_a_preset_without_a_tokenizer_is_a_one_line_error(capsys) -> None:
    assert main(["caption", SAMPLE, "--model", "pixelllm-base"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixelllm: error: pixelllm-base ships no tokenizer") and "Traceback" not in err


@pytest.mark.parametrize("stream", [["--stream"], []])
def test_a_reader_that_goes_away_stops_the_output_quietly(model_dir, stream):
    """`pixelllm caption --json | head -1`: no error message when the reader has gone (here before the first
    word, so that the write surely fails), whether each word is flushed (--stream) or the answer sits buffered."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "pixelllm.cli", "caption", SAMPLE, "--model", model_dir, "--json", *stream]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == b"", done.stderr
