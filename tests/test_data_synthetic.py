import functools
import json

import numpy as np
import pytest
from PIL import Image
from server_helpers import ROOT

from pixelllm.data.independent import render_independent_scene
from pixelllm.data.narratives import read_narratives, token_targets, word_locations
from pixelllm.data.rle import decode_segmentation
from pixelllm.data.synthetic import (
    CANVAS_RANGE,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    VOCABULARY,
    generate_scene,
    position_phrase,
    region_caption,
    scene_annotation,
    scene_caption,
    scene_seed,
    write_dataset,
)
from pixelllm.evaluate import load_scenes
from pixelllm.tokenizer import Tokenizer

RENDERERS = {"synthetic": generate_scene, "independent": render_independent_scene}
SEEDS = range(5)


@functools.cache
def scene(renderer, seed):
    return RENDERERS[renderer](seed)


def words_of(text):
    return text.replace(",", " ").rstrip(".").split()


def referents(expression, objects):
    """The objects an expression like "the large red circle on the left" can mean."""
    words = words_of(expression)
    assert words[0] == "the"
    shape_at = next(i for i, w in enumerate(words) if w in SHAPES)
    position = " ".join(words[shape_at + 1 :]) or None
    assert position is None or position in POSITIONS
    attrs = words[1:shape_at]
    assert all(a in SIZES or a in COLORS for a in attrs)
    return [
        o
        for o in objects
        if o.shape == words[shape_at] and all(a in (o.size, o.color) for a in attrs) and position in (None, o.position)
    ]


def check_scene_contract(scene):
    """What every renderer of the vocabulary promises (the evaluation relies on it)."""
    h, w, c = scene.image.shape
    assert scene.image.dtype == np.uint8 and c == 3
    assert CANVAS_RANGE[0] <= w <= CANVAS_RANGE[1] and CANVAS_RANGE[0] <= h <= CANVAS_RANGE[1]
    assert 1 <= len(scene.objects) <= 4
    assert scene.caption == scene_caption(scene.objects)
    assert set(words_of(scene.caption)) <= VOCABULARY
    for obj in scene.objects:
        assert obj.shape in SHAPES and obj.color in COLORS and obj.size in SIZES and obj.position in POSITIONS
        assert obj.mask.shape == (h, w) and obj.mask.dtype == bool
        ys, xs = np.nonzero(obj.mask)
        assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), "box must be tight around the mask"
        x0, y0, x1, y1 = obj.box
        assert obj.position == position_phrase((x0 + x1) / 2, (y0 + y1) / 2, w, h)
        extent = max(x1 - x0, y1 - y0) / min(w, h)
        assert extent < 0.21 if obj.size == "small" else extent > 0.22
        assert set(words_of(obj.referring)) <= VOCABULARY
        assert referents(obj.referring, scene.objects) == [obj], "referring expression must be unique"
        assert region_caption(obj) == f"a {obj.size} {obj.color} {obj.shape}."
    for a in scene.objects:
        for b in scene.objects:
            assert a is b or not (a.mask & b.mask).any(), "masks are the visible, disjoint pixels"
    check_narrative(scene)


def check_narrative(scene):
    h, w = scene.image.shape[:2]
    rec = scene.narrative
    assert rec["image_id"] == scene.image_id and rec["caption"] == scene.caption
    timed = rec["timed_caption"]
    assert [t["utterance"] for t in timed] == words_of(scene.caption)
    starts = [t["start_time"] for t in timed]
    assert all(t["start_time"] < t["end_time"] for t in timed)
    assert starts == sorted(starts) and all(a["end_time"] <= b["start_time"] for a, b in zip(timed, timed[1:]))
    points = [p for segment in rec["traces"] for p in segment]
    ts = [p["t"] for p in points]
    assert ts == sorted(ts) and all(0 <= p["x"] <= 1 and 0 <= p["y"] <= 1 for p in points)

    shape_utts = [t for t in timed if t["utterance"] in SHAPES]
    located = [wd for wd in word_locations(rec) if wd.text in SHAPES]
    assert len(shape_utts) == len(located) == len(scene.objects)
    for obj, utt, word in zip(scene.objects, shape_utts, located):
        assert utt["utterance"] == obj.shape
        x0, y0, x1, y1 = obj.box
        inside = [p for p in points if utt["start_time"] <= p["t"] <= utt["end_time"]]
        assert inside, "the trace must be sampled while the shape word is spoken"
        for p in inside:
            assert x0 - 1 <= p["x"] * w <= x1 + 1 and y0 - 1 <= p["y"] * h <= y1 + 1
        bx0, by0, bx1, by1 = word.box
        assert x0 - 1 <= bx0 * w and bx1 * w <= x1 + 1 and y0 - 1 <= by0 * h and by1 * h <= y1 + 1


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("renderer", RENDERERS)
def test_scene_contract(renderer, seed):
    check_scene_contract(scene(renderer, seed))


@pytest.mark.parametrize("renderer", RENDERERS)
def test_deterministic_by_seed(renderer):
    a, b = scene(renderer, 3), RENDERERS[renderer](3)
    assert a is not b
    np.testing.assert_array_equal(a.image, b.image)
    assert scene_annotation(a, "x.jpg") == scene_annotation(b, "x.jpg")
    assert a.narrative == b.narrative
    other = scene(renderer, 4)
    assert a.image.shape != other.image.shape or not np.array_equal(a.image, other.image)
    assert a.narrative != other.narrative


def test_renderers_differ():
    a, b = scene("synthetic", 0), scene("independent", 0)
    assert a.image_id != b.image_id
    assert a.image.shape != b.image.shape or a.caption != b.caption


