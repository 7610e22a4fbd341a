"""Evaluation on held-out scenes: `pixelllm eval --model DIR [--data DIR | --num-scenes N --seed S]`, and
referring metrics on RefCOCO/+/g for those who have it: `pixelllm eval --refcoco DATA_ROOT [--split val]`.

Metrics (written as JSON):
- referring: Acc@0.5 and mean IoU of the localized box; mask IoU of the predicted mask; as `Predictor.localize`
  answers by default (box refined with the nearest object proposal, for models with a proposal head) and,
  suffixed `_regressed`, with the point head's own box;
- region captions: share whose color and shape words are right (prompted with the object's box, and with
  a point inside the object);
- caption word points: share of objects whose shape word in the generated caption has its point inside
  the object's box (objects paired one to one with the caption's "<color> <shape>" phrases that name them, by
  their size and position words first, see `_word_point_hits`; an object the caption does not name counts as
  a miss). As `Predictor.caption` answers by default (every located word snapped to its nearest object
  proposal, for models with a proposal head, and, for models with `attribute_words`, each attribute phrase
  placed on one proposal and its attribute words checked against that proposal's region caption); suffixed
  `_regressed`, with the point head's own word boxes; suffixed `_unverified`, with the decoder's words where
  the phrases were placed (region captions from a point too; a box prompt is not verified).
  Split into the share of objects the caption names (`caption_object_mention_rate`) and the
  point-in-box share among them (`_mentioned`); `caption_phrase_precision` is the share of the captions'
  phrases paired with an object (the rest name none, or repeat one); `_teacher_forced` is the point-in-box
  share with the reference caption teacher-forced, where every object is named (the point head alone,
  LN-style). The same
  with any shape word after the object's color (`caption_object_color_rate`, `_color_named`) separates a
  wrong shape word from an object left out;
- point error (Localized-Narratives style): teacher-forcing the reference caption, the mean absolute difference
  per coordinate (|dx| and |dy| averaged, half the L1 distance: what the training loss's point L1 measures)
  between each located token's predicted point and its trace point, in pixels of the original image;
- caption scores (BLEU-4, ROUGE-L, CIDEr, and METEOR when Java runs) via pycocoevalcap, if installed;
- dense captioning (models with a proposal head): VG densecap mAP (`pixelllm.dense_eval`) of all proposals
  scoring >= 0.05, and the recall of objects found at IoU >= 0.5 with a right color and shape among the
  regions `Predictor.dense_caption` returns by default (objectness >= 0.3).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from .config import PROPOSAL_SCORE_THRESHOLD
from .data.narratives import read_narratives, token_targets, word_locations
from .data.refexp import RefExample, load_refexp, ref_mask
from .data.rle import decode_segmentation
from .data.synthetic import COLORS, SHAPES, Scene, SceneObject, region_caption, scene_seed
from .dense_eval import DensePrediction, DenseTruth, box_iou_matrix, densecap_map, object_recall
from .predictor import ImageEmbedding, Localization, Predictor, Word, _group_words, centre
from .transforms import orientation, to_rgb, to_rgb_array

log = logging.getLogger(__name__)


def box_iou(a, b) -> float:
    """IoU of two boxes x0, y0, x1, y1."""
    return float(box_iou_matrix(a, b)[0, 0])


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _inside(point, box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _color_shape(text: str) -> tuple[str | None, str | None]:
    words = re.findall(r"[a-z]+", text.lower())
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return color, shape


def load_scenes(data_dir: str | Path) -> Iterator[Scene]:
    """Scenes from a folder written by `pixelllm data synth` (annotations.jsonl, narratives.jsonl, images/)."""
    data_dir = Path(data_dir)
    narratives = {r["image_id"]: r for r in read_narratives(data_dir / "narratives.jsonl")}
    with (data_dir / "annotations.jsonl").open() as f:
        for line in f:
            if not line.strip():
                continue
            ann = json.loads(line)
            image = to_rgb_array(Image.open(data_dir / ann["file_name"]))  # "images/<id>.jpg"
            objects = [
                SceneObject(
                    shape=o["shape"],
                    color=o["color"],
                    size=o["size"],
                    position=o["position"],
                    box=tuple(o["box"]),
                    mask=decode_segmentation(o["mask"], ann["height"], ann["width"]),
                    referring=o["referring"],
                )
                for o in ann["objects"]
            ]
            yield Scene(image, objects, ann["caption"], narratives[ann["image_id"]], ann.get("seed", 0))


def generated_scenes(n: int, seed: int, renderer: str) -> Iterator[Scene]:
    if renderer == "independent":
        from .data.independent import render_independent_scene as render
    else:
        from .data.synthetic import generate_scene as render
    for i in range(n):
        yield render(scene_seed(seed, i))


def _phrases(words: list[Word]) -> list[int]:
    """Indices of the shape words that end a "<color> <shape>" phrase."""
    return [j for j in range(1, len(words)) if words[j].text in SHAPES and words[j - 1].text in COLORS]


def _word_point_hits(words: list[Word], objects: list[SceneObject], match_shape: bool = True) -> list[bool | None]:
    """Per object: is the point of the caption phrase naming it (its shape word's point) inside its box? None
    where no phrase names it.

    A phrase "<size> <color> <shape> <position>" can name an object of its color and shape (with
    `match_shape=False`, of its color, whatever the shape word). Phrases and objects are paired one to one by
    the words first: as many objects named as can be, then as many size and position words right as can be.
    Only between pairings the words rate the same do the points decide (as many inside their object's box as
    can be), so caption order does not decide which of two like objects a phrase names, and a point cannot
    move a phrase to an object its words fit worse.
    """
    phrases = _phrases(words)
    if not objects or not phrases:
        return [None] * len(objects)
    n = len(objects)
    # lexicographic weights: any pairing outweighs all word scores, any word score all points inside
    point, word = 1, n + 1
    pair = n * (2 * word + point) + 1
    weight = np.zeros((n, len(phrases)))
    for i, o in enumerate(objects):
        for k, j in enumerate(phrases):
            if words[j - 1].text != o.color or (match_shape and words[j].text != o.shape):
                continue
            size_right = j >= 2 and words[j - 2].text == o.size
            position_right = " ".join(w.text for w in words[j + 1 : j + 4]) == o.position
            inside = _inside(words[j].point, o.box)
            weight[i, k] = pair + word * (size_right + position_right) + point * inside
    hits: list[bool | None] = [None] * n
    for i, k in zip(*linear_sum_assignment(weight, maximize=True)):
        if weight[i, k]:
            hits[i] = _inside(words[phrases[k]].point, objects[i].box)
    return hits


def _regressed_words(words: list[Word]) -> list[Word]:
    """A refined caption's words where the point head put them (`Word.regressed_box`, see `Predictor.caption`)."""
    return [
        w
        if w.regressed_box is None
        else replace(w, box=w.regressed_box, point=centre(w.regressed_box), regressed_box=None)
        for w in words
    ]


def _unverified_words(words: list[Word]) -> list[Word]:
    """A verified caption's words as the decoder said them (`Word.generated_text`, see `Predictor.caption`)."""
    return [w if w.generated_text is None else replace(w, text=w.generated_text, generated_text=None) for w in words]


def _regressed_masks(predictor: Predictor, emb: ImageEmbedding, locs: list[Localization]) -> list[np.ndarray]:
    """The mask of each localization's point-head box: its own mask where refining kept that box."""
    snapped = [i for i, loc in enumerate(locs) if loc.regressed_box is not None]
    masks = [loc.mask for loc in locs]
    if snapped:
        features = emb.features[[0] * len(snapped)]
        boxes = [locs[i].regressed_box for i in snapped]
        for i, m in zip(snapped, predictor.masks_for_boxes(features, [emb] * len(snapped), boxes)):
            masks[i] = m
    return masks


def _teacher_forced(predictor: Predictor, emb, scene: Scene) -> tuple[float, int, list[bool | None]]:
    """Teacher-forcing the reference caption: the sum of L1 (image px) between predicted and trace points over
    located tokens, their count, and `_word_point_hits` of the reference caption's words."""
    model, tok = predictor.model, predictor.model.tokenizer
    prompts = predictor._location_prompts([emb], [None], [None])
    out = model.localize(emb.features, prompts, [scene.caption])[0]
    ids, spans = tok.encode_with_offsets(scene.caption)
    n = min(len(ids), len(out.ids) - 1)
    words = _group_words(scene.caption, spans[:n], out.corners[:n], out.confidence[:n], emb.transform)
    hits = _word_point_hits(words, scene.objects)
    targets = token_targets(scene.caption, word_locations(scene.narrative), tok)
    if not targets.located[:n].any():
        return 0.0, 0, hits
    h, w = scene.image.shape[:2]
    side = max(h, w)
    pred = out.corners[:n].float().cpu().numpy().reshape(-1, 2, 2).mean(axis=1) * side  # (n, 2) image px
    loc = targets.located[:n]
    target = targets.points[:n] * np.array([w, h])
    return float(np.abs(pred[loc] - target[loc]).sum(axis=1).sum() / 2), int(loc.sum()), hits


def evaluate(predictor: Predictor, scenes: Iterator[Scene], total: int | None = None, num_beams: int = 1) -> dict:
    """The metrics of the module docstring over `scenes`; every generated caption (whole image, region, dense)
    decodes with `num_beams` (1: greedy)."""
    keys = ("ref_iou", "ref_hit", "mask_iou", "ref_iou_regressed", "ref_hit_regressed", "mask_iou_regressed")
    keys += ("region_box", "region_point", "region_point_unverified")
    keys += ("word_point", "word_point_regressed", "word_point_unverified", "word_point_any_shape")
    keys += ("word_point_teacher_forced", "texts_cut", "texts_empty")
    stats = {k: [] for k in keys}
    l1_sum, l1_count = 0.0, 0
    phrases_total, phrases_paired = 0, 0
    references, candidates = {}, {}
    dense_predictions, dense_truths = [], []
    dense = predictor.model.proposal_head is not None
    start = time.time()
    for i, scene in enumerate(tqdm(scenes, total=total, desc="eval", unit="scene")):
        emb = predictor.embed(scene.image)
        objs = scene.objects
        _score_referring(predictor, emb, [(o.referring, o.box, o.mask) for o in objs], stats)
        # region captions from the box and from a point inside the object
        points = []
        for o in objs:
            ys, xs = np.nonzero(o.mask)
            k = len(xs) // 2
            points.append((float(xs[k]) + 0.5, float(ys[k]) + 0.5))
        n = len(objs)
        caps = predictor.caption_embeddings(
            [emb] * (2 * n + 1),
            boxes=[o.box for o in objs] + [None] * (n + 1),
            points=[None] * n + points + [None],
            num_beams=num_beams,
        )
        for o, cap in zip(objs, caps[:n]):
            stats["region_box"].append(_color_shape(cap.text) == (o.color, o.shape))
        for o, cap in zip(objs, caps[n : 2 * n]):
            stats["region_point"].append(_color_shape(cap.text) == (o.color, o.shape))
            unverified = " ".join(w.text for w in _unverified_words(cap.words))
            stats["region_point_unverified"].append(_color_shape(unverified) == (o.color, o.shape))
        caption = caps[-1]
        candidates[i], references[i] = [caption.text], [scene.caption]
        hits = _word_point_hits(caption.words, objs)
        stats["word_point"] += hits
        stats["word_point_regressed"] += _word_point_hits(_regressed_words(caption.words), objs)
        stats["word_point_unverified"] += _word_point_hits(_unverified_words(caption.words), objs)
        phrases_total += len(_phrases(caption.words))
        phrases_paired += sum(h is not None for h in hits)
        stats["word_point_any_shape"] += _word_point_hits(caption.words, objs, match_shape=False)
        s, c, hits = _teacher_forced(predictor, emb, scene)
        stats["word_point_teacher_forced"] += hits
        l1_sum, l1_count = l1_sum + s, l1_count + c
        if dense:
            regions = predictor.dense_caption_embeddings([emb], score_threshold=0.05, num_beams=num_beams)[0]
            dense_predictions.append(
                DensePrediction(
                    boxes=np.array([r.box for r in regions], np.float64).reshape(-1, 4),
                    scores=np.array([r.score for r in regions]),
                    captions=[r.caption.text for r in regions],
                )
            )
            dense_truths.append(DenseTruth(np.array([o.box for o in objs]), [region_caption(o) for o in objs]))
    if not candidates:
        raise ValueError("no scenes to evaluate: give scenes (an annotations.jsonl with at least one line)")
    result = {
        "num_scenes": len(candidates),
        "num_objects": len(stats["ref_hit"]),
        **_referring_metrics(stats),
        "region_caption_acc_box": _mean(stats["region_box"]),
        "region_caption_acc_point": _mean(stats["region_point"]),
        "region_caption_acc_point_unverified": _mean(stats["region_point_unverified"]),
        "caption_word_point_acc": _mean([h is True for h in stats["word_point"]]),
        "caption_object_mention_rate": _mean([h is not None for h in stats["word_point"]]),
        "caption_word_point_acc_mentioned": _share_true(stats["word_point"]),
        "caption_word_point_acc_regressed": _mean([h is True for h in stats["word_point_regressed"]]),
        "caption_word_point_acc_mentioned_regressed": _share_true(stats["word_point_regressed"]),
        "caption_word_point_acc_unverified": _mean([h is True for h in stats["word_point_unverified"]]),
        "caption_object_mention_rate_unverified": _mean([h is not None for h in stats["word_point_unverified"]]),
        "caption_phrase_precision": phrases_paired / max(phrases_total, 1),
        "caption_object_color_rate": _mean([h is not None for h in stats["word_point_any_shape"]]),
        "caption_word_point_acc_color_named": _share_true(stats["word_point_any_shape"]),
        "caption_word_point_acc_teacher_forced": _share_true(stats["word_point_teacher_forced"]),
        "point_l1_px": l1_sum / max(l1_count, 1),
        "caption_exact_match": _mean([candidates[k][0] == references[k][0] for k in candidates]),
        "num_beams": num_beams,
        "seconds": round(time.time() - start, 1),
    }
    result.update(caption_scores(references, candidates))
    if dense:
        result.update(densecap_map(dense_predictions, dense_truths))
        default = [_above(p, PROPOSAL_SCORE_THRESHOLD) for p in dense_predictions]
        result["dense_recall@0.5"] = object_recall(
            default, dense_truths, lambda a, b: _color_shape(a) == _color_shape(b)
        )
        result["dense_regions_per_image"] = _mean([len(p.scores) for p in default])
    return result


def _score_referring(
    predictor: Predictor,
    emb: ImageEmbedding,
    targets: list[tuple[str, tuple[float, float, float, float], np.ndarray]],
    stats: dict[str, list],
) -> None:
    """Localize (text, true box, true HxW mask) targets on one image: box IoU, hit at 0.5 and mask IoU, with the
    refined box (`Predictor.localize`'s default) and, suffixed `_regressed`, with the point head's own box. A
    text longer than the model reads is cut to what it reads, and counted in `texts_cut`; an empty one (as datasets
    have a few) is a miss, counted in `texts_empty`."""
    empty = [not text.strip() for text, _, _ in targets]
    stats["texts_empty"].extend(empty)
    for _ in range(sum(empty)):
        for suffix in ("", "_regressed"):
            stats["ref_iou" + suffix].append(0.0)
            stats["ref_hit" + suffix].append(False)
            stats["mask_iou" + suffix].append(0.0)
    targets = [target for target, is_empty in zip(targets, empty) if not is_empty]
    if not targets:
        return
    texts = [_readable(predictor, text) for text, _, _ in targets]
    stats["texts_cut"].extend(text != cut for (text, _, _), cut in zip(targets, texts))
    locs = predictor.localize_embeddings([emb] * len(targets), texts, mask=True)
    for (_, true_box, true_mask), loc, mask_regressed in zip(targets, locs, _regressed_masks(predictor, emb, locs)):
        regressed = loc.box if loc.regressed_box is None else loc.regressed_box
        for suffix, box, mask in (("", loc.box, loc.mask), ("_regressed", regressed, mask_regressed)):
            iou = box_iou(box, true_box)
            stats["ref_iou" + suffix].append(iou)
            stats["ref_hit" + suffix].append(iou >= 0.5)
            stats["mask_iou" + suffix].append(mask_iou(mask, true_mask))


def _readable(predictor: Predictor, text: str) -> str:
    """`text` up to the end of its last token the model reads (`Predictor.check_text`'s limit); shorter where
    one character makes several tokens (NFKC: "½") that a cut there would keep past the limit."""
    tokenizer = predictor.model._require_tokenizer()
    limit = predictor.model.text_tokens_read
    _, offsets = tokenizer.encode_with_offsets(text)
    if len(offsets) <= limit:
        return text
    end = offsets[limit - 1][1]
    while end > 0 and len(tokenizer.encode(text[:end], add_eos=False)) > limit:
        end = max(start for start, _ in offsets if start < end)  # back to the start of the token ending there
    return text[:end]


def _referring_metrics(stats: dict[str, list]) -> dict[str, float | None]:
    return {
        "referring_texts_cut": int(sum(stats["texts_cut"])),
        "referring_texts_empty": int(sum(stats["texts_empty"])),
        "referring_acc@0.5": _mean(stats["ref_hit"]),
        "referring_mean_iou": _mean(stats["ref_iou"]),
        "mask_iou": _mean(stats["mask_iou"]),
        "referring_acc@0.5_regressed": _mean(stats["ref_hit_regressed"]),
        "referring_mean_iou_regressed": _mean(stats["ref_iou_regressed"]),
        "mask_iou_regressed": _mean(stats["mask_iou_regressed"]),
    }


def evaluate_refexp(predictor: Predictor, examples: list[RefExample], max_images: int | None = None) -> dict:
    """Referring localization and segmentation on RefCOCO-family examples (`pixelllm.data.refexp.load_refexp`).

    Each image is embedded once and all its sentences localized together; `max_images` keeps the first ones. Images
    are read as stored: COCO's annotations were drawn on the stored pixels, so an EXIF orientation (a few COCO
    files have one) is not applied, and counted. Returns the referring metrics of `evaluate`, over sentences.
    """
    by_image: dict[Path, list[RefExample]] = {}
    for example in examples:
        by_image.setdefault(example.image_path, []).append(example)
    images = list(by_image.items())[:max_images]
    stats: dict[str, list] = defaultdict(list)
    exif_turned = 0  # images with an EXIF orientation, not applied
    start = time.time()
    for path, group in tqdm(images, desc="eval refexp", unit="image"):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass the folder of the COCO images as image_dir")
        size = (group[0].height, group[0].width)
        with Image.open(path) as im:  # as stored, the frame COCO's boxes and masks were drawn in
            image = np.asarray(to_rgb(im))
            exif_turned += orientation(im) != 1
        if image.shape[:2] != size:
            raise ValueError(
                f"{path} is {image.shape[1]}x{image.shape[0]} but instances.json says "
                f"{group[0].width}x{group[0].height}: the images do not belong to these annotations"
            )
        targets = [(e.sentence, e.box, ref_mask(e)) for e in group]
        _score_referring(predictor, predictor.embed(image), targets, stats)
    if not images:
        raise ValueError("no examples to evaluate")
    return {
        "num_images": len(images),
        "num_sentences": len(stats["ref_hit"]),
        "images_exif_not_applied": exif_turned,
        **_referring_metrics(stats),
        "seconds": round(time.time() - start, 1),
    }


def _mean(values: list) -> float | None:
    """The mean of `values`, or None where there are none (not NaN, which JSON has no number for)."""
    return float(np.mean(values)) if len(values) else None


def _share_true(hits: list[bool | None]) -> float:
    """Share of True among the hits that are not None (0.0 when all are None)."""
    named = [h for h in hits if h is not None]
    return float(np.mean(named)) if named else 0.0


def _above(p: DensePrediction, threshold: float) -> DensePrediction:
    keep = p.scores >= threshold
    return DensePrediction(p.boxes[keep], p.scores[keep], [c for c, k in zip(p.captions, keep) if k])


def ptb_tokenized(texts: list[str]) -> list[str]:
    """COCO caption evaluation's tokenization: Stanford's PTB tokenizer (the jar pycocoevalcap ships, run by Java),
    lowercased, punctuation tokens dropped ("A circle, left." -> "a circle left"). Where Java does not run: words of
    letters and digits, lowercased (PTB splits "it's" into "it 's"; this keeps "it's")."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    lines = [t.replace("\n", " ").replace("\r", " ") for t in texts]
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    try:
        done = subprocess.run(command, input="\n".join(lines), capture_output=True, text=True, timeout=600, check=True)
        out = done.stdout.split("\n")[: len(lines)]
        if len(out) != len(lines):
            raise RuntimeError(f"{len(lines)} captions in, {len(out)} lines out")
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        log.warning("PTB tokenizer (Java) did not run (%s): captions tokenized by a regex instead", e)
        return [" ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", t.lower())) for t in lines]
    drop = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.split() if w not in drop) for line in out]


def caption_scores(references: dict, candidates: dict) -> dict:
    """BLEU-4, ROUGE-L, CIDEr (and METEOR where Java runs) from pycocoevalcap, when it is installed, on captions
    tokenized as COCO's evaluation tokenizes them (`ptb_tokenized`)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        log.warning(
            "pycocoevalcap is not installed: caption scores skipped (pip install -e '.[eval]' in the checkout; make setup does)"
        )
        return {}
    keys = list(references)
    ends = np.cumsum([0, *(len(references[k]) for k in keys)])
    flat = ptb_tokenized([c for k in keys for c in references[k]] + [candidates[k][0] for k in keys])
    references = {k: flat[a:b] for k, a, b in zip(keys, ends[:-1], ends[1:])}
    candidates = {k: [text] for k, text in zip(keys, flat[ends[-1] :])}
    scores = {
        "bleu4": Bleu(4).compute_score(references, candidates, verbose=0)[0][3],
        "rouge_l": Rouge().compute_score(references, candidates)[0],
        "cider": Cider().compute_score(references, candidates)[0],
    }
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["meteor"] = Meteor().compute_score(references, candidates)[0]
    except Exception as e:  # METEOR runs a Java subprocess; report its absence instead of failing the eval
        log.warning("METEOR skipped: %s", e)
    return {k: float(v) for k, v in scores.items()}


