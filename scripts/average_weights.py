"""Average the weights of saved models of one architecture (a uniform "model soup" of consecutive stages).

python scripts/average_weights.py runs/tiny-stage18/final runs/tiny-stage19/final --out runs/tiny-soup18-19

Every floating-point tensor of the models' state becomes the mean over the inputs; other tensors must be equal in
all of them. The models must have one architecture (the same weights, of the same shapes) and one tokenizer; their
configs may differ in other fields (name, caption_prompt, max_text_tokens...), which is warned of. The result is
saved like a trained model (`save_pretrained`), with the first input's config and tokenizer.
"""

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from pixelllm.checkpoints import CheckpointError, from_pretrained, save_pretrained, state_mismatches

log = logging.getLogger("average_weights")


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (`PixelLLMConfig.to_dict`)."""
    differences = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            differences += config_differences(x, y, f"{prefix}{key}.")
        elif x != y:
            differences.append(f"{prefix}{key}")
    return differences


def check_architecture(models: list[torch.nn.Module], names: list[str]) -> None:
    """Refuse models whose weights differ in names or shapes; warn of other config differences, as the first
    input's config is the one saved."""
    first = models[0].state_dict()
    for model, name in zip(models[1:], names[1:]):
        problems = state_mismatches(first, model.state_dict())
        if problems:
            raise SystemExit(
                f"{name} is of another architecture than {names[0]} ({problems}): average only saved models of one"
            )
        differences = config_differences(models[0].cfg.to_dict(), model.cfg.to_dict())
        if differences:
            log.warning(
                "the configs of %s and %s differ in %s: the average keeps the first's", names[0], name, differences
            )


def average_into(models: list[torch.nn.Module]) -> torch.nn.Module:
    """The first of `models` with each floating-point tensor of its state the mean over all of them."""
    first = models[0]
    states = [m.state_dict() for m in models]
    averaged = {}
    for k, t in states[0].items():
        if t.is_floating_point():
            averaged[k] = (sum(s[k].double() for s in states) / len(states)).to(t.dtype)
        elif not all(torch.equal(s[k], t) for s in states[1:]):
            raise SystemExit(f"tensor {k} ({t.dtype}) differs between the models and cannot be averaged")
    first.load_state_dict(averaged, strict=False)
    return first


def load_models(dirs: list[Path]) -> list[torch.nn.Module]:
    """The saved models `dirs`, or an exit with one line that names the one that cannot be read."""
    try:
        return [from_pretrained(d, device="cpu") for d in dirs]
    except (CheckpointError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dirs", nargs="+", type=Path, help="saved models (config.json, model.safetensors)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    models = load_models(args.model_dirs)
    tokenizers = {
        (d / "tokenizer.json").read_text() if (d / "tokenizer.json").exists() else None for d in args.model_dirs
    }
    if len(tokenizers) > 1:
        raise SystemExit("the models' tokenizers differ: average only saved models of one architecture")
    check_architecture(models, [str(d) for d in args.model_dirs])
    save_pretrained(average_into(models), args.out)


if __name__ == "__main__":
    main()
