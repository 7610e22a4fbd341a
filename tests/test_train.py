"""Training: a few real steps, exact resume after SIGKILL, the paper recipe's code path, DDP on gloo."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import official_tiny_config, single_thread
from safetensors.torch import load_file
from server_helpers import ROOT

from pixelllm import PixelLLM, build_pixelllm
from pixelllm.build import default_tokenizer
from pixelllm.config import PixelLLMConfig, load_config
from pixelllm.data.synthetic import write_dataset
from pixelllm.modeling.image_encoder import SAM_PIXEL_MEAN
from pixelllm.train import SourceConfig, TrainConfig, initial_model, lr_at, train


def tiny_config(out_dir: Path, steps: int, **overrides) -> TrainConfig:
    cfg = TrainConfig(
        model="pixelllm-tiny",
        out_dir=str(out_dir),
        sources=[SourceConfig(kind="synthetic", seed=3, num_scenes=6)],
        batch_size=4,
        steps=steps,
        lr=1e-3,
        warmup_steps=2,
        log_every=1,
        ckpt_every=2,
        seed=0,
    )
    return dataclasses.replace(cfg, **overrides)


def write_config(cfg: TrainConfig, path: Path) -> Path:
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    return path


def torchrun_train(config: Path, processes: int = 2) -> None:
    """`pixelllm.train` on `config` under torchrun, `processes` CPU processes (gloo), one thread each."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run(
        [*torchrun, "-m", "pixelllm.train", str(config)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_lr_schedule_warmup_then_cosine_to_zero():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.5)
    assert lr_at(110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_few_steps_reduce_loss_and_write_logs_and_model(tmp_path):
    final = train(tiny_config(tmp_path, steps=8, lr=3e-3))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    assert {"ce", "point_l1", "confidence_bce", "samples_per_s"} <= set(records[0])
    assert {p.name for p in final.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_a_stage_at_another_image_size_starts_from_the_saved_model_resampled(tmp_path):
    first = train(tiny_config(tmp_path / "a", steps=2))
    stage = tiny_config(tmp_path / "b", steps=2, init_from=str(first), image_size=192)
    saved, start = PixelLLM.from_pretrained(first).state_dict(), initial_model(stage)
    assert start.cfg.image_size == 192
    started = start.state_dict()
    kept = [k for k, v in started.items() if v.shape == saved[k].shape]
    assert len(kept) == len(saved) - 4  # SAM and EVA position embeddings, SAM's global rel-pos tables
    assert all(torch.equal(started[k], saved[k]) for k in kept)
    final = PixelLLM.from_pretrained(train(stage))
    assert initial_model(tiny_config(tmp_path / "c", steps=1, image_size=192)).cfg.image_size == 192  # fresh
    assert final.cfg.image_size == 192 and final.image_encoder.image_size == 192


def test_a_stage_from_a_model_without_attribute_words_takes_the_presets(tmp_path):
    cfg = load_config("pixelllm-tiny")
    own = {"color": ["red", "teal"]}
    for name, words in (("without", {}), ("own", own)):
        build_pixelllm(dataclasses.replace(cfg, attribute_words=words)).save_pretrained(tmp_path / name)
    assert initial_model(tiny_config(tmp_path / "a", 1, init_from=str(tmp_path / "without"))).cfg.attribute_words == (
        cfg.attribute_words
    )
    assert initial_model(tiny_config(tmp_path / "b", 1, init_from=str(tmp_path / "own"))).cfg.attribute_words == own


def test_a_stage_from_a_saved_model_gains_only_what_its_config_names(tmp_path):
    """Without `model`, a stage from a saved captioner keeps it as it is: no proposal head, no attribute words
    (before, the default preset pixelllm-tiny lent it its synthetic-shape vocabulary and a fresh head); naming the
    preset gives both."""
    cfg = dataclasses.replace(load_config("pixelllm-tiny"), proposal_head=None, attribute_words={})
    cfg.extractor.object_tokens = 0
    build_pixelllm(cfg).save_pretrained(tmp_path / "captioner")
    kept = initial_model(TrainConfig(init_from=str(tmp_path / "captioner")))
    assert kept.proposal_head is None and kept.cfg.attribute_words == {}
    assert kept.cfg.loss.proposal_weight == cfg.loss.proposal_weight
    grown = initial_model(TrainConfig(init_from=str(tmp_path / "captioner"), model="pixelllm-tiny"))
    assert grown.proposal_head is not None and grown.cfg.attribute_words == load_config("pixelllm-tiny").attribute_words


@pytest.mark.usefixtures("one_thread")
def test_resume_after_sigkill_is_exact(tmp_path):
    """The config leaves `threads` unset; the killed run starts at 1 thread and the resumed one at 2, and the resumed
    run goes back to the checkpoint's count: CPU kernels may sum in another order on another count, which changes the
    last bits of the weights (measured on an Intel Xeon and an AMD EPYC: 1 against 2 threads)."""
    steps = 6
    straight = train(tiny_config(tmp_path / "straight", steps=steps))

    killed_dir = tmp_path / "killed"
    config = write_config(tiny_config(killed_dir, steps=steps), tmp_path / "killed.json")
    cmd = [sys.executable, "-m", "pixelllm.train", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed_dir / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the first run never wrote a checkpoint"
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] < steps, "the run finished before it was killed; nothing was resumed"
    assert state["threads"] == 1
    assert not (killed_dir / "final").exists()

    resumed = subprocess.run(
        cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "2"}, check=True, capture_output=True, text=True
    )
    assert "resuming at 1 threads" in resumed.stderr
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(killed_dir / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def strict_json(line: str) -> dict:
    """A JSON line as a strict parser reads it: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_a_nan_step_is_skipped_and_too_many_in_a_row_stop_without_saving(tmp_path):
    """lr 1e4 unclipped: the loss is NaN from step 2 on. Each such step is skipped (the weights stay those of step
    1), logged as null; `max_nonfinite_steps` of them in a row stop the run with an error that says what to do, the
    last good checkpoint kept (it used to train on, write NaN weights over it and exit 0)."""
    from pixelllm.train import TrainingDiverged

    def run(name: str, steps: int, **overrides) -> Path:
        cfg = tiny_config(tmp_path / name, steps=steps, lr=1e4, grad_clip=0, ckpt_every=1, **overrides)
        with single_thread():
            return train(cfg)

    one = load_file(str(run("one", 1) / "model.safetensors"))
    skipped = load_file(str(run("skip", 3, max_nonfinite_steps=5) / "model.safetensors"))
    assert all(torch.equal(skipped[k], v) for k, v in one.items())  # steps 2 and 3 changed nothing
    records = [strict_json(line) for line in (tmp_path / "skip" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"] is None, r["grad_norm"] is None, r["skipped_steps"]) for r in records] == [
        (1, False, False, 0),
        (2, True, True, 1),
        (3, True, True, 1),
    ]

    with pytest.raises(TrainingDiverged, match="2 steps in a row had a NaN or Inf loss or gradient .* Lower lr"):
        run("stop", 6, max_nonfinite_steps=2)
    state = torch.load(tmp_path / "stop" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 1 and all(torch.equal(state["model"][k], v) for k, v in one.items())
    assert not (tmp_path / "stop" / "final").exists()
    for line in (tmp_path / "stop" / "log.jsonl").read_text().splitlines():
        strict_json(line)


def test_a_periodic_checkpoint_that_falls_on_a_skipped_step_is_written_at_the_next_finite_one(tmp_path, monkeypatch):
    """Steps 2 and 3 of 5 not finite, a checkpoint every 3: the one due at 3 is written at 4 (it was dropped, the
    next one coming only at the end: up to twice `ckpt_every` steps of work lost to a kill)."""
    import pixelllm.train as training

    finite_steps, saved_at = iter([True, False, False, True, True]), []
    monkeypatch.setattr(training, "step_is_finite", lambda *args: next(finite_steps))
    save = training.save_checkpoint
    monkeypatch.setattr(
        training, "save_checkpoint", lambda path, m, o, step, rng: (saved_at.append(step), save(path, m, o, step, rng))
    )
    with single_thread():
        train(tiny_config(tmp_path / "run", steps=5, ckpt_every=3))
    assert saved_at == [4, 5]


def test_checkpoints_hold_what_save_pretrained_stores_and_resume_exactly(tmp_path, official_files, monkeypatch):
    """A model built from official files: its checkpoint leaves out the frozen weights those files give (the paper
    model's are most of its 16 GB), as `save_pretrained` does; a run resumed from it, or from a checkpoint of the
    whole model as runs wrote before, ends with the weights of a run never stopped."""
    import pixelllm.train as training

    official_tiny_config().save(tmp_path / "official.json")
    files = {
        "sam_checkpoint": str(official_files["sam_resized"]),
        "eva_checkpoint": str(official_files["eva_safetensors"]),
        "t5_path": str(official_files["t5"]),
    }

    def run(name: str, steps: int) -> Path:
        cfg = tiny_config(tmp_path / name, steps=steps, model=str(tmp_path / "official.json"), **files)
        with single_thread():
            return train(cfg)

    straight = load_file(str(run("straight", 3) / "model.safetensors"))
    run("resumed", 2)
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    assert saved.keys() == straight.keys()  # what the final model holds: no frozen SAM, no T5 but its LoRA
    assert not [k for k in saved if k.startswith("image_encoder.sam.") or k.startswith("language_model.t5.shared")]
    with monkeypatch.context() as m:  # as checkpoints were written before: the whole state
        m.setattr(training, "_saved_state", lambda model, sources: model.state_dict())
        run("whole", 2)
    for name in ("resumed", "whole"):
        resumed = load_file(str(run(name, 3) / "model.safetensors"))
        assert all(torch.equal(resumed[k], v) for k, v in straight.items()), name

    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    lost = next(k for k in state["model"] if k.startswith("point_head."))
    del state["model"][lost]
    torch.save(state, tmp_path / "resumed" / "checkpoint.pt")
    with pytest.raises(ValueError, match=rf"another shape than this config builds.*1 missing keys.*{re.escape(lost)}"):
        run("resumed", 4)


def test_ctrl_c_ends_the_step_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """`ckpt_every` is past the run's end, so only the Ctrl-C's checkpoint can hold its steps."""
    config = write_config(tiny_config(tmp_path / "run", steps=200, ckpt_every=1000), tmp_path / "run.json")
    cmd = [sys.executable, "-m", "pixelllm.cli", "train", str(config)]
    log, ckpt, stderr = tmp_path / "run" / "log.jsonl", tmp_path / "run" / "checkpoint.pt", tmp_path / "stderr.txt"
    with stderr.open("w") as err:
        # SIGINT as at a terminal: a background job (CI under nohup) inherits it ignored, and so would the run
        sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=sigint)
        deadline = time.time() + 240
        while (
            time.time() < deadline
            and proc.poll() is None
            and len(log.read_text().splitlines() if log.exists() else []) < 2
        ):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, stderr.read_text()[-2000:]
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 2 <= step < 200
    assert f"stopped at step {step} of 200, saved in {ckpt}: the same command resumes" in stderr.read_text()
    assert not (tmp_path / "run" / "final").exists()
    resumed = subprocess.run([*cmd, "--steps", str(step + 1)], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0 and f"resumed from {ckpt} at step {step}" in resumed.stderr, resumed.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_a_stop_asked_in_the_last_step_lets_the_run_finish(tmp_path, monkeypatch):
    """A Ctrl-C seen after step 1 of 3 stops there with a checkpoint; after the last step, the run just ends."""
    import pixelllm.train as training

    @contextlib.contextmanager
    def asked(enabled: bool):
        stop = threading.Event()
        stop.set()
        yield stop

    monkeypatch.setattr(training, "finish_step_on_ctrl_c", asked)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path / "early", steps=3))
    assert torch.load(tmp_path / "early" / "checkpoint.pt", weights_only=True)["step"] == 1
    assert not (tmp_path / "early" / "final").exists()
    assert (train(tiny_config(tmp_path / "last", steps=1)) / "model.safetensors").exists()


def test_ctrl_c_handling_is_off_where_sigint_is_ignored_and_put_back_after():
    from pixelllm.train import finish_step_on_ctrl_c

    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a job a script started in the background
    try:
        with finish_step_on_ctrl_c(True) as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        before = signal.default_int_handler  # as at a terminal (this test may run in such a job itself)
        signal.signal(signal.SIGINT, before)
        with finish_step_on_ctrl_c(True) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.time() + 10
            while not stop.is_set() and time.time() < deadline:
                time.sleep(0.01)
            assert stop.is_set() and signal.getsignal(signal.SIGINT) is before  # a second one interrupts at once
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_resume_at_another_thread_count_than_the_config_says_warns(tmp_path, caplog):
    first = tiny_config(tmp_path, steps=2, ckpt_every=1, threads=1)
    with single_thread():
        train(first)
        state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert state["threads"] == 1
        state["step"] = 1
        torch.save(state, tmp_path / "checkpoint.pt")
        with caplog.at_level("WARNING", logger="pixelllm.train"):
            train(dataclasses.replace(first, threads=2))
    assert any("written at 1 threads and this run uses 2" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("path", sorted((ROOT / "pixelllm/configs/train").glob("*.json")), ids=lambda p: p.name)
def test_shipped_training_configs_parse(path):
    cfg = TrainConfig.from_json(path)
    assert cfg.steps > 0 and cfg.batch_size > 0 and sum(cfg.tasks.values()) > 0


def test_a_config_that_is_not_json_names_its_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{\n  "steps": 4,\n}\n')
    with pytest.raises(ValueError, match=f"^{path} is not valid JSON: .*line 3"):
        TrainConfig.from_json(path)


def test_default_model_recipe_chains_its_stages():
    """`make train-default`: each stage starts from the model the step before saves (a stage, or the mean of stages
    saved before it), on scenes of its own."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("train-default:") :].split("\n\n")[0]
    saved: list[str] = []  # the models the recipe's steps save, in order
    stages: dict[str, TrainConfig] = {}  # config path: its stage
    for line in recipe.splitlines()[1:]:
        if train := re.search(r"pixelllm train (\S+\.json)$", line):
            stage = TrainConfig.from_json(ROOT / train[1])
            assert stage.init_from == (saved[-1] if saved else None), train[1]
            assert f"{stage.out_dir}/final" not in saved, train[1]
            saved.append(f"{stage.out_dir}/final")
            stages[train[1]] = stage
        elif average := re.search(r"scripts/average_weights\.py (.+) --out (\S+)$", line):
            inputs = average[1].split()
            assert len(inputs) >= 2 and set(inputs) <= set(saved) and average[2] not in saved, line
            saved.append(average[2])
        else:
            pytest.fail(f"train-default has a step this test does not know: {line.strip()}")
    assert len(stages) >= 2 and next(iter(stages)).endswith("/tiny.json")
    seeds = [s.seed for stage in stages.values() for s in stage.sources]
    assert len(seeds) == len(set(seeds))


def test_paper_recipe_runs_its_code_path_at_tiny_scale(tmp_path):
    recipe = TrainConfig.from_json(ROOT / "pixelllm/configs/train/t5xl_ln_coco.json")
    assert (recipe.model, recipe.batch_size, recipe.steps, recipe.lr, recipe.warmup_steps) == (
        "pixelllm-t5xl",
        256,
        10000,
        5e-5,
        250,
    )
    assert [s.weight for s in recipe.sources] == [2.0, 1.0] and recipe.tasks == {"caption": 1.0}
    assert {s.image_name for s in recipe.sources} == {"{image_id:0>12}.jpg"}  # COCO's file names
    data = write_dataset(tmp_path / "ln", n=4, seed=5)
    for line in (data / "narratives.jsonl").read_text().splitlines():  # named as COCO names its images
        image_id = json.loads(line)["image_id"]
        (data / "images" / f"{image_id}.jpg").rename(data / "images" / f"{image_id:0>12}.jpg")
    sources = [
        dataclasses.replace(s, path=str(data / "narratives.jsonl"), image_root=str(data / "images"))
        for s in recipe.sources
    ]
    small = dataclasses.replace(
        recipe,
        model="pixelllm-tiny",
        sam_checkpoint=None,
        eva_checkpoint=None,
        t5_path=None,
        out_dir=str(tmp_path / "run"),
        sources=sources,
        batch_size=4,
        steps=2,
        warmup_steps=1,
        ckpt_every=1,
        precision="fp32",
    )
    final = train(small)
    assert (final / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"steps": "500"}, "TrainConfig key 'steps' is '500': it must be int"),
        ({"lr": True}, "TrainConfig key 'lr' is True: it must be float"),
        ({"tasks": ["caption"]}, r"TrainConfig key 'tasks' is \['caption'\]: it must be dict\[str, float\]"),
        ({"sources": [{"weight": "2"}]}, "SourceConfig key 'weight' is '2': it must be float"),
        ({"sources": [{"prompt": 3}]}, "SourceConfig key 'prompt' is 3: it must be str | None"),
        ({"sources": {"kind": "narratives"}}, "'sources' is a list of objects"),
        ({"sources": ["synthetic"]}, "a SourceConfig must be a JSON object of its keys, got 'synthetic'"),
        (["steps", 4], "a training config is a JSON object"),
        ({"log_every": 0}, "log_every and ckpt_every are 0 and 100: give steps between log lines"),
        ({"ckpt_every": 0}, "log_every and ckpt_every are 10 and 0"),
    ],
)
def test_a_config_of_wrong_types_names_the_key_before_anything_loads(tmp_path, data, message):
    """A string for a number, a list for an object, 0 steps between log lines: each used to pass, then fail in the
    loop (a TypeError or ZeroDivisionError, after the model had loaded) with a traceback and no word of the key."""
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_json(path)


