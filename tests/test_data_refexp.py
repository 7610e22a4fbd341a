import builtins
import json
import pickle
import shutil

import numpy as np
import pytest
from server_helpers import DEFAULT_MODEL_DIR

from pixelllm.data.refexp import load_refexp, load_refs, ref_mask
from pixelllm.data.rle import decode_segmentation, encode_mask


@pytest.fixture
def refer_root(tmp_path):
    """A two-image, three-ref dataset in the refer layout (refs(unc).p + instances.json)."""
    rle_mask = np.zeros((30, 40), dtype=bool)
    rle_mask[5:15, 10:30] = True
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 50, "height": 20},
        ],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10], "segmentation": encode_mask(rle_mask)},
            {
                "id": 12,
                "image_id": 1,
                "category_id": 2,
                "bbox": [0, 0, 5, 5],
                "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]],
            },
            {
                "id": 21,
                "image_id": 2,
                "category_id": 1,
                "bbox": [2, 3, 4, 5],
                "segmentation": [[2, 3, 6, 3, 6, 8, 2, 8]],
            },
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
    }

    def ref(ref_id, ann_id, image_id, split, sents):
        sentences = [
            {"sent": s, "raw": s.capitalize(), "tokens": s.split(), "sent_id": 100 * ref_id + i}
            for i, s in enumerate(sents)
        ]
        file_name = f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"
        cat = 2 if ann_id == 12 else 1
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences], "category_id": cat, "file_name": file_name}  # fmt: skip

    refs = [
        ref(1, 11, 1, "val", ["man on the left", "guy in red"]),
        ref(2, 12, 1, "testA", ["small dog"]),
        ref(3, 21, 2, "val", ["person"]),
    ]
    (tmp_path / "refcoco").mkdir()
    with open(tmp_path / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (tmp_path / "refcoco" / "instances.json").write_text(json.dumps(instances))
    return tmp_path, rle_mask


def test_load_refexp(refer_root):
    root, rle_mask = refer_root
    examples = load_refexp(root, "refcoco", "unc", "val")
    assert [e.sentence for e in examples] == ["man on the left", "guy in red", "person"]
    first, _, third = examples
    assert first.box == (10.0, 5.0, 30.0, 15.0)
    assert first.image_path == root / "images/mscoco/images/train2014/COCO_train2014_000000000001.jpg"
    assert (first.image_id, first.ref_id, first.ann_id, first.sent_id, first.category_id) == (1, 1, 11, 100, 1)
    np.testing.assert_array_equal(ref_mask(first), rle_mask)

    mask = ref_mask(third)
    assert mask.shape == (20, 50)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (2, 3, 6, 8)

    (dog,) = load_refexp(root, split="testA", image_dir=root / "coco")
    assert dog.sentence == "small dog" and dog.box == (0.0, 0.0, 5.0, 5.0)
    assert dog.image_path == root / "coco" / "COCO_train2014_000000000001.jpg"


def test_load_refexp_errors(refer_root):
    root, _ = refer_root
    with pytest.raises(ValueError, match="available: testA, val"):
        load_refexp(root, split="testB")
    with pytest.raises(FileNotFoundError, match=r"refs\(google\)\.p"):
        load_refexp(root, split_by="google")


def test_annotation_files_that_do_not_match_name_the_ref_and_file(refer_root, tmp_path):
    root, _ = refer_root
    copy = tmp_path / "copy"
    shutil.copytree(root / "refcoco", copy / "refcoco")
    instances = json.loads((copy / "refcoco" / "instances.json").read_text())
    instances["annotations"] = [a for a in instances["annotations"] if a["id"] != 21]
    (copy / "refcoco" / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"ref 3 names annotation 21, which .*instances\.json does not have"):
        load_refexp(copy, split="val")
    original = json.loads((root / "refcoco" / "instances.json").read_text())
    for key, fault, message in (
        ("segmentation", None, r"annotation 21 \(of ref 3\) has no 'segmentation': give it polygons or RLE"),
        ("bbox", [1, 2, 3], r"annotation 21 \(of ref 3\): bbox is \[1, 2, 3\]; give it \[x, y, width, height\]"),
        ("width", None, r"image \d+ has no 'width': give it pixels"),
    ):
        instances = json.loads(json.dumps(original))
        for record in instances["annotations" if key != "width" else "images"]:
            if key != "width" and record["id"] != 21:
                continue
            if fault is None:
                del record[key]
            else:
                record[key] = fault
        (copy / "refcoco" / "instances.json").write_text(json.dumps(instances))
        with pytest.raises(ValueError, match=message):
            load_refexp(copy, split="val")
    (copy / "refcoco" / "instances.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"instances\.json is not valid JSON"):
        load_refexp(copy, split="val")


def test_degenerate_polygons_are_dropped():
    """A polygon of two points (4 numbers) encloses nothing; pycocotools would take the list for boxes."""
    square = [0, 0, 5, 0, 5, 5, 0, 5]
    assert not decode_segmentation([[10, 10, 50, 50]], 30, 40).any()
    np.testing.assert_array_equal(
        decode_segmentation([[10, 10, 50, 50], square], 30, 40), decode_segmentation([square], 30, 40)
    )


class _Payload:
    """Unpickled, it creates the file `marker`."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_refs_pickle_refuses_code(tmp_path):
    path, marker = tmp_path / "refs(unc).p", tmp_path / "payload-ran"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "evil": _Payload(marker)}]))
    with pytest.raises(pickle.UnpicklingError, match="only plain builtins"):
        load_refs(path)
    assert not marker.exists(), "the payload ran"
    pickle.loads(path.read_bytes())  # the control: an unsafe load does run it
    assert marker.exists()


def write_refer_layout(root, scenes) -> None:
    """Scenes as a RefCOCO-style dataset: PNG images, instances.json (RLE masks), refs(unc).p, all in "val"."""
    from PIL import Image

    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    image_dir.mkdir(parents=True)
    images, annotations, refs = [], [], []
    for i, scene in enumerate(scenes, start=1):
        h, w = scene.image.shape[:2]
        file_name = f"COCO_train2014_{i:012d}.png"
        Image.fromarray(scene.image).save(image_dir / file_name)
        images.append({"id": i, "file_name": file_name, "width": w, "height": h})
        for j, o in enumerate(scene.objects):
            ann_id = 100 * i + j
            x0, y0, x1, y1 = o.box
            segmentation = encode_mask(o.mask)
            annotations.append({"id": ann_id, "image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "segmentation": segmentation})  # fmt: skip
            sentence = {"sent": o.referring, "raw": o.referring, "tokens": o.referring.split(), "sent_id": ann_id}
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": i, "split": "val", "sentences": [sentence],
                         "sent_ids": [ann_id], "category_id": 1, "file_name": file_name})  # fmt: skip
    (root / "refcoco").mkdir()
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    instances = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "shape"}]}
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))


def test_eval_on_the_refer_layout_equals_the_scene_eval(tmp_path, capsys, one_thread):
    """`pixelllm eval --refcoco` on scenes written in the refer layout gives the scene eval's referring figures."""
    import torch

    from pixelllm import Predictor
    from pixelllm.build import load_model
    from pixelllm.cli import main
    from pixelllm.evaluate import evaluate, generated_scenes

    model = str(DEFAULT_MODEL_DIR)
    scenes = list(generated_scenes(3, 1000, "independent"))
    write_refer_layout(tmp_path, scenes)
    out = tmp_path / "refcoco.json"
    assert main(["eval", "--model", model, "--refcoco", str(tmp_path), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    with torch.no_grad():
        expected = evaluate(Predictor(load_model(model)), iter(scenes))
    assert got["num_images"] == 3 and got["num_sentences"] == expected["num_objects"]
    keys = [k for k in got if k.startswith(("referring_", "mask_iou"))]
    assert len(keys) == 8  # acc@0.5, mean IoU and mask IoU, of the chosen and of the regressed box; texts cut, empty
    assert got["referring_texts_cut"] == got["referring_texts_empty"] == got["images_exif_not_applied"] == 0
    for key in keys:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert got["referring_acc@0.5"] > 0.5  # the default model finds these objects

    code = main(["eval", "--model", model, "--refcoco", str(tmp_path), "--split", "testA"])
    assert code == 2 and "split 'testA' not in" in capsys.readouterr().err


def test_an_empty_sentence_is_a_miss_and_exif_orientations_are_not_applied(tmp_path, one_thread):
    """A dataset's odd items do not stop its evaluation: an empty sentence counts as a miss; an image with an EXIF
    orientation is read as stored, the frame COCO's boxes were drawn in (turned by 90 degrees it would not even have
    the annotated size; by 180, the boxes would be upside down)."""
    from PIL import Image

    from pixelllm import Predictor
    from pixelllm.build import load_model
    from pixelllm.data.refexp import load_refexp
    from pixelllm.evaluate import evaluate_refexp, generated_scenes

    scenes = list(generated_scenes(2, 1000, "independent"))
    for name in ("plain", "odd"):
        write_refer_layout(tmp_path / name, scenes)
    refs_path = tmp_path / "odd" / "refcoco" / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())
    refs[0]["sentences"].append({"sent": " ", "raw": " ", "tokens": [], "sent_id": 999})
    refs[0]["sent_ids"].append(999)
    refs_path.write_bytes(pickle.dumps(refs, protocol=2))
    for i, turn in ((1, 6), (2, 3)):  # 90 and 180 degrees
        image_path = next((tmp_path / "odd" / "images").rglob(f"*_{i:012d}.png"))
        exif = Image.Exif()
        exif[0x0112] = turn
        Image.open(image_path).save(image_path, exif=exif)

    predictor = Predictor(load_model(str(DEFAULT_MODEL_DIR)))
    plain, odd = (evaluate_refexp(predictor, load_refexp(tmp_path / name, split="val")) for name in ("plain", "odd"))
    n = plain["num_sentences"]
    assert odd["num_sentences"] == n + 1 and odd["referring_texts_empty"] == 1 and odd["images_exif_not_applied"] == 2
    for key in ("referring_acc@0.5", "referring_mean_iou", "mask_iou"):
        assert odd[key] == pytest.approx(plain[key] * n / (n + 1), abs=1e-9), key