def _quantized(predictor: Predictor) -> str:
    """What the evaluated language model is: "int8" or "none"."""
    return "int8" if predictor.model.language_model.quantized else "none"


def run_eval(
    model_dir: str,
    out: str | None,
    data: str | None,
    num_scenes: int,
    seed: int,
    renderer: str,
    device: str | None = None,
    num_beams: int = 1,
    quantize: str = "none",
) -> dict:
    """Caption and localize scenes (a `pixelllm data synth` folder `data`, else generated) and score them."""
    from .build import load_model

    annotations = Path(data) / "annotations.jsonl" if data else None
    if annotations is not None and not annotations.is_file():
        raise ValueError(
            f"{data} is not a folder written by `pixelllm data synth` (it has no annotations.jsonl): this evaluation "
            "scores words against the generator's objects; for your own data, caption it (`pixelllm caption`, "
            "`pixelllm batch`) or write a RefCOCO-layout set for --refcoco"
        )
    if annotations is not None:  # counted before the model loads: a folder without scenes is refused at once
        scenes, total = load_scenes(data), _count_scenes(annotations)
    else:
        scenes, total = generated_scenes(num_scenes, seed, renderer), num_scenes
    predictor = Predictor(load_model(model_dir, device=device, quantize=quantize))
    with torch.no_grad():
        result = evaluate(predictor, scenes, total, num_beams)
    result.update(
        model=str(model_dir), data=data or f"{renderer} renderer, seed {seed}", quantize=_quantized(predictor)
    )
    _write(result, out)
    return result


