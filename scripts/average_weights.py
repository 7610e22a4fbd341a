"""Average the weights of saved models of one architecture (a uniform "model soup" of consecutive stages).

python scripts/average_weights.py runs/tiny-stage18/final runs/tiny-stage19/final --out runs/tiny-soup18-19

Every floating-point tensor of the models' state becomes the mean over the inputs; other tensors must be equal in
all of them. The result is saved like a trained model (`save_pretrained`), with the first input's config and
tokenizer, which must match the others'.
"""

import argparse
from pathlib import Path

import torch

from pixelllm.checkpoints import from_pretrained, save_pretrained


def average_into(models: list[torch.nn.Module]) -> torch.nn.Module:
    """The first of `models` with each floating-point tensor of its state the mean over all of them."""
    first = models[0]
    states = [m.state_dict() for m in models]
    for m in models[1:]:
        if m.cfg != first.cfg:
            raise SystemExit("the models' configs differ: average only saved models of one architecture")
    averaged = {}
    for k, t in states[0].items():
        if t.is_floating_point():
            averaged[k] = (sum(s[k].double() for s in states) / len(states)).to(t.dtype)
        elif not all(torch.equal(s[k], t) for s in states[1:]):
            raise SystemExit(f"tensor {k} ({t.dtype}) differs between the models and cannot be averaged")
    first.load_state_dict(averaged, strict=False)
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dirs", nargs="+", type=Path, help="saved models (config.json, model.safetensors)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tokenizers = {
        (d / "tokenizer.json").read_text() if (d / "tokenizer.json").exists() else None for d in args.model_dirs
    }
    if len(tokenizers) > 1:
        raise SystemExit("the models' tokenizers differ: average only saved models of one architecture")
    models = [from_pretrained(d, device="cpu") for d in args.model_dirs]
    save_pretrained(average_into(models), args.out)


if __name__ == "__main__":
    main()