def test_a_model_config_of_wrong_types_names_the_key():
    data = load_config("pixelllm-tiny").to_dict()
    data["language_model"]["max_text_tokens"] = 48.5
    with pytest.raises(ValueError, match="LanguageModelConfig key 'max_text_tokens' is 48.5: it must be int"):
        PixelLLMConfig.from_dict(data)


def test_config_refuses_unknown_tasks_and_weights_that_cannot_draw():
    with pytest.raises(ValueError, match="unknown task.*refering"):
        TrainConfig(tasks={"refering": 1.0})
    for bad in (dict(tasks={}), dict(tasks={"caption": 0.0}), dict(tasks={"caption": -1.0, "referring": 2.0})):
        with pytest.raises(ValueError, match="weights of 'tasks'"):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="weights of 'sources'"):
        TrainConfig(sources=[SourceConfig(weight=0.0)])
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lr", 0.0, "lr is 0.0: give the peak learning rate, a positive number"),
        ("lr", float("nan"), "lr is nan"),
        ("weight_decay", -0.1, "weight_decay is -0.1: give 0"),
        ("warmup_steps", -1, "warmup_steps is -1: give 0"),
        ("max_nonfinite_steps", 0, "max_nonfinite_steps is 0: give how many steps in a row"),
    ],
)
def test_config_refuses_an_optimizer_setting_it_cannot_train_with(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})


