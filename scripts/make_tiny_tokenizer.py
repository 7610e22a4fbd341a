"""Train the tiny preset's tokenizer on the synthetic vocabulary and write pixelllm/configs/tokenizers/.

python scripts/make_tiny_tokenizer.py
"""

import itertools
import string
from pathlib import Path

from pixelllm.data.synthetic import COLORS, POSITIONS, SHAPES, SIZES
from pixelllm.tokenizer import Tokenizer

PROMPTS = ["a short image caption:", "a long image caption:", "an object of", "where is", "a photo of"]


def corpus() -> list[str]:
    texts = []
    for size, color, shape, pos in itertools.product(SIZES, COLORS, SHAPES, POSITIONS):
        texts += [
            f"a {size} {color} {shape} {pos} and",
            f"the {color} {shape}.",
            f"the {size} {color} {shape} {pos},",
        ]
    texts += PROMPTS * 50
    texts += [string.ascii_lowercase + string.digits + string.punctuation] * 5
    return texts


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "pixelllm" / "configs" / "tokenizers"
    tok = Tokenizer.train(corpus(), vocab_size=160)
    tok.save(out)
    (out / "tokenizer.json").rename(out / "pixelllm-tiny.json")
    print(f"vocab size {tok.vocab_size} -> {out / 'pixelllm-tiny.json'}")
