"""Which beam should a verified caption keep? Compares choices on scenes the held-out evaluation never uses.

For `--num-scenes` independent-renderer scenes (seed `--seed`, 77 by default, not the model card's held-out seed
1000) and each beam width of `--num-beams`, it decodes the whole-image caption's `num_beams` best hypotheses
(`PixelLLM.generate_n_best`), refines and verifies each as `Predictor.caption` does, and prints the caption
word-point accuracy (`pixelllm eval`'s `caption_word_point_acc`) of: the likeliest beam ("top", what
`Predictor.caption` answers since session 28: `predictor` checks that it does); the likeliest of those whose
attribute phrases were snapped to the most distinct proposals before grounding ("distinct", `distinct_proposals`:
session 26's choice, except that a phrase counts by its anchor, `Predictor._anchor`, where session 26 took its
head); the beam with the most object points in their box, known only from the scene's truth ("oracle", a ceiling
for any choice among these beams).

python scripts/beam_rerank_probe.py --num-scenes 300 --num-beams 3 5 --out runs/beam_rerank_probe.json
"""

from __future__ import annotations

import json

import numpy as np
import torch
from probe_args import probe_parser
from tqdm import tqdm

from pixelllm.build import load_model
from pixelllm.evaluate import _word_point_hits, generated_scenes
from pixelllm.predictor import Caption, ImageEmbedding, Predictor, Word, _rewrite

CHOICES = ("top", "distinct", "oracle", "predictor")


def distinct_proposals(predictor: Predictor, words: list[Word]) -> int:
    """The distinct proposals the attribute phrases of refined `words` were snapped to (their anchors',
    `Predictor._anchor`), less the phrases that repeat one."""
    anchors = [predictor._anchor(words, span) for _, span in predictor._attribute_phrases(words)]
    boxes = [a.box for a in anchors if a is not None]
    return 2 * len(set(boxes)) - len(boxes)


def verified_beams(predictor: Predictor, emb: ImageEmbedding, num_beams: int) -> tuple[list[Caption], list[int]]:
    """The whole-image caption's `num_beams` best hypotheses, likeliest first, each refined and verified, and
    the `distinct_proposals` of each before verification."""
    model = predictor.model
    prompts = predictor._location_prompts([emb], None, None)
    beams = model.generate_n_best(emb.features, prompts, num_beams)[0]
    proposals = model.propose(emb.features)[0]
    captions = []
    for g in beams:
        caption = predictor._caption(g, emb.transform)
        caption.words = predictor._snap_words(caption.words, proposals, emb.transform)
        captions.append(caption)
    coverage = [distinct_proposals(predictor, c.words) for c in captions]
    boxes = {0: predictor._proposal_boxes(proposals, emb.transform)}
    verified = predictor._verify_words(
        [c.words for c in captions], [0] * len(captions), {0: emb}, boxes, num_beams, None
    )
    return [_rewrite(c, words) for c, words in zip(captions, verified)], coverage


def main() -> None:
    parser = probe_parser(__doc__, num_scenes=300)
    parser.add_argument("--num-beams", type=int, nargs="+", default=[3, 5])
    args = parser.parse_args()

    predictor = Predictor(load_model(args.model))
    if not predictor._attribute_class or predictor.model.proposal_head is None:
        parser.error(f"{args.model} needs attribute_words and a proposal head to verify beams")
    hits = {k: {choice: [] for choice in CHOICES} for k in args.num_beams}
    with torch.no_grad():
        scenes = generated_scenes(args.num_scenes, args.seed, "independent")
        for scene in tqdm(scenes, total=args.num_scenes, desc="beam probe", unit="scene"):
            emb = predictor.embed(scene.image)
            for k in args.num_beams:
                captions, coverage = verified_beams(predictor, emb, k)
                beams = [_word_point_hits(c.words, scene.objects) for c in captions]
                distinct = max(range(len(beams)), key=lambda i: coverage[i])
                oracle = max(range(len(beams)), key=lambda i: sum(h is True for h in beams[i]))
                hits[k]["top"] += beams[0]
                hits[k]["distinct"] += beams[distinct]
                hits[k]["oracle"] += beams[oracle]
                hits[k]["predictor"] += _word_point_hits(
                    predictor.caption_embeddings([emb], num_beams=k)[0].words, scene.objects
                )
    table = {
        str(k): {choice: float(np.mean([h is True for h in found])) for choice, found in by_choice.items()}
        for k, by_choice in hits.items()
    }
    objects = len(next(iter(hits.values()))["top"])
    for k, row in table.items():
        print(f"{k} beams: " + "  ".join(f"{choice} {share:.1%}" for choice, share in row.items()))
    print(f"{objects} objects in {args.num_scenes} scenes of seed {args.seed}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"beams": table, "objects": objects, "scenes": args.num_scenes, "seed": args.seed}, f, indent=2)


if __name__ == "__main__":
    main()