def test_config_refuses_a_precision_clip_or_accumulation_it_cannot_honour():
    with pytest.raises(ValueError, match="precision is 'fp16': it must be one of fp32, bf16"):
        TrainConfig(precision="fp16")  # it used to train in fp32, at twice the memory, without a word
    with pytest.raises(ValueError, match="grad_clip is -1.0"):
        TrainConfig(grad_clip=-1.0)
    for steps in (0, 33):
        with pytest.raises(ValueError, match=f"grad_accum_steps is {steps}: it must be between 1 and batch_size"):
            TrainConfig(grad_accum_steps=steps, batch_size=32)


def test_grad_clip_zero_or_none_trains_unclipped(tmp_path):
    """0 is "no clipping", as for most trainers (clipping to norm 0 zeroed every gradient: no step moved): 0 and
    None train exactly as a clip no gradient reaches."""

    def run(clip: float | None) -> dict[str, torch.Tensor]:
        cfg = tiny_config(tmp_path / str(clip), steps=2, grad_clip=clip)
        with single_thread():
            return load_file(str(train(cfg) / "model.safetensors"))

    unclipped = run(1e9)
    grad_norms = [json.loads(line)["grad_norm"] for line in (tmp_path / "1000000000.0" / "log.jsonl").open()]
    assert min(grad_norms) > 1.0  # the default clip (1.0) would have acted
    cfg = tiny_config(tmp_path, steps=2)
    torch.manual_seed(cfg.seed)
    initial = initial_model(cfg).point_head.state_dict()
    assert any(not torch.equal(v, unclipped[f"point_head.{k}"]) for k, v in initial.items())
    for clip in (0.0, None):
        weights = run(clip)
        for key, value in unclipped.items():
            assert torch.equal(weights[key], value), (clip, key)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is tested on Linux")
