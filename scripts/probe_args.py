"""The command line the probe scripts share: a model, scenes of a seed the held-out evaluation never uses (77), and
an optional JSON file for the table."""

from __future__ import annotations

import argparse


def probe_parser(doc: str, num_scenes: int = 500) -> argparse.ArgumentParser:
    """A parser described by `doc`'s first line, with --model, --num-scenes, --seed and --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--model", default="weights/pixelllm-tiny")
    parser.add_argument("--num-scenes", type=int, default=num_scenes)
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--out", help="write the table as JSON here")
    return parser