@pytest.mark.parametrize("renderer", RENDERERS)
def test_write_dataset_round_trip(tmp_path, renderer):
    out = write_dataset(tmp_path / "a", n=2, seed=7, renderer=renderer)
    again = write_dataset(tmp_path / "b", n=2, seed=7, renderer=renderer)
    for name in ("narratives.jsonl", "annotations.jsonl"):
        assert (out / name).read_bytes() == (again / name).read_bytes()

    records = list(read_narratives(out / "narratives.jsonl"))
    annotations = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(records) == len(annotations) == 2
    tokenizer = Tokenizer.train([r["caption"] for r in records] * 5, vocab_size=40)
    for i, (rec, ann) in enumerate(zip(records, annotations)):
        sc = RENDERERS[renderer](scene_seed(7, i))
        assert rec == sc.narrative and ann["image_id"] == rec["image_id"] == sc.image_id
        assert (out / ann["file_name"]).read_bytes() == (again / ann["file_name"]).read_bytes()
        with Image.open(out / ann["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (ann["width"], ann["height"])
        for obj, o in zip(ann["objects"], sc.objects):
            mask = decode_segmentation(obj["mask"], ann["height"], ann["width"])
            np.testing.assert_array_equal(mask, o.mask)
            assert obj["box"] == list(o.box) and obj["referring"] == o.referring
            assert obj["region_caption"] == region_caption(o)

        targets = token_targets(rec["caption"], word_locations(rec), tokenizer)
        assert targets.boxes.shape == (len(targets.ids), 4)
        assert targets.located[:-1].any() and not targets.located[-1]
        assert ((targets.boxes >= 0) & (targets.boxes <= 1)).all()

    for i, loaded in enumerate(load_scenes(out)):  # as `pixelllm eval --data` reads it back
        sc = RENDERERS[renderer](scene_seed(7, i))
        assert loaded.image.shape == sc.image.shape and np.abs(loaded.image.astype(int) - sc.image).mean() < 4
        assert (loaded.caption, loaded.narrative) == (sc.caption, sc.narrative)
        assert [(o.box, o.referring) for o in loaded.objects] == [(o.box, o.referring) for o in sc.objects]
    assert i == 1


def test_a_folder_that_holds_files_is_refused_unless_overwrite(tmp_path, capsys):
    """`pixelllm data synth --out DIR` used to truncate DIR's narratives.jsonl and annotations.jsonl without a word."""
    from pixelllm.cli import main

    out = write_dataset(tmp_path / "d", n=2, seed=7)
    before = (out / "narratives.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="is not empty: give an empty or new folder, or pass --overwrite"):
        write_dataset(out, n=1, seed=8)
    assert main(["data", "synth", "--out", str(out), "--n", "1", "--seed", "8"]) == 2
    assert f"pixelllm: error: {out} is not empty" in capsys.readouterr().err
    assert (out / "narratives.jsonl").read_bytes() == before
    assert main(["data", "synth", "--out", str(out), "--n", "1", "--seed", "8", "--overwrite"]) == 0
    assert len((out / "annotations.jsonl").read_text().splitlines()) == 1


def test_a_write_cut_off_leaves_no_half_jsonl_under_its_name(tmp_path, monkeypatch):
    import pixelllm.data.synthetic as synthetic

    out = write_dataset(tmp_path / "d", n=2, seed=7)
    before = {name: (out / name).read_bytes() for name in ("narratives.jsonl", "annotations.jsonl")}
    drawn = []

    def cut_off_at_the_second(seed: int):
        drawn.append(seed)
        if len(drawn) == 2:
            raise KeyboardInterrupt
        return generate_scene(seed)

    monkeypatch.setattr(synthetic, "generate_scene", cut_off_at_the_second)
    for folder, overwrite in ((tmp_path / "new", False), (out, True)):
        drawn.clear()
        with pytest.raises(KeyboardInterrupt):
            write_dataset(folder, n=3, seed=8, overwrite=overwrite)
        assert sorted(p.name for p in folder.iterdir()) == (
            ["annotations.jsonl", "images", "narratives.jsonl"] if overwrite else ["images"]
        )
    assert {name: (out / name).read_bytes() for name in before} == before  # the finished dataset, whole


def test_unknown_renderer(tmp_path):
    with pytest.raises(ValueError, match="unknown renderer"):
        write_dataset(tmp_path, n=1, seed=0, renderer="nope")


def test_a_prepared_scene_keeps_its_masks_at_one_bit_a_pixel_in_the_model_square() -> None:
    """A run holds every prepared scene (10000 in the shipped recipe's stages): a mask is S*S/8 bytes, and reads
    back as the object's (S, S) bool mask, the pixels of its box in the square."""
    from pixelllm.config import load_config
    from pixelllm.data.tasks import prepare_scene

    tokenizer = Tokenizer.from_file(ROOT / "pixelllm" / "configs" / "tokenizers" / "pixelllm-tiny.json")
    scene = generate_scene(11)
    side = load_config("pixelllm-tiny").image_size
    prepared = prepare_scene(scene, side, tokenizer)
    scale = side / max(scene.image.shape[:2])
    for obj, prepared_obj in zip(scene.objects, prepared.objects):
        assert prepared_obj.packed_mask.nbytes == side * side // 8
        mask = prepared_obj.mask
        assert mask.shape == (side, side) and mask.dtype == bool
        ys, xs = np.nonzero(mask)
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        np.testing.assert_allclose(found, np.asarray(obj.box) * scale, atol=2)