def test_grad_accum_steps_on_one_process_learn_what_more_processes_do(tmp_path):
    """batch 8 as 4 passes on one process, and as 2 processes of 2 passes each (DDP, gradients all-reduced after
    the last pass): the same micro-batches, the same gradient, the same step."""
    one = tiny_config(tmp_path / "one", steps=1, batch_size=8, grad_accum_steps=4)
    ddp = dataclasses.replace(one, out_dir=str(tmp_path / "ddp"), grad_accum_steps=2)
    torchrun_train(write_config(ddp, tmp_path / "ddp.json"))
    with single_thread():
        train(one)
    (a,), (b,) = (
        [json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("one", "ddp")
    )
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    one_weights = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    ddp_weights = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    for k, v in one_weights.items():
        torch.testing.assert_close(v, ddp_weights[k], rtol=0, atol=1e-5, msg=k)


def narratives_source(tmp_path: Path) -> SourceConfig:
    data = write_dataset(tmp_path / "ln", n=3, seed=5)
    return SourceConfig(kind="narratives", path=str(data / "narratives.jsonl"), image_root=str(data / "images"))


def test_narratives_sources_check_their_images_and_read_glob_shards(tmp_path, tiny_model):
    from pixelllm.train import SceneSource

    source = narratives_source(tmp_path)
    data = Path(source.path).parent
    lines = Path(source.path).read_text().splitlines()
    for i, line in enumerate(lines[:2]):  # two of its records, one per shard
        (data / f"shard-{i}-of-2.jsonl").write_text(line + "\n", encoding="utf-8")
    sharded = dataclasses.replace(source, path=str(data / "shard-*-of-2.jsonl"))
    loaded = SceneSource(sharded, 160, tiny_model.tokenizer, Path())
    assert len(loaded) == 2 and loaded[1].caption_ids
    missing = json.loads(lines[0])["image_id"]
    (data / "images" / f"{missing}.jpg").unlink()
    with pytest.raises(ValueError, match=rf"1 of the 3 images .*{missing}\.jpg"):
        SceneSource(source, 160, tiny_model.tokenizer, Path())
    (data / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no scenes"):
        SceneSource(dataclasses.replace(source, path=str(data / "empty.jsonl")), 160, tiny_model.tokenizer, Path())
    for absent in ("none-*.jsonl", "none.jsonl"):  # a glob or a file: the error names the key to fix
        with pytest.raises(ValueError, match="no file matches .*'narratives' source's 'path'"):
            SceneSource(dataclasses.replace(source, path=str(data / absent)), 160, tiny_model.tokenizer, Path())


def test_a_narratives_file_whose_name_looks_like_a_glob_is_read_as_named(tmp_path, tiny_model):
    """ "ln [v2]/narratives.jsonl" is a file: read it (glob took "[v2]" for a character class and found nothing)."""
    from pixelllm.train import SceneSource

    source = narratives_source(tmp_path)
    data = Path(source.path).parent.rename(tmp_path / "ln [v2]")
    named = SceneSource(
        dataclasses.replace(source, path=str(data / "narratives.jsonl"), image_root=str(data / "images")),
        160,
        tiny_model.tokenizer,
        Path(),
    )
    assert len(named) == 3


def test_a_record_whose_image_cannot_be_read_is_skipped_for_the_next(tmp_path, tiny_model, caplog):
    from pixelllm.train import SceneSource

    source = narratives_source(tmp_path)
    loaded = SceneSource(source, 160, tiny_model.tokenizer, Path())
    second = loaded[1].caption_ids
    broken = loaded.image_path(loaded.records.image_ids[0])
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated JPEG
    with caplog.at_level("WARNING", logger="pixelllm.train"):
        assert loaded[0].caption_ids == second and loaded[0].caption_ids == second
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "pixelllm.train"]  # once per record
    assert f"cannot read the image {broken}" in warning and "the next one trains in its place" in warning
    for image_id in loaded.records.image_ids:
        loaded.image_path(image_id).write_bytes(b"not an image")
    with pytest.raises(ValueError, match="no image of .* can be read"):
        loaded[2]


def test_coco_captions_become_a_captions_only_narratives_source(tmp_path, tiny_model, capsys, caplog):
    """`pixelllm data coco-captions`, then the paper recipe's COCO source reads it with its image_name."""
    from PIL import Image

    from pixelllm.cli import main
    from pixelllm.train import SceneSource, _check_narratives

    images = tmp_path / "train2017"
    images.mkdir()
    for image_id in (9, 25):
        Image.new("RGB", (64, 48), (image_id, 90, 40)).save(images / f"{image_id:012d}.jpg")
    captions = [(1, 9, "A dog  on a\nbeach."), (2, 9, "a brown dog"), (3, 25, "Two cats.")]
    coco = {
        "images": [{"id": 9}, {"id": 25}],
        "annotations": [{"id": i, "image_id": m, "caption": c} for i, m, c in captions],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "coco" / "captions_as_ln.jsonl"
    assert main(["data", "coco-captions", str(tmp_path / "captions.json"), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote 3 captions to {out}\n"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["image_id"], r["caption"], r["traces"]) for r in records] == [
        (9, "A dog on a beach.", []), (9, "a brown dog", []), (25, "Two cats.", [])
    ]  # fmt: skip
    config = json.loads((ROOT / "pixelllm/configs/train/t5xl_ln_coco.json").read_text())
    coco_source = SourceConfig(**{**config["sources"][1], "path": str(out), "image_root": str(images)})
    source = SceneSource(coco_source, 160, tiny_model.tokenizer, Path())
    assert len(source) == 3 and not source[2].caption_located.any()
    with caplog.at_level("INFO", logger="pixelllm.train"):
        _check_narratives(source, 48)
    assert f"{out}: 3 records, with no timed utterances: captions only, no word located" in caplog.text

    (tmp_path / "instances.json").write_text(json.dumps({"images": []}))
    assert main(["data", "coco-captions", str(tmp_path / "instances.json"), "--out", str(out)]) == 2
    assert "is not a COCO captions file: it has no 'annotations' list" in capsys.readouterr().err


def test_an_image_name_that_does_not_format_names_the_key(tmp_path, tiny_model):
    from pixelllm.train import SceneSource

    source = narratives_source(tmp_path)
    for template in ("{id}.jpg", "{image_id:012d}.jpg", "{0}.jpg"):  # the ids are strings: 'd' does not apply
        with pytest.raises(ValueError, match=r"image_name .* cannot be formatted with image_id .*'\{image_id:0>12\}"):
            SceneSource(dataclasses.replace(source, image_name=template), 160, tiny_model.tokenizer, Path())


def test_a_source_whose_utterances_are_not_its_captions_words_warns(tmp_path, tiny_model, caplog):
    from pixelllm.train import SceneSource, _check_narratives

    source = narratives_source(tmp_path)
    records = [json.loads(line) for line in Path(source.path).read_text().splitlines()]
    for record in records:
        record["caption"] = "something else altogether"
    Path(source.path).write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level("INFO", logger="pixelllm.train"):
        _check_narratives(SceneSource(source, 160, tiny_model.tokenizer, Path()), 48)
    assert "of 3 checked, 0% of the utterances are found in their captions and 0% located" in caplog.text
    assert "only 0% of the utterances are found in their captions, in order" in caplog.text


def rewrite_records(source: SourceConfig, change) -> None:
    """Apply `change(record)` to every record of the narratives file of `source`."""
    records = [json.loads(line) for line in Path(source.path).read_text().splitlines()]
    for record in records:
        change(record)
    Path(source.path).write_text("".join(json.dumps(r) + "\n" for r in records))


def shift_trace_times(record: dict, scale: float = 1.0, offset: float = 0.0) -> None:
    for segment in record["traces"]:
        for point in segment:
            point["t"] = point["t"] * scale + offset


@pytest.mark.parametrize(
    "change, warning",
    [
        (lambda r: shift_trace_times(r, scale=1000), "e+03x as long as the utterances they go with"),
        (lambda r: shift_trace_times(r, offset=1.7e9), "only 0% of the utterances are located by the trace, though"),
        (lambda r: r.update(caption=" "), "3 of 3 captions checked are empty: each teaches the model to say nothing"),
    ],
    ids=["trace in ms", "trace on another clock", "empty captions"],
)
def test_narratives_timed_on_other_clocks_or_with_empty_captions_warn(tmp_path, tiny_model, caplog, change, warning):
    """Mistakes of a user's own export that load without an error but train wrongly are said at the start."""
    from pixelllm.train import SceneSource, _check_narratives

    source = narratives_source(tmp_path)
    with caplog.at_level("WARNING", logger="pixelllm.train"):
        _check_narratives(SceneSource(source, 160, tiny_model.tokenizer, Path()), 48)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # the data as written: nothing to say
    rewrite_records(source, change)
    with caplog.at_level("WARNING", logger="pixelllm.train"):
        _check_narratives(SceneSource(source, 160, tiny_model.tokenizer, Path()), 48)
    assert warning in caplog.text


def test_narratives_with_traces_in_pixels_are_refused(tmp_path, tiny_model):
    """Pixels clipped to [0, 1] would put every word in the image's corner: the run does not start."""
    from pixelllm.train import SceneSource, _check_narratives

    def to_pixels(record: dict) -> None:
        for segment in record["traces"]:
            for point in segment:
                point["x"], point["y"] = point["x"] * 640, point["y"] * 480

    source = narratives_source(tmp_path)
    rewrite_records(source, to_pixels)
    with pytest.raises(ValueError, match="of the trace points checked lie outside the image: .* divide pixel"):
        _check_narratives(SceneSource(source, 160, tiny_model.tokenizer, Path()), 48)


def test_captions_longer_than_max_text_tokens_warn_and_the_config_can_raise_it(tmp_path, caplog):
    source = narratives_source(tmp_path)
    records = [json.loads(line) for line in Path(source.path).read_text().splitlines()]
    for record in records[:2]:
        record["caption"] = " ".join([record["caption"]] * 6)  # well past pixelllm-tiny's 48 tokens
    Path(source.path).write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = tiny_config(tmp_path / "run", steps=1, sources=[source])
    with single_thread(), caplog.at_level("INFO", logger="pixelllm.train"):
        train(cfg)
    (stats,) = [r.getMessage() for r in caplog.records if "utterances are found" in r.getMessage()]
    assert stats.endswith(
        ": 3 records; of 3 checked, 100% of the utterances are found in their captions and 100% located by the trace"
    )
    (warning,) = [r.getMessage() for r in caplog.records if "max_text_tokens" in r.getMessage()]
    assert "2 of 3 captions checked are longer than the model's max_text_tokens, 48 tokens" in warning
    longest = int(re.search(r"the longest: (\d+)", warning).group(1))
    assert longest > 48 and "set max_text_tokens in the training config" in warning

    caplog.clear()
    with single_thread(), caplog.at_level("WARNING", logger="pixelllm.train"):
        final = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "whole"), max_text_tokens=longest))
    assert not [r for r in caplog.records if "max_text_tokens" in r.getMessage()]
    assert PixelLLM.from_pretrained(final).cfg.language_model.max_text_tokens == longest
    with pytest.raises(ValueError, match="max_text_tokens is 1"):
        TrainConfig(max_text_tokens=1)


