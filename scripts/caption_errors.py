"""Why whole-image captions miss objects: each object's outcome, and captions with more or fewer phrases than objects.

python scripts/caption_errors.py --model weights/pixelllm-tiny --num-scenes 150 --seed 1000 --renderer independent

Per object, as `pixelllm eval` pairs it (`_word_point_hits`): named by color and shape with its word point inside
its box (hit) or outside; else unnamed because a phrase gives its color with another shape (shape wrong), its
shape with another color (color wrong), or neither (absent); in all and per object size. A caption with more
"<color> <shape>" phrases than objects names some object twice or one that is not there. Words are refined with
the proposal head as `Predictor.caption` answers by default; `--no-refine` keeps the point head's own word boxes (as
every run of this script before session 25 did).
"""

import argparse
from collections import Counter

import torch

from pixelllm.build import load_model
from pixelllm.evaluate import _phrases, _word_point_hits, generated_scenes
from pixelllm.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="weights/pixelllm-tiny")
    parser.add_argument("--num-scenes", type=int, default=150)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--renderer", choices=["independent", "synthetic"], default="independent")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--no-refine", action="store_true", help="the point head's own word boxes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    predictor = Predictor(load_model(args.model))
    objects, captions = Counter(), Counter()
    by_size: dict[str, Counter] = {}
    with torch.no_grad():
        for scene in generated_scenes(args.num_scenes, args.seed, args.renderer):
            emb = predictor.embed(scene.image)
            caption = predictor.caption_embeddings([emb], num_beams=args.num_beams, refine=not args.no_refine)[0]
            words = caption.words
            named = [(words[j - 1].text, words[j].text) for j in _phrases(words)]
            for obj, hit in zip(scene.objects, _word_point_hits(words, scene.objects)):
                if hit is not None:
                    outcome = "hit" if hit else "point outside"
                elif any(color == obj.color for color, _ in named):
                    outcome = "shape wrong"
                elif any(shape == obj.shape for _, shape in named):
                    outcome = "color wrong"
                else:
                    outcome = "absent"
                objects[outcome] += 1
                by_size.setdefault(obj.size, Counter())[outcome] += 1
            excess = len(named) - len(scene.objects)
            captions["more phrases than objects" if excess > 0 else "fewer" if excess < 0 else "as many"] += 1
    n, m = sum(objects.values()), sum(captions.values())
    print(f"objects {n}: " + ", ".join(f"{k} {v / n:.1%}" for k, v in objects.most_common()))
    for size, outcomes in sorted(by_size.items()):
        k = sum(outcomes.values())
        print(f"  {size} {k}: " + ", ".join(f"{o} {outcomes[o] / k:.1%}" for o, _ in objects.most_common()))
    print(f"captions {m}: " + ", ".join(f"{k} {v / m:.1%}" for k, v in captions.most_common()))


if __name__ == "__main__":
    main()
