"""Can the prompt feature extractor read an object's shape from a box prompt? A probe without the language model.

Trains the tiny preset's image encoder, prompt encoder and extractor from scratch, with a linear classifier on
the visual tokens, to name the shape (5 classes, chance 20%) of the object in a box, and prints held-out
accuracy for the paper's free queries (anchor_grid 0) and for anchored queries (the shipped default, 4).

python scripts/extractor_probe.py --steps 300 --out runs/extractor_probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn

from pixelllm.build import build_pixelllm
from pixelllm.config import load_config
from pixelllm.data.independent import render_independent_scene
from pixelllm.data.synthetic import SHAPES, generate_scene
from pixelllm.modeling.pixelllm import Prompts
from pixelllm.transforms import preprocess


def box_shapes(render, seeds: range, image_size: int) -> list[tuple[torch.Tensor, np.ndarray, int]]:
    """(image (3, S, S), box in model pixels, shape index) for every object of the scenes."""
    out = []
    for seed in seeds:
        scene = render(seed)
        image, transform = preprocess(scene.image, image_size)
        out += [(image, np.array(o.box) * transform.scale, SHAPES.index(o.shape)) for o in scene.objects]
    return out


def probe(anchor_grid: int, train, held_out, steps: int, batch_size: int, seed: int) -> dict:
    cfg = load_config("pixelllm-tiny")
    cfg.extractor.anchor_grid = anchor_grid
    cfg.proposal_head = None
    torch.manual_seed(seed)
    model = build_pixelllm(cfg)
    s = cfg.image_size
    tokens = cfg.extractor.num_queries + (1 if anchor_grid else 0)  # anchors add the layout token
    head = nn.Linear(tokens * model.language_model.dim, len(SHAPES))
    parts = [model.image_encoder, model.prompt_encoder, model.extractor, head]
    optimizer = torch.optim.AdamW([p for m in parts for p in m.parameters()], lr=1e-3)

    def logits(batch) -> torch.Tensor:
        images = torch.stack([b[0] for b in batch])
        boxes = torch.tensor(np.stack([b[1] for b in batch]), dtype=torch.float32).clamp(0, s)
        visual, _ = model.visual_tokens(model.encode_images(images), Prompts(texts=[""] * len(batch), boxes=boxes))
        return head(visual.flatten(1))

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        batch = [train[i] for i in rng.integers(len(train), size=batch_size)]
        loss = nn.functional.cross_entropy(logits(batch), torch.tensor([b[2] for b in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        right = sum(
            int((logits(held_out[i : i + 64]).argmax(-1) == torch.tensor([b[2] for b in held_out[i : i + 64]])).sum())
            for i in range(0, len(held_out), 64)
        )
    return {
        "anchor_grid": anchor_grid,
        "held_out_shape_accuracy": right / len(held_out),
        "last_50_steps_loss": float(np.mean(losses[-50:])),
        "train_seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-scenes", type=int, default=1500)
    parser.add_argument("--held-out-scenes", type=int, default=150)
    parser.add_argument("--grids", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = load_config("pixelllm-tiny").image_size
    train = box_shapes(generate_scene, range(args.train_scenes), size)
    held_out = box_shapes(render_independent_scene, range(10**6, 10**6 + args.held_out_scenes), size)
    results = [probe(g, train, held_out, args.steps, args.batch_size, args.seed) for g in args.grids]
    for r in results:
        print(
            f"anchor_grid {r['anchor_grid']}: held-out shape accuracy {r['held_out_shape_accuracy']:.1%} "
            f"(chance {1 / len(SHAPES):.0%}), loss {r['last_50_steps_loss']:.3f}, {r['train_seconds']:.0f} s"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"steps": args.steps, "held_out_objects": len(held_out), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