def test_a_resumed_run_reads_its_narratives_index_back(tmp_path, caplog):
    """The run directory keeps each narratives source's index: a resumed run does not read the split again."""
    cfg = tiny_config(tmp_path / "run", steps=1, sources=[narratives_source(tmp_path)])
    with single_thread():
        train(cfg)
    cache = tmp_path / "run" / "narratives-index-0.json"
    assert json.loads(cache.read_text())["paths"] == [str(Path(cfg.sources[0].path).resolve())]
    with single_thread(), caplog.at_level("INFO", logger="pixelllm.data.narratives"):
        train(dataclasses.replace(cfg, steps=2))
    assert f"read the index of 3 narratives from {cache}" in caplog.text


def test_a_sources_prompt_goes_with_every_caption_it_gives(tmp_path, tiny_model):
    """A narrative has no objects, so every task drawn from it gives a caption, with the source's prompt."""
    from pixelllm.train import SceneSource, batches_for_step

    source = dataclasses.replace(narratives_source(tmp_path), prompt="SOURCE PROMPT: ")
    cfg = TrainConfig(sources=[source], batch_size=8)  # the default mix: all four tasks
    sources = [SceneSource(source, tiny_model.cfg.image_size, tiny_model.tokenizer, Path())]
    (batch,) = batches_for_step(0, cfg, sources, tiny_model.cfg, tiny_model.tokenizer)
    assert batch["prompts"] == ["SOURCE PROMPT: "] * 8


