"""Which beam should a verified caption keep? Compares choices on scenes the held-out evaluation never uses.

For `--num-scenes` independent-renderer scenes (seed `--seed`, 77 by default, not the model card's held-out seed
1000) and each beam width of `--num-beams`, it decodes the whole-image caption's `num_beams` best hypotheses
(`PixelLLM.generate_n_best`), refines and verifies each as `Predictor.caption` does, and prints the caption
word-point accuracy (`pixelllm eval`'s `caption_word_point_acc`) of: the likeliest beam ("top"); the likeliest of
those whose attribute phrases were snapped to the most distinct proposals ("grounded", what `Predictor.caption`
answers: `predictor` checks that it does); the beam with the most object points in their box, known only from the
scene's truth ("oracle", a ceiling for any choice among these beams).

python scripts/beam_rerank_probe.py --num-scenes 300 --num-beams 3 5 --out runs/beam_rerank_probe.json
"""

from __future__ import annotations

import json

import numpy as np
import torch
from probe_args import probe_parser

from pixelllm.build import load_model
from pixelllm.evaluate import _word_point_hits, generated_scenes
from pixelllm.predictor import DENSE_SCORE_THRESHOLD, Caption, ImageEmbedding, Predictor, _rewrite

CHOICES = ("top", "grounded", "oracle", "predictor")


def verified_beams(predictor: Predictor, emb: ImageEmbedding, num_beams: int) -> tuple[list[Caption], list[int]]:
    """The whole-image caption's `num_beams` best hypotheses, likeliest first, each refined and verified, and
    the grounded coverage of each before verification (`Predictor._grounded_coverage`, as the predictor picks)."""
    model = predictor.model
    prompts = predictor._location_prompts([emb], None, None)
    beams = model.generate_n_best(emb.features, prompts, num_beams)[0]
    proposals = model.propose(emb.features, DENSE_SCORE_THRESHOLD)[0]
    captions = []
    for g in beams:
        caption = predictor._caption(g, emb.transform)
        caption.words = predictor._snap_words(caption.words, proposals, emb.transform)
        captions.append(caption)
    coverage = [predictor._grounded_coverage(c.words) for c in captions]
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
        parser.error(f"{args.model} needs attribute_words and a proposal head for grounded beam choice")
    hits = {k: {choice: [] for choice in CHOICES} for k in args.num_beams}
    with torch.no_grad():
        for scene in generated_scenes(args.num_scenes, args.seed, "independent"):
            emb = predictor.embed(scene.image)
            for k in args.num_beams:
                captions, coverage = verified_beams(predictor, emb, k)
                beams = [_word_point_hits(c.words, scene.objects) for c in captions]
                grounded = max(range(len(beams)), key=lambda i: coverage[i])
                oracle = max(range(len(beams)), key=lambda i: sum(h is True for h in beams[i]))
                hits[k]["top"] += beams[0]
                hits[k]["grounded"] += beams[grounded]
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
