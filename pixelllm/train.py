"""Training: `pixelllm train CONFIG.json` (single process) or `torchrun --nproc_per_node N -m pixelllm.train CONFIG`.

Read top to bottom: configuration, data, model, optimizer, the loop. The batch of step s is a pure function
of (seed, s), and checkpoints hold model, optimizer and RNG state, so a killed run resumes exactly.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .build import build_pixelllm, default_tokenizer, load_model
from .checkpoints import _saved_state, resize_input, state_mismatches
from .config import _from_dict, load_config
from .data.narratives import NarrativesIndex, word_locations
from .data.synthetic import generate_scene, scene_seed
from .data.tasks import TASKS, PreparedScene, collate, make_sample, prepare_record, prepare_scene
from .modeling.pixelllm import PixelLLM
from .tokenizer import Tokenizer
from .transforms import to_rgb_array

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- configuration
@dataclass
class SourceConfig:
    """A data source. `synthetic`: scenes from our generator. `narratives`: Localized-Narratives JSONL (`path`, or a
    glob of shards such as `coco_train_localized_narratives-*.jsonl`) with images `<image_root>/<image_name>`
    (COCO captions: the same schema with empty traces)."""

    kind: str = "synthetic"
    weight: float = 1.0
    seed: int = 0
    num_scenes: int = 1000
    path: str | None = None
    image_root: str | None = None
    # an image's file name, formatted with the record's image_id; COCO's are "{image_id:0>12}.jpg"
    image_name: str = "{image_id}.jpg"
    prompt: str | None = None  # caption prompt for this source (default: the model's caption_prompt)


PRECISIONS = ("fp32", "bf16")
DEFAULT_PRESET = "pixelllm-tiny"  # what a config without `model` or `init_from` builds


@dataclass
class TrainConfig:
    model: str | None = None  # a preset (or config file) to build (DEFAULT_PRESET); with init_from: `initial_model`
    name: str | None = None  # the saved model's name, which the service reports; default: the starting model's
    init_from: str | None = None  # a saved model directory to start from (a second stage), instead of `model`
    image_size: int | None = None  # train at this input size (position embeddings resampled); default: the model's
    object_tokens: int | None = None  # give the model up to this many object tokens (`ExtractorConfig`) if it has none
    object_readings: bool = False  # give the model object readings (`ExtractorConfig`) if it has none
    sam_checkpoint: str | None = None
    eva_checkpoint: str | None = None
    t5_path: str | None = None
    out_dir: str = "runs/tiny"
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    tasks: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    batch_size: int = 32
    grad_accum_steps: int = 1  # each process's share of a batch goes through the model in this many passes
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float | None = 1.0  # the gradient's largest norm; 0 or None: not clipped
    max_nonfinite_steps: int = 10  # stop after this many steps in a row with a NaN or Inf loss or gradient
    precision: str = "fp32"  # "fp32", or "bf16" autocast
    point_weight: float | None = None
    max_text_tokens: int | None = None  # train (and caption) up to this many tokens with EOS; default: the model's
    caption_prompt: str | None = None  # the saved model's, and sources' without one (default: the model's)
    log_every: int = 10
    ckpt_every: int = 100
    seed: int = 0
    threads: int | None = None  # torch threads; unset: torch's default, or on resume the checkpoint's count

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in 'tasks': the tasks are {', '.join(TASKS)}")
        for name, weights in (("tasks", list(self.tasks.values())), ("sources", [s.weight for s in self.sources])):
            if not weights or any(not w >= 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"the weights of '{name}' must be >= 0 with a positive sum, got {weights}")
        if self.batch_size < 1 or self.steps < 0:
            raise ValueError(f"need batch_size >= 1 and steps >= 0, got {self.batch_size} and {self.steps}")
        if not 1 <= self.grad_accum_steps <= self.batch_size:
            raise ValueError(
                f"grad_accum_steps is {self.grad_accum_steps}: it must be between 1 and batch_size ({self.batch_size})"
            )
        if not self.lr > 0:
            raise ValueError(f"lr is {self.lr}: give the peak learning rate, a positive number (e.g. 1e-4)")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay is {self.weight_decay}: give 0 (none) or more")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps is {self.warmup_steps}: give 0 (no warmup) or more")
        if self.max_nonfinite_steps < 1:
            raise ValueError(
                f"max_nonfinite_steps is {self.max_nonfinite_steps}: give how many steps in a row may have a NaN "
                "or Inf loss or gradient (each skipped) before training stops, at least 1"
            )
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ValueError(f"grad_clip is {self.grad_clip}: give the largest gradient norm, or 0 for no clipping")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision is {self.precision!r}: it must be one of {', '.join(PRECISIONS)}")
        if self.name is not None and not (isinstance(self.name, str) and self.name.strip()):
            raise ValueError(f"name must be a non-empty string (the saved model's name), got {self.name!r}")
        if self.log_every < 1 or self.ckpt_every < 1:
            raise ValueError(
                f"log_every and ckpt_every are {self.log_every} and {self.ckpt_every}: give steps between log lines "
                "and between checkpoints, at least 1 (the last step is always logged and saved)"
            )
        if self.max_text_tokens is not None and self.max_text_tokens < 2:
            raise ValueError(f"max_text_tokens is {self.max_text_tokens}: a caption needs at least 2 (a token and EOS)")

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("sources", []), list):
            raise ValueError(f"{path}: a training config is a JSON object whose 'sources' is a list of objects")
        data["sources"] = [_from_dict(SourceConfig, s) for s in data.get("sources", [{}])]
        return _from_dict(cls, data)


# ----------------------------------------------------------------------------- data
def synthetic_scene(seed: int, index: int, image_size: int, tokenizer: Tokenizer, padding: str) -> PreparedScene:
    return prepare_scene(generate_scene(scene_seed(seed, index)), image_size, tokenizer, padding)


def _prepare_synthetic(args: tuple[int, int, int, str, str]) -> PreparedScene:
    seed, index, image_size, padding, tokenizer_json = args  # a worker process reads the tokenizer from its file
    return synthetic_scene(seed, index, image_size, Tokenizer.from_file(tokenizer_json), padding)


class SceneSource:
    """Prepared scenes of one source, by index. Synthetic scenes are prepared when first asked for, or ahead in
    parallel by `prepare`; narratives are read from disk at each access (a `NarrativesIndex`), and one whose image
    cannot be read (a truncated file) is skipped with a warning: the next record stands in, so a run goes on (and
    resumes the same). `progress`: show a bar while the narratives files are read at start; `index_cache`: where
    their index is saved and read back from (`NarrativesIndex`'s `cache`); `padding`: the model's `image_padding`."""

    def __init__(
        self,
        cfg: SourceConfig,
        image_size: int,
        tokenizer: Tokenizer,
        tokenizer_file: Path,
        progress: bool = False,
        index_cache: Path | None = None,
        padding: str = "black",
    ):
        self.cfg, self.image_size, self.tokenizer, self.tokenizer_file = cfg, image_size, tokenizer, tokenizer_file
        self.padding = padding
        if cfg.kind == "synthetic":
            if cfg.num_scenes < 1:
                raise ValueError(f"a synthetic source's num_scenes is {cfg.num_scenes}: give it at least 1")
            self.scenes: dict[int, PreparedScene] = {}
        elif cfg.kind == "narratives":
            if not cfg.path or not cfg.image_root:
                raise ValueError("a 'narratives' source needs 'path' (JSONL) and 'image_root' (image folder)")
            paths = narratives_paths(cfg.path)
            if not paths:
                raise ValueError(
                    f"no file matches the source path {cfg.path} (a 'narratives' source's 'path', read from "
                    f"{Path.cwd()})"
                )
            self.records = NarrativesIndex(paths, progress, index_cache)
            self.unreadable: set[int] = set()  # records whose image failed to read: the next one stands in
            missing = [path for path in map(self.image_path, self.records.image_ids) if not path.is_file()]
            if missing:
                shown = ", ".join(str(p) for p in missing[:3])
                raise ValueError(
                    f"{len(missing)} of the {len(self.records)} images of {cfg.path} are missing, e.g. {shown}: check "
                    f"'image_root' and 'image_name' ({cfg.image_name!r}, formatted with each record's image_id)"
                )
        else:
            raise ValueError(f"unknown source kind {cfg.kind!r}: expected 'synthetic' or 'narratives'")
        if not len(self):
            raise ValueError(f"the {cfg.kind} source {cfg.path or ''} has no scenes: give it some, or drop it")

    def image_path(self, image_id: str | int) -> Path:
        try:
            name = self.cfg.image_name.format(image_id=image_id)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"the source's image_name {self.cfg.image_name!r} cannot be formatted with image_id "
                f"{image_id!r} ({type(e).__name__}: {e}): it may use {{image_id}} only, as in "
                "'{image_id}.jpg' or, for a zero-padded id, '{image_id:0>12}.jpg'"
            ) from None
        return Path(self.cfg.image_root or "") / name

    def __len__(self) -> int:
        return self.cfg.num_scenes if self.cfg.kind == "synthetic" else len(self.records)

    def prepare(self, indices: set[int]) -> None:
        """Prepare the synthetic scenes `indices` not prepared yet, in worker processes when there are many."""
        todo = sorted(indices - self.scenes.keys())
        if len(todo) <= 64:  # not worth starting worker processes
            for i in todo:
                self.scenes[i] = synthetic_scene(self.cfg.seed, i, self.image_size, self.tokenizer, self.padding)
            return
        jobs = [(self.cfg.seed, i, self.image_size, self.padding, str(self.tokenizer_file)) for i in todo]
        # spawn, not fork: forking after torch has started its thread pools can deadlock
        with multiprocessing.get_context("spawn").Pool(min(2, os.cpu_count() or 1)) as pool:
            it = pool.imap(_prepare_synthetic, jobs, chunksize=16)
            self.scenes.update(zip(todo, tqdm(it, total=len(jobs), desc="preparing scenes", unit="scene")))

    def __getitem__(self, i: int) -> PreparedScene:
        if self.cfg.kind == "synthetic":
            self.prepare({i})
            return self.scenes[i]
        for j in (k % len(self.records) for k in range(i, i + len(self.records))):
            if j in self.unreadable:
                continue
            path = self.image_path(self.records.image_ids[j])
            try:
                with Image.open(path) as im:
                    image = to_rgb_array(im)
            except Exception as e:  # Pillow raises many kinds for a broken file
                self.unreadable.add(j)
                log.warning(
                    "cannot read the image %s of image_id %r (%s): its record is skipped, the next one trains in "
                    "its place",
                    path,
                    self.records.image_ids[j],
                    e,
                )
                continue
            return prepare_record(image, self.records[j], self.image_size, self.tokenizer, self.padding)
        raise ValueError(f"no image of {self.cfg.path} can be read (each was logged): check 'image_root'")


def narratives_paths(path: str) -> list[str]:
    """`path` itself when it is a file (its name may hold glob characters, as "ln [v2].jsonl" does), else the files
    that `path` as a glob matches, sorted."""
    if Path(path).is_file():
        return [path]
    return sorted(p for p in glob.glob(path) if Path(p).is_file())


def _trace_problems(records: list[dict]) -> tuple[float, float | None]:
    """(the share of trace points outside the image by more than 0.1, the median over records of the traces'
    time span / the utterances' time span; None without records that have both)."""
    points = [(p["x"], p["y"]) for r in records for segment in r["traces"] for p in segment]
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    outside = float(((xy < -0.1) | (xy > 1.1)).any(axis=1).mean()) if len(xy) else 0.0
    ratios = []
    for r in records:
        times = [p["t"] for segment in r["traces"] for p in segment]
        spoken = [t for u in r["timed_caption"] for t in (u["start_time"], u["end_time"])]
        if len(times) > 1 and spoken and max(spoken) > min(spoken):
            ratios.append((max(times) - min(times)) / (max(spoken) - min(spoken)))
    return outside, float(np.median(ratios)) if ratios else None


def _check_narratives(source: SceneSource, max_tokens: int, checked: int = 1000) -> None:
    """Log how much of a narratives source's captions gets a location, and warn where it is little, where the
    trace and the utterances seem timed on other clocks, where captions are empty, or longer than `max_tokens`
    with EOS (training cuts them, and a cut caption teaches no end); raise `ValueError` for traces that are not
    in fractions of the image (pixels?). Up to `checked` records, spread over the source, are read."""
    if source.cfg.kind != "narratives":
        return
    records = [source.records[j] for j in range(0, len(source.records), math.ceil(len(source.records) / checked))]
    outside, span_ratio = _trace_problems(records)
    if outside > 0.05:
        raise ValueError(
            f"{source.cfg.path}: {100 * outside:.0f}% of the trace points checked lie outside the image: a trace's "
            "x and y are fractions of the image's width and height (0 to 1); divide pixel coordinates by them"
        )
    if span_ratio is not None and not 0.1 <= span_ratio <= 10:
        log.warning(
            "%s: the traces last %.3gx as long as the utterances they go with (median over the records checked): "
            "a trace's t and the utterances' start_time and end_time must be seconds on one clock, or words are "
            "located where the pointer was at other moments",
            source.cfg.path,
            span_ratio,
        )
    empty = sum(not r["caption"].strip() for r in records)
    if empty:
        log.warning(
            "%s: %d of %d captions checked are empty: each teaches the model to say nothing; remove those records",
            source.cfg.path,
            empty,
            len(records),
        )
    lengths = [len(source.tokenizer.encode(r["caption"])) for r in records]
    words = [word_locations(r) for r in records]
    utterances = sum(len(r["timed_caption"]) for r in records)
    found = sum(len(w) for w in words) / max(utterances, 1)
    located = sum(w.box is not None for ws in words for w in ws) / max(utterances, 1)
    if not utterances:
        log.info(
            "%s: %d records, with no timed utterances: captions only, no word located",
            source.cfg.path,
            len(source.records),
        )
    else:
        log.info(
            "%s: %d records; of %d checked, %.0f%% of the utterances are found in their captions and %.0f%% "
            "located by the trace",
            source.cfg.path,
            len(source.records),
            len(records),
            100 * found,
            100 * located,
        )
        if found < 0.9:
            log.warning(
                "%s: only %.0f%% of the utterances are found in their captions, in order: the others' words get "
                "no location; check that each timed_caption holds its caption's words",
                source.cfg.path,
                100 * found,
            )
        elif located < 0.5 * found:
            log.warning(
                "%s: only %.0f%% of the utterances are located by the trace, though %.0f%% are found in their "
                "captions: their times fall outside the traces'; a trace's t and the utterances' start_time and "
                "end_time must be seconds on one clock",
                source.cfg.path,
                100 * located,
                100 * found,
            )
    long = sum(n > max_tokens for n in lengths)
    if long:
        log.warning(
            "%s: %d of %d captions checked are longer than the model's max_text_tokens, %d tokens with EOS (the "
            "longest: %d): training cuts them, and a cut caption teaches no end; set max_text_tokens in the "
            "training config to train on them whole",
            source.cfg.path,
            long,
            len(records),
            max_tokens,
            max(lengths),
        )


def step_draws(step: int, cfg: TrainConfig, lengths: list[int], rank: int = 0, world: int = 1):
    """(sample, source, scene index, task) of each sample of `step` that belongs to `rank`, where `lengths` are the
    sources' sizes: a pure function of (cfg.seed, step)."""
    rng = np.random.default_rng([cfg.seed, step])
    weights = np.array([s.weight for s in cfg.sources], dtype=np.float64)
    task_names = list(cfg.tasks)
    task_p = np.array([cfg.tasks[t] for t in task_names], dtype=np.float64)
    draws = []
    for j in range(cfg.batch_size):
        source = int(rng.choice(len(lengths), p=weights / weights.sum()))
        scene_index = int(rng.integers(lengths[source]))
        task = task_names[rng.choice(len(task_names), p=task_p / task_p.sum())]
        if j % world == rank:
            draws.append((j, source, scene_index, task))
    return draws


def batches_for_step(
    step: int, cfg: TrainConfig, sources: list[SceneSource], model_cfg, tokenizer, rank=0, world=1
) -> list[dict]:
    """The samples of `step` that belong to `rank`, in `cfg.grad_accum_steps` micro-batches: a pure function of
    (cfg.seed, step). Micro-batch m takes every k-th sample from the m-th, as k processes share a batch, so k passes
    on one process learn what k processes do in one pass each (exactly, when k divides the batch)."""
    samples = []
    for j, source, scene_index, task in step_draws(step, cfg, [len(s) for s in sources], rank, world):
        src = sources[source]
        sample_rng = np.random.default_rng([cfg.seed, step, j])
        sample = make_sample(src[scene_index], task, sample_rng, model_cfg, tokenizer)
        if src.cfg.prompt is not None and sample["task"] == "caption":  # a narrative gives captions for any task
            sample["prompt"] = src.cfg.prompt
        samples.append(sample)
    k = cfg.grad_accum_steps
    return [collate(samples[m::k], model_cfg.language_model.max_text_tokens) for m in range(k)]


def accumulate_gradients(
    net: nn.Module, batches: list[dict], device: torch.device, autocast_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Forward and backward each micro-batch, its loss weighted by its share of the samples: each loss is a mean
    over its own micro-batch, and the gradients add up as DDP averages its processes'. Under DDP the gradients are
    all-reduced once, after the last. Returns each loss averaged over the micro-batches that have it, weighted
    alike (detached tensors on `device`: reading one waits for the device)."""
    total = sum(len(batch["prompts"]) for batch in batches)
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        share = len(batch["prompts"]) / total
        last = i == len(batches) - 1
        with nullcontext() if last or not isinstance(net, DistributedDataParallel) else net.no_sync():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                losses = net(batch)
            (losses["loss"] * share).backward()
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value.detach() * share
            weights[key] = weights.get(key, 0.0) + share
    return {key: sums[key] / weights[key] for key in sums}


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a NaN or Inf loss or gradient: training stopped, its checkpoint left as it was."""


def step_is_finite(loss: torch.Tensor, grad_norm: torch.Tensor, distributed: bool) -> bool:
    """Whether the loss and the gradient norm are finite on every process (a collective under DDP, so that every
    process steps or skips alike)."""
    finite = (torch.isfinite(loss) & torch.isfinite(grad_norm)).to(torch.int32)
    if distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _loggable(value: float, digits: int) -> float | None:
    """`value` rounded to `digits`, or None for NaN and Inf, which JSON has no number for."""
    return round(value, digits) if math.isfinite(value) else None


def _warn_skipped(done: int, loss: torch.Tensor, grad_norm: torch.Tensor, in_a_row: int, limit: int) -> None:
    """Warn that step `done` was skipped, the `in_a_row`-th in a row of the `limit` that stop the run."""
    log.warning(
        "step %d: the loss (%s) or the gradient norm (%s) is NaN or Inf: the step is skipped, the weights left as "
        "they were, and no checkpoint is written until a step is finite (%d in a row; training stops at %d, "
        "`max_nonfinite_steps`)",
        done,
        float(loss),
        float(grad_norm),
        in_a_row,
        limit,
    )


def _diverged_message(cfg: TrainConfig, done: int, in_a_row: int, ckpt: Path) -> str:
    """What `TrainingDiverged` says: where the run stopped, what was kept, and what to change."""
    kept = f"{ckpt} is left as it was" if ckpt.is_file() else "no checkpoint was written"
    return (
        f"training stopped at step {done}: {in_a_row} steps in a row had a NaN or Inf loss or gradient (each skipped; "
        f"`max_nonfinite_steps` is {cfg.max_nonfinite_steps}), and {kept}. Lower lr (now {cfg.lr}), clip the "
        f"gradient (grad_clip, now {cfg.grad_clip}), train in fp32 if in bf16 (now {cfg.precision}), or check the "
        "data those steps drew (a broken record or image); then run again: it resumes from the checkpoint (or give "
        "a new out_dir to start over)"
    )


def prepare_synthetic_sources(cfg: TrainConfig, sources: list[SceneSource], start: int, rank=0, world=1) -> None:
    """Prepare ahead, in parallel, the synthetic scenes that steps `start` to `cfg.steps` will draw, and only those:
    a short run does not wait for all of a large source."""
    if not any(source.cfg.kind == "synthetic" for source in sources):
        return
    needed: list[set[int]] = [set() for _ in sources]
    lengths = [len(s) for s in sources]
    for step in range(start, cfg.steps):
        for _, source, scene_index, _ in step_draws(step, cfg, lengths, rank, world):
            needed[source].add(scene_index)
    for source, indices in zip(sources, needed):
        if source.cfg.kind == "synthetic":
            source.prepare(indices)


# ----------------------------------------------------------------------------- schedule and checkpoints
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def rng_states(device: torch.device, distributed: bool) -> list[dict[str, torch.Tensor]]:
    """Every process's random state, by rank: the CPU's, and on a GPU its own (dropout draws there); each process
    seeds its own after the model is built (`cfg.seed + rank`). Collective."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if not distributed:
        return [state]
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(path: Path, model, optimizer, step: int, rng: list[dict[str, torch.Tensor]]) -> None:
    """The model's weights that `save_pretrained` stores (not the frozen ones its official files give), optimizer,
    step and every process's random state (`rng_states`)."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": _saved_state(model, _sources(model)),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": rng,
            "threads": torch.get_num_threads(),
        },
        tmp,
    )
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def _sources(model) -> dict[str, str]:
    """The official files `model` was built from (`build_pixelllm` records them)."""
    return getattr(model, "sources", {}) or {}


def _load_model_state(path: Path, model, saved: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's weights: those `save_pretrained` stores, the others (frozen, from official files) being in
    `model` already; or, as checkpoints held before, the whole state. Anything else is an error that says what to do."""
    own = _saved_state(model, _sources(model))
    problems = state_mismatches(own, saved)
    if not problems:
        model.load_state_dict(saved, strict=False)
        return
    if not state_mismatches(model.state_dict(), saved):  # a checkpoint of the whole model, as older runs wrote
        model.load_state_dict(saved)
        return
    raise ValueError(
        f"{path} holds a model of another shape than this config builds: give a new out_dir to start over, or the "
        f"config the run started with ({path.parent / 'train_config.json'}) to resume. {problems}"
    )


def load_checkpoint(
    path: Path, model, optimizer, device: torch.device, rank: int = 0, world: int = 1, threads: int | None = None
) -> int:
    """Restore `path` into `model` and `optimizer`, and this process's random state; returns the step to resume at.
    CPU kernels may sum in another order on another thread count, so with `threads` unset the run resumes at the
    count that wrote the checkpoint (at most this machine's CPU count)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    _load_model_state(path, model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng = state.get("rng") or [{"cpu": state["torch_rng"]}]  # "torch_rng": rank 0's, before every rank's was kept
    if len(rng) != world:
        log.warning(
            "%s was written by %d processes and this run has %d: dropout draws will differ from an uninterrupted run's",
            path,
            len(rng),
            world,
        )
    mine = rng[rank] if len(rng) == world else rng[0]
    torch.set_rng_state(mine["cpu"])
    if device.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], device)
    elif device.type == "cuda" or "cuda" in mine:
        log.warning(
            "%s was written on %s and this run is on %s: dropout draws will differ from an uninterrupted run's",
            path,
            "a GPU" if "cuda" in mine else "the CPU",
            device,
        )
    _restore_threads(path, state.get("threads"), threads)
    return int(state["step"])


def _restore_threads(path: Path, saved: int | None, threads: int | None) -> None:
    """With `threads` unset, go to the thread count `path` was written at (`saved`; None in checkpoints written before
    it was stored), capped at this machine's CPU count; with `threads` set, warn that the last bits may differ."""
    if not saved or saved == torch.get_num_threads():
        return
    if threads:
        log.warning(
            "%s was written at %d threads and this run uses %d (`threads`): the weights may differ in their last bits "
            "from those of an uninterrupted run",
            path,
            saved,
            torch.get_num_threads(),
        )
        return
    cpus = os.cpu_count() or 1
    if saved > cpus:
        log.warning(
            "%s was written at %d threads and this machine has %d CPUs: resuming at %d threads (the weights may differ "
            "in their last bits from those of an uninterrupted run; set `threads` to choose)",
            path,
            saved,
            cpus,
            cpus,
        )
        saved = cpus
    else:
        log.info("resuming at %d threads, the count the checkpoint was written at (set `threads` to choose)", saved)
    torch.set_num_threads(saved)


# ----------------------------------------------------------------------------- the loop
def initial_model(cfg: TrainConfig) -> PixelLLM:
    """`cfg.model` (default `DEFAULT_PRESET`) built fresh, or the saved model `cfg.init_from`, at `cfg.image_size`
    when given. With both, the preset `cfg.model` names what the saved model gains: its proposal head, started
    fresh, where the saved model has none (fine-tuning a captioner for dense captioning), and its `attribute_words`
    where the saved model names none; without `cfg.model` it gains nothing. `cfg.object_tokens` object tokens and
    `cfg.object_readings` start fresh either way."""
    if not cfg.init_from:
        wanted = load_config(cfg.model or DEFAULT_PRESET)
        fresh = wanted.at_image_size(cfg.image_size) if cfg.image_size else wanted
        model = build_pixelllm(fresh, cfg.sam_checkpoint, cfg.eva_checkpoint, cfg.t5_path)
    else:
        model = load_model(cfg.init_from)
        if cfg.image_size:
            model = resize_input(model, cfg.image_size)
        wanted = load_config(cfg.model) if cfg.model else None
        if wanted and wanted.proposal_head is not None and model.proposal_head is None:
            log.info("%s has no proposal head: adding a fresh one (%s)", cfg.init_from, wanted.proposal_head)
            model.add_proposal_head(wanted.proposal_head)
            model.cfg.loss.proposal_weight = wanted.loss.proposal_weight
        if wanted and wanted.attribute_words and not model.cfg.attribute_words:
            log.info("%s names no attribute words: taking %s's", cfg.init_from, cfg.model)
            model.cfg.attribute_words = wanted.attribute_words
    if cfg.object_tokens and cfg.object_tokens != model.cfg.extractor.object_tokens:
        log.info("%s: up to %d object tokens per prompt", model.name, cfg.object_tokens)
        model.add_object_tokens(cfg.object_tokens)
    if cfg.object_readings and not model.cfg.extractor.object_readings:
        log.info("%s: object readings added to its object tokens", model.name)
        model.add_object_readings()
    return model


@contextmanager
def finish_step_on_ctrl_c(enabled: bool) -> Iterator[threading.Event]:
    """Inside, a first Ctrl-C (SIGINT) sets the event, for the loop to end its step, save a checkpoint and stop; a
    second one interrupts at once. Off (the event never set) when not `enabled`, off the main thread, or where
    SIGINT is ignored (a job started in the background by a script)."""
    stop = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    if not enabled or not main_thread or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield stop
        return
    # None: a handler not installed from Python, which cannot be put back; Python's own raises KeyboardInterrupt
    previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler

    def first(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous)
        log.warning("Ctrl-C: ending this step and saving a checkpoint (Ctrl-C again stops at once, losing it)")

    signal.signal(signal.SIGINT, first)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def train(cfg: TrainConfig) -> Path:
    """Train per `cfg`; returns the directory of the final model (`<out_dir>/final`)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.batch_size < world * cfg.grad_accum_steps:
        raise ValueError(
            f"batch_size {cfg.batch_size} is smaller than the {world} processes times grad_accum_steps "
            f"({cfg.grad_accum_steps}): each pass of each process needs samples"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    model = initial_model(cfg).to(device)
    if rank:  # every process starts from rank 0's weights (DDP sends them); each draws its own dropout masks
        torch.manual_seed(cfg.seed + rank)
    if cfg.name:
        if default_tokenizer(model.cfg) is not None:  # a preset's tokenizer, found by its name: keep finding it
            model.cfg.tokenizer = model.cfg.tokenizer or model.cfg.name
        model.cfg.name = cfg.name
    if cfg.point_weight is not None:
        model.cfg.loss.point_weight = cfg.point_weight
    if cfg.max_text_tokens is not None:
        model.cfg.language_model.max_text_tokens = cfg.max_text_tokens
    if cfg.caption_prompt is not None:
        model.cfg.caption_prompt = cfg.caption_prompt
    prompts = sorted({model.cfg.caption_prompt if s.prompt is None else s.prompt for s in cfg.sources})
    if rank == 0 and model.cfg.caption_prompt not in prompts:
        log.warning(
            "no source trains captions with %r, the prompt the saved model captions with (the sources': %s): set "
            "`caption_prompt` to the one it should caption with",
            model.cfg.caption_prompt,
            ", ".join(map(repr, prompts)),
        )
    model.train()
    tokenizer = model.tokenizer
    tokenizer_file = out / "tokenizer.json"
    ckpt = out / "checkpoint.pt"
    if rank == 0:
        if ckpt.is_file():
            _warn_of_changes(out / "train_config.json", cfg)
        tokenizer.save(out)
    if distributed:
        dist.barrier()
    sources = [
        SceneSource(
            s,
            model.cfg.image_size,
            tokenizer,
            tokenizer_file,
            rank == 0,
            out / f"narratives-index-{i}.json",
            model.cfg.image_padding,
        )
        for i, s in enumerate(cfg.sources)
    ]
    if rank == 0:
        for source in sources:
            _check_narratives(source, model.cfg.language_model.max_text_tokens)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = load_checkpoint(ckpt, model, optimizer, device, rank, world, cfg.threads) if ckpt.is_file() else 0
    for group in optimizer.param_groups:  # a checkpoint's groups bring its weight_decay back: the config's applies
        group["weight_decay"] = cfg.weight_decay
    if rank == 0:  # once the checkpoint loads: a config it does not fit leaves the run's own on record
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    if start >= cfg.steps:
        log.info(
            "nothing to train: %s is at step %d of %d, its model in %s (raise steps to go on: the cosine schedule "
            "stretches to the new length, so the learning rate rises again; or give a new out_dir)",
            out,
            start,
            cfg.steps,
            out / "final",
        )
    elif start:
        log.info("resumed from %s at step %d", ckpt, start)
    prepare_synthetic_sources(cfg, sources, start, rank, world)
    net = DistributedDataParallel(model, find_unused_parameters=True) if distributed else model
    autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else None

    log_path = out / "log.jsonl"
    if rank == 0 and log_path.is_file():  # steps logged after the checkpoint (or before any) run again: drop them
        kept = [line for line in log_path.read_text().splitlines(keepends=True) if 0 < _logged_step(line) <= start]
        log_path.write_text("".join(kept))
    log_file = log_path.open("a") if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=rank != 0)
    t_last, samples_since = time.time(), 0
    nonfinite, skipped_since = 0, 0  # steps skipped in a row for a NaN or Inf loss or gradient; since the last log
    ckpt_due = False  # a periodic checkpoint waits for a finite step: the weights may be what makes steps NaN
    batches = batches_for_step(start, cfg, sources, model.cfg, tokenizer, rank, world) if start < cfg.steps else []
    with finish_step_on_ctrl_c(enabled=not distributed) as stop:
        for step in range(start, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            losses = accumulate_gradients(net, batches, device, autocast_dtype)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)  # inf: the norm, unclipped
            if step + 1 < cfg.steps:  # the next step's samples (a pure function of the step), made while the device
                batches = batches_for_step(step + 1, cfg, sources, model.cfg, tokenizer, rank, world)  # computes
            finite = step_is_finite(losses["loss"], grad_norm, distributed)  # waits for the device
            if finite:
                optimizer.step()
                nonfinite = 0
            else:  # skipped: the weights and the optimizer's moments stay as they were
                optimizer.zero_grad(set_to_none=True)
                nonfinite, skipped_since = nonfinite + 1, skipped_since + 1
            samples_since += cfg.batch_size
            done = step + 1
            if rank == 0 and (done % cfg.log_every == 0 or done == cfg.steps):
                elapsed = time.time() - t_last
                record = {k: _loggable(float(v), 4) for k, v in losses.items()}
                record.update(
                    step=done,
                    lr=lr_at(step, cfg),
                    grad_norm=_loggable(float(grad_norm), 3),
                    skipped_steps=skipped_since,
                    samples_per_s=round(samples_since / elapsed, 2),
                    time=time.time(),
                )
                log_file.write(json.dumps(record, allow_nan=False) + "\n")
                log_file.flush()
                bar.set_postfix(loss=record["loss"], sps=record["samples_per_s"])
                t_last, samples_since, skipped_since = time.time(), 0, 0
            bar.update(1)
            if not finite:
                if nonfinite >= cfg.max_nonfinite_steps:
                    bar.close()
                    raise TrainingDiverged(_diverged_message(cfg, done, nonfinite, ckpt))
                if rank == 0:
                    _warn_skipped(done, losses["loss"], grad_norm, nonfinite, cfg.max_nonfinite_steps)
            stopping = stop.is_set() and done < cfg.steps  # read once; at the last step the run just ends
            ckpt_due = ckpt_due or done % cfg.ckpt_every == 0
            if (ckpt_due and not nonfinite) or done == cfg.steps or stopping:
                ckpt_due = False
                rng = rng_states(device, distributed)
                if rank == 0:
                    save_checkpoint(ckpt, model, optimizer, done, rng)
            if stopping:
                bar.close()
                log.warning("stopped at step %d of %d, saved in %s: the same command resumes", done, cfg.steps, ckpt)
                raise KeyboardInterrupt
    bar.close()
    final = out / "final"
    if rank == 0:
        log_file.close()
        if start < cfg.steps or not final.is_dir():  # a finished run's final model is there already
            model.eval()
            partial = out / "final.partial"  # written whole, then renamed: `final` is never half a model
            shutil.rmtree(partial, ignore_errors=True)
            model.save_pretrained(partial)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return final


# keys that do not change what a run learns: resuming with other values is no change to warn of
BOOKKEEPING = {"out_dir", "threads", "log_every", "ckpt_every", "name", "max_nonfinite_steps"}


def _warn_of_changes(saved: Path, cfg: TrainConfig) -> None:
    """Warn when a run resumes under another config than the one `saved` (its train_config.json) recorded."""
    try:
        before = json.loads(saved.read_text())
    except (OSError, ValueError):
        return
    now = json.loads(json.dumps(asdict(cfg)))  # as JSON holds it: lists, not tuples
    changed = sorted(k for k, v in now.items() if k in before and k not in BOOKKEEPING and v != before[k])
    if changed:
        log.warning(
            "%s resumes a run started with another config: %s changed (its checkpoint's weights and optimizer go on "
            "under the new values; give a new out_dir to start over)",
            cfg.out_dir,
            ", ".join(changed),
        )


def _logged_step(line: str) -> int:
    """The step of a log line (0 for a line that is not a complete record, as a killed write leaves)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="training config JSON (see pixelllm/configs/train/)")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--out-dir", help="override the output directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_json(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.out_dir:
        cfg.out_dir = args.out_dir
    train(cfg)


if __name__ == "__main__":
    main()