def test_a_short_run_prepares_only_the_synthetic_scenes_it_draws(tiny_model):
    """Scenes are a pure function of (seed, index): a 2-step run of a million-scene source prepares its 8 draws."""
    from pixelllm.train import SceneSource, batches_for_step, prepare_synthetic_sources, step_draws

    source = SourceConfig(kind="synthetic", seed=3, num_scenes=1_000_000)
    cfg = TrainConfig(sources=[source], batch_size=4, steps=3)
    args = (tiny_model.cfg.image_size, tiny_model.tokenizer, Path())
    ahead = [SceneSource(source, *args)]
    prepare_synthetic_sources(cfg, ahead, start=1)
    drawn = {index for step in (1, 2) for _, _, index, _ in step_draws(step, cfg, [source.num_scenes])}
    assert ahead[0].scenes.keys() == drawn and 2 <= len(drawn) <= 8
    lazy = [SceneSource(source, *args)]  # prepared at first access instead: the same batch
    for step in (1, 2):
        ((a,), (b,)) = (batches_for_step(step, cfg, s, tiny_model.cfg, tiny_model.tokenizer) for s in (ahead, lazy))
        assert a.keys() == b.keys()
        for key in a:
            x, y = (v if isinstance(v, list) else [v] for v in (a[key], b[key]))
            assert len(x) == len(y) and all(torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(x, y))
    assert ahead[0].scenes.keys() == lazy[0].scenes.keys() == drawn
    with pytest.raises(ValueError, match="num_scenes is -1: give it at least 1"):
        SceneSource(dataclasses.replace(source, num_scenes=-1), *args)