def _count_scenes(annotations: Path) -> int:
    """The scenes of a `pixelllm data synth` folder's annotations.jsonl; a `ValueError` naming it when it has none."""
    with annotations.open() as f:
        total = sum(1 for line in f if line.strip())
    if not total:
        raise ValueError(
            f"{annotations} holds no scenes: write some with `pixelllm data synth --out {annotations.parent} --n N "
            "--overwrite`, or give another --data folder"
        )
    return total


def run_refexp_eval(
    model_dir: str,
    out: str | None,
    data_root: str,
    dataset: str = "refcoco",
    split_by: str = "unc",
    split: str = "val",
    image_dir: str | None = None,
    max_images: int | None = None,
    device: str | None = None,
    quantize: str = "none",
) -> dict:
    """`pixelllm eval --refcoco DATA_ROOT`: `evaluate_refexp` on one split of a RefCOCO-family dataset."""
    from .build import load_model

    examples = load_refexp(data_root, dataset, split_by, split, image_dir)
    predictor = Predictor(load_model(model_dir, device=device, quantize=quantize))
    with torch.no_grad():
        result = evaluate_refexp(predictor, examples, max_images)
    result.update(
        model=str(model_dir), data=f"{dataset} ({split_by}) {split}, {data_root}", quantize=_quantized(predictor)
    )
    _write(result, out)
    return result


def _write(result: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


__all__ = ["evaluate", "evaluate_refexp", "run_eval", "run_refexp_eval", "box_iou", "mask_iou"]