def test_resume_drops_the_log_lines_written_after_its_checkpoint(tmp_path):
    train(tiny_config(tmp_path, steps=2))
    saved = (tmp_path / "checkpoint.pt").read_bytes()  # at step 2
    train(tiny_config(tmp_path, steps=3))  # logs step 3, then a kill before the next checkpoint is as if:
    (tmp_path / "checkpoint.pt").write_bytes(saved)
    with (tmp_path / "log.jsonl").open("a") as log:
        log.write('{"step": 4, "lo')  # and a torn line
    train(tiny_config(tmp_path, steps=4))
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is tested on Linux")
def test_ddp_two_processes_gloo(tmp_path):
    torchrun_train(write_config(tiny_config(tmp_path / "ddp", steps=2), tmp_path / "ddp.json"))
    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is tested on Linux")
def test_ddp_resume_with_dropout_is_exact(tmp_path):
    """With dropout every step draws, each process its own masks (the same masks on every process would be one
    process's regularization); a resumed run gets each process's random state back."""
    model = load_config("pixelllm-tiny")
    t5 = {**model.language_model.t5, "dropout_rate": 0.1}
    model = dataclasses.replace(model, language_model=dataclasses.replace(model.language_model, t5=t5))
    model.save(tmp_path / "tiny-dropout.json")

    def run(out_dir: Path, steps: int) -> None:
        cfg = tiny_config(out_dir, steps=steps, model=str(tmp_path / "tiny-dropout.json"), batch_size=2)
        torchrun_train(write_config(cfg, tmp_path / f"{out_dir.name}{steps}.json"))

    run(tmp_path / "straight", steps=3)
    run(tmp_path / "resumed", steps=2)
    rng = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"])  # one per process, each its own
    run(tmp_path / "resumed", steps=3)
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_each_process_resumes_at_its_own_random_state(tmp_path, tiny_model, caplog):
    from pixelllm.train import load_checkpoint, rng_states, save_checkpoint

    model = tiny_model  # loaded back with its own weights: left as it was
    optimizer = torch.optim.AdamW(model.parameters())
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states += rng_states(torch.device("cpu"), distributed=False)
    save_checkpoint(tmp_path / "checkpoint.pt", model, optimizer, 5, states)
    cpu = torch.device("cpu")
    for rank in (0, 1):
        assert load_checkpoint(tmp_path / "checkpoint.pt", model, optimizer, cpu, rank=rank, world=2) == 5
        assert torch.equal(torch.get_rng_state(), states[rank]["cpu"])
    assert not caplog.records
    load_checkpoint(tmp_path / "checkpoint.pt", model, optimizer, cpu, rank=0, world=3)
    assert "written by 2 processes and this run has 3" in caplog.text


def test_resume_on_a_machine_with_fewer_cpus_than_the_checkpoints_threads_caps_them(tmp_path, tiny_model, caplog):
    """`threads` unset: the run goes back to the checkpoint's thread count, but not past this machine's CPUs."""
    from pixelllm.train import load_checkpoint, rng_states, save_checkpoint

    optimizer = torch.optim.AdamW(tiny_model.parameters())
    save_checkpoint(tmp_path / "checkpoint.pt", tiny_model, optimizer, 1, rng_states(torch.device("cpu"), False))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["threads"] = 4096  # written on a larger machine
    torch.save(state, tmp_path / "checkpoint.pt")
    cpus = os.cpu_count()
    with single_thread(), caplog.at_level("WARNING", logger="pixelllm.train"):
        load_checkpoint(tmp_path / "checkpoint.pt", tiny_model, optimizer, torch.device("cpu"))
        assert torch.get_num_threads() == cpus
    assert f"written at 4096 threads and this machine has {cpus} CPUs: resuming at {cpus} threads" in caplog.text


def test_a_restart_before_the_first_checkpoint_starts_the_log_over(tmp_path):
    """Killed before its first checkpoint, a run starts again at step 0: the lines of the first try go."""
    cfg = tiny_config(tmp_path, steps=2, ckpt_every=100)
    train(cfg)
    (tmp_path / "checkpoint.pt").unlink()  # as if killed at step 2, before a checkpoint at step 100
    train(cfg)
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resuming_with_a_config_of_another_model_shape_says_to_start_over(tmp_path):
    """A checkpoint of a 160 px model does not load into a 192 px one: an error that says what to do (it was a
    RuntimeError from load_state_dict, which `pixelllm train` printed as a traceback), the run's config kept."""
    first = tiny_config(tmp_path, steps=1)
    with single_thread():
        train(first)
        recorded = (tmp_path / "train_config.json").read_text()
        with pytest.raises(ValueError, match="holds a model of another shape than this config builds: give a new"):
            train(dataclasses.replace(first, steps=2, image_size=192))
    assert (tmp_path / "train_config.json").read_text() == recorded


def test_the_saved_model_captions_with_the_configs_caption_prompt(tmp_path, caplog):
    """Sources trained on another prompt than the model's caption prompt warn; `caption_prompt` sets the saved
    model's (a source's `prompt` used to train captions the saved model never asked for)."""
    source = SourceConfig(kind="synthetic", seed=3, num_scenes=6, prompt="LONG: ")
    with single_thread(), caplog.at_level("WARNING", logger="pixelllm.train"):
        train(tiny_config(tmp_path / "a", steps=1, sources=[source]))
        assert "no source trains captions with 'a short image caption: ', the prompt the saved" in caplog.text
        caplog.clear()
        final = train(tiny_config(tmp_path / "b", steps=1, sources=[source], caption_prompt="LONG: "))
        assert not [r for r in caplog.records if r.name == "pixelllm.train"]
    assert load_config(final / "config.json").caption_prompt == "LONG: "


def test_a_run_resumed_under_another_config_warns_and_a_finished_one_says_so(tmp_path, caplog):
    first = tiny_config(tmp_path, steps=2)
    with single_thread(), caplog.at_level("INFO", logger="pixelllm.train"):
        train(first)
        train(dataclasses.replace(first, log_every=5, ckpt_every=7))  # bookkeeping: what is learnt is the same
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        train(dataclasses.replace(first, steps=3, lr=5e-4))
        (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert "resumes a run started with another config: lr, steps changed" in warning
        caplog.clear()
        weights = tmp_path / "final" / "model.safetensors"
        written = weights.stat().st_mtime_ns
        time.sleep(0.01)
        train(dataclasses.replace(first, steps=3, lr=5e-4))
        assert f"nothing to train: {tmp_path} is at step 3 of 3, its model in {tmp_path / 'final'}" in caplog.text
        assert "WARNING" not in caplog.text  # the config recorded is the one resumed with
        assert weights.stat().st_mtime_ns == written  # the final model is left as it is
        shutil.rmtree(tmp_path / "final")
        assert train(dataclasses.replace(first, steps=3, lr=5e-4)) == tmp_path / "final"
    assert PixelLLM.from_pretrained(tmp_path / "final")  # a final model removed is written again


def test_a_weight_decay_changed_on_resume_applies(tmp_path):
    """The warning on resuming under another config says the new values apply: weight decay too, not the value the
    checkpoint's optimizer groups were saved with."""
    first = tiny_config(tmp_path, steps=2, weight_decay=0.0)
    with single_thread():
        train(first)
        train(dataclasses.replace(first, steps=3, weight_decay=0.5))
    groups = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5] * len(groups)


def test_a_final_model_cut_off_while_saving_is_written_again(tmp_path, monkeypatch):
    """A save stopped midway (a full disk, Ctrl-C) leaves no half `final/` for the next run to take as done."""
    import pixelllm.checkpoints

    cfg = tiny_config(tmp_path, steps=1)
    real_save_file = pixelllm.checkpoints.save_file

    def disk_full(state, path, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(pixelllm.checkpoints, "save_file", disk_full)
    with single_thread(), pytest.raises(OSError, match="No space left"):
        train(cfg)
    assert not (tmp_path / "final").exists()
    monkeypatch.setattr(pixelllm.checkpoints, "save_file", real_save_file)
    with single_thread():
        final = train(cfg)  # nothing to train, and no final model yet: it is saved
    assert PixelLLM.from_pretrained(final) and not (tmp_path / "final.partial").exists()


def test_the_readmes_fine_tuning_config_trains_from_the_shipped_model(tmp_path):
    """The README's config, its data paths pointed at the README's one record and an image, for two steps."""
    from PIL import Image

    readme = (ROOT / "README.md").read_text()
    record = readme.split("Training data is Localized-Narratives JSONL", 1)[1].split("```json\n", 1)[1].split("```")[0]
    shown = readme.split("To fine-tune the shipped default model", 1)[1].split("```json\n", 1)[1].split("```")[0]
    data = json.loads(shown)
    assert data["init_from"] == "weights/pixelllm-tiny"
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), (30, 120, 40)).save(tmp_path / "images" / "img001.jpg")
    (tmp_path / "train.jsonl").write_text(record)
    data["init_from"] = str(ROOT / data["init_from"])
    data["sources"][0].update(path=str(tmp_path / "train.jsonl"), image_root=str(tmp_path / "images"))
    data.update(out_dir=str(tmp_path / "run"), steps=2, batch_size=2)
    (tmp_path / "my-model.json").write_text(json.dumps(data))
    with single_thread():
        final = train(TrainConfig.from_json(tmp_path / "my-model.json"))
    model = PixelLLM.from_pretrained(final)
    assert model.name == data["name"] == "my-model"  # what the service reports as "model"
    saved = load_config(final / "config.json")  # built from the config alone, it still finds the preset's tokenizer
    text = "a small red circle on the left."
    assert saved.tokenizer == "pixelllm-tiny" and default_tokenizer(saved).encode(text) == model.tokenizer.encode(text)
    for name in ("", "  ", 2024):
        with pytest.raises(ValueError, match="name must be a non-empty string"):
            TrainConfig(name=name)


def test_training_pads_images_as_the_models_config_says(tmp_path, monkeypatch):
    """A model whose `image_padding` is "mean" trains on images padded with SAM's pixel mean (as it will be served),
    synthetic scenes and narratives alike."""
    import pixelllm.train as training

    model = dataclasses.replace(load_config("pixelllm-tiny"), image_padding="mean")
    model.save(tmp_path / "tiny-mean.json")
    seen = []
    accumulate = training.accumulate_gradients
    monkeypatch.setattr(
        training, "accumulate_gradients", lambda net, batches, *a: seen.extend(batches) or accumulate(net, batches, *a)
    )
    sources = [SourceConfig(kind="synthetic", seed=3, num_scenes=6), narratives_source(tmp_path)]
    with single_thread():
        train(tiny_config(tmp_path / "run", steps=2, model=str(tmp_path / "tiny-mean.json"), sources=sources))
    mean = (torch.tensor(SAM_PIXEL_MEAN) * 255).round() / 255
    corners = torch.stack([batch["images"][:, :, -1, -1] for batch in seen]).flatten(0, 1)  # (N, 3)
    assert len(corners) == 8 and (corners == mean).all(dim=1).sum() >= 6, corners
