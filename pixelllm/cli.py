"""The `pixelllm` command line: caption, localize, dense, visualize, serve, batch, train, eval and data synthesis.

Coordinates are absolute pixels of the input image (x right, y down): --box x0,y0,x1,y1 and --point x,y.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from .config import DEFAULT_WEIGHTS, MAX_PROPOSALS, PROPOSAL_NMS_IOU, PROPOSAL_SCORE_THRESHOLD

DEFAULT_MODEL = os.environ.get("PIXELLLM_MODEL", str(DEFAULT_WEIGHTS))


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free port) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _floats(text: str, n: int, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CLIError(f"--{name} must be {n} comma-separated numbers, got {text!r}") from None
    if len(values) != n:
        raise CLIError(f"--{name} must be {n} comma-separated numbers, got {text!r}")
    return values


def _require_file(path: str) -> None:
    if Path(path).is_dir():
        raise CLIError(f"{path} is a folder, not an image file (pixelllm batch takes a folder of images)")
    if not Path(path).is_file():
        raise CLIError(f"image not found: {path}")


def _load_image(path: str, image_size: int | None = None):
    """The image at `path` as the service decodes it (`pixelllm.transforms.decode`): reduced for the model input
    side `image_size` if given, else in full (to draw on)."""
    from PIL import Image

    from .transforms import decode

    _require_file(path)
    try:
        with Image.open(path) as im:
            return decode(im, image_size)
    except Exception as e:  # Pillow raises many kinds for a broken or hostile file (the service catches them too)
        raise CLIError(f"cannot read image {path}: {e}") from None


def _check_device(device: str | None) -> None:
    """Raise `CLIError` unless torch can use `device` (cpu, cuda, cuda:1 ...) on this machine."""
    import torch

    try:
        torch.empty(0, device=device)
    except RuntimeError as e:
        raise CLIError(f"--device {device}: not a device torch can use here: {e}") from None


def _predictor(args):
    from .build import load_model
    from .predictor import Predictor

    _check_device(args.device)
    try:
        model = load_model(args.model, device=args.device, quantize=args.quantize)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    return Predictor(model)


def _predictor_on_image(args, text: str | None = None):
    """The predictor with `args.image` set, decoded for the model's input size (a photo at reduced scale); a
    `text` to localize is checked first (it must fit the model), before the image is read."""
    _require_file(args.image)  # before the model loads
    p = _predictor(args)
    if text is not None:
        try:
            p.check_text(text)
        except ValueError as e:
            raise CLIError(str(e)) from None
    p.set_image(_load_image(args.image, p.model.cfg.image_size))
    return p


def _print_result(result, as_json: bool) -> None:
    """A caption or localization as text, or as one JSON line; a mask as its area (text) or COCO RLE (JSON)."""
    from .data.rle import encode_mask

    data = dataclasses.asdict(result)
    mask = data.pop("mask", None)
    if mask is not None:
        data["mask_area"] = int(mask.sum())
        data["mask"] = encode_mask(mask)
    if as_json:
        print(json.dumps(data))
        return
    headline = data.get("text", "")
    if "box" in data:
        headline += "  box=(" + ", ".join(f"{v:.1f}" for v in data["box"]) + f")  score={data['score']:.2f}"
    if mask is not None:
        headline += f"  mask={data['mask_area']} px (--json: COCO RLE; visualize --text draws it)"
    print(headline)
    for w in data["words"]:
        print(_word_line(w))


def _word_line(w: dict) -> str:
    box = ", ".join(f"{v:.1f}" for v in w["box"])
    return f"  {w['text']:<14} point=({w['point'][0]:.1f}, {w['point'][1]:.1f})  box=({box})  score={w['score']:.2f}"


def _print_stream(stream, as_json: bool):
    """Print each word of a `caption_stream` as it comes (a JSON line each with --json); returns the Caption."""
    while True:
        try:
            word = dataclasses.asdict(next(stream))
        except StopIteration as end:
            return end.value
        print(json.dumps(word) if as_json else _word_line(word), flush=True)


def cmd_caption(args) -> None:
    box = _floats(args.box, 4, "box") if args.box else None
    point = _floats(args.point, 2, "point") if args.point else None
    if args.stream and args.num_beams != 1:
        raise CLIError("--stream decodes greedily (beam search knows its words only at the end): drop --num-beams")
    p = _predictor_on_image(args)
    try:
        if args.stream:
            result = _print_stream(
                p.caption_stream(box, point, args.max_new_tokens, refine=not args.no_refine, verify=not args.no_verify),
                args.json,
            )
        else:
            result = p.caption(
                box, point, args.max_new_tokens, args.num_beams, refine=not args.no_refine, verify=not args.no_verify
            )
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.stream and not args.json:
        print(result.text)  # its words are printed already
    else:
        _print_result(result, args.json)


def cmd_localize(args) -> None:
    if not args.text.strip():
        raise CLIError("the text to localize is empty: give the words of what to find")
    p = _predictor_on_image(args, args.text)
    try:
        result = p.localize(args.text, mask=args.mask, refine=not args.no_refine)
    except ValueError as e:
        raise CLIError(str(e)) from None
    _print_result(result, args.json)


def _dense(p, args) -> list:
    try:
        return p.dense_caption(score_threshold=args.score_threshold, nms_iou=args.nms_iou, max_regions=args.max_regions)
    except (ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from None


def cmd_dense(args) -> None:
    p = _predictor_on_image(args)
    regions = _dense(p, args)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in regions]))
        return
    if not regions:
        print(f"no region scored >= {args.score_threshold}")
    for i, r in enumerate(regions, start=1):
        box = ", ".join(f"{v:.1f}" for v in r.box)
        print(f"{i:>2}. {r.caption.text:<40} box=({box})  score={r.score:.2f}")


def _require_image_suffix(path: str) -> None:
    """A `CLIError` naming the usual suffixes unless Pillow can write an image to `path` by its suffix."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        said = f"its suffix {suffix!r}" if suffix else "it has no suffix"
        raise CLIError(f"cannot write an image to {path}: {said}; end it in .png, .jpg or .webp")


def cmd_visualize(args) -> None:
    from .visualize import render_dense, render_overlay

    if sum((args.box is not None, args.text is not None, args.dense)) > 1:
        raise CLIError("give one of --box, --text and --dense")
    _require_image_suffix(args.output)  # before the model runs
    if args.text is not None and not args.text.strip():
        raise CLIError("the text to localize is empty: give the words of what to find, or no --text to caption")
    box = _floats(args.box, 4, "box") if args.box else None
    p = _predictor_on_image(args, args.text)
    image = _load_image(args.image).image  # in full, to draw on
    if args.dense:
        render_dense(image, _dense(p, args)).save(args.output)
    else:
        try:
            result = p.localize(args.text, mask=True) if args.text is not None else p.caption(box=box)
        except ValueError as e:
            raise CLIError(str(e)) from None
        render_overlay(image, result).save(args.output)
    print(f"wrote {args.output}")


def cmd_serve(args) -> None:
    from server import StartupError, run
    from server.settings import read_settings

    if args.ray:
        try:
            from server.ray_app import run
        except ImportError as e:
            if not (e.name or "").startswith("ray"):
                raise
            raise CLIError("--ray needs Ray Serve: pip install -e '.[ray]' in the checkout (make setup does)") from None
    try:
        run(args.host, args.port, read_settings())
    except StartupError as e:
        raise CLIError(str(e)) from None


def cmd_api_key(args) -> None:
    from server.security import hash_key, new_key

    key = new_key()
    if args.keys_file:
        folder = Path(args.keys_file).parent
        if not folder.is_dir():
            raise CLIError(f"no folder {folder} for the keys file: create it first (mkdir -p {folder})")
        with open(args.keys_file, "a+b") as f:
            f.seek(0, os.SEEK_END)
            ends_a_line = f.tell() == 0 or (f.seek(-1, os.SEEK_END), f.read(1))[1] == b"\n"
            line = f"{hash_key(key)}  # {args.note or 'added by pixelllm api-key'}\n"
            f.write((line if ends_a_line else "\n" + line).encode())
    print(f"key:  {key}")
    print(f"hash: {hash_key(key)}")
    where = f"its hash was added to {args.keys_file}" if args.keys_file else "put its hash in PIXELLLM_API_KEYS_FILE"
    print(f"Give the key to the client (it is shown once, and not stored); {where}.", file=sys.stderr)


def cmd_batch(args) -> int:
    from .batch import BatchError, Options, default_errors_path, discover, run_batch

    if len(args.input) > 1:  # an unquoted glob, expanded by the shell
        shown = " ".join(args.input[:3]) + (" ..." if len(args.input) > 3 else "")
        raise CLIError(
            f"give one input, got {len(args.input)} ({shown}): quote a glob, as in 'imgs/*.jpg', so that the "
            "shell does not expand it"
        )
    output = Path(args.output)
    errors = Path(args.errors) if args.errors else default_errors_path(output)
    try:
        options = Options(
            args.server,
            args.concurrency,
            args.timeout,
            args.retries,
            progress=not args.no_progress,
            api_key=os.environ.get("PIXELLLM_API_KEY", "").strip() or None,  # a key file's CRLF goes
        )
        items, refused = discover(args.input[0], args.root, args.allow_outside_root, args.text)
        summary = run_batch(items, refused, output, errors, options)
    except BatchError as e:
        raise CLIError(str(e)) from None
    print(json.dumps(summary.to_dict()) if args.json else summary)
    return 1 if summary.failed else 0


def cmd_train(args) -> None:
    from .train import TrainingDiverged
    from .train import main as train_main

    logging.getLogger("pixelllm.train").setLevel(logging.INFO)  # resumed at step N, nothing to train, ...
    argv = [args.config] + (["--steps", str(args.steps)] if args.steps else [])
    argv += ["--out-dir", args.out_dir] if args.out_dir else []
    try:
        train_main(argv)
    except (FileNotFoundError, ValueError, TrainingDiverged) as e:  # what to fix (a config, a path...) is in `e`
        if args.verbose:
            raise
        raise CLIError(f"{e} (pixelllm -v train ...: the traceback)") from None


def cmd_eval(args) -> None:
    from .evaluate import run_eval, run_refexp_eval

    if args.refcoco and args.data:
        raise CLIError("--refcoco and --data are two different datasets: pass one")
    _check_device(args.device)
    try:
        if args.refcoco:
            result = run_refexp_eval(
                args.model, args.out, args.refcoco, args.dataset, args.split_by, args.split, args.image_dir,
                args.max_images, args.device, args.quantize,
            )  # fmt: skip
        else:
            result = run_eval(
                args.model, args.out, args.data, args.num_scenes, args.seed, args.renderer, args.device, args.num_beams,
                args.quantize,
            )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    print(json.dumps(result, indent=2))


def cmd_data_synth(args) -> None:
    from .data.synthetic import write_dataset

    out = write_dataset(args.out, args.n, args.seed, renderer=args.renderer, overwrite=args.overwrite)
    print(f"wrote {args.n} scenes to {out}")


def cmd_data_coco_captions(args) -> None:
    from .data.narratives import coco_captions_to_narratives

    try:
        n = coco_captions_to_narratives(args.annotations, args.out)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"wrote {n} captions to {args.out}")


class _Parser(argparse.ArgumentParser):
    """argparse takes `--point -5,-5`'s value for a flag: its error then says how to give one."""

    def error(self, message: str) -> NoReturn:
        if message.endswith("expected one argument"):
            message += " (a value that starts with '-' goes after '=', as in --point=-5,-5)"
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pixelllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def quantize_arg(p):
        p.add_argument(
            "--quantize",
            choices=["none", "int8"],
            default="none",
            help="int8: the language model's weights in int8, for faster CPU decoding with a large language model "
            "(pixelllm-base and up; slower on the tiny default); answers may differ slightly",
        )

    def renderer_arg(p, default: str):
        p.add_argument(
            "--renderer",
            choices=["synthetic", "independent"],
            default=default,
            help="synthetic: the drawing code of training; independent: other code, for evaluation "
            "(default: %(default)s)",
        )

    def model_args(p, json_output: bool = True):
        p.add_argument("--model", default=DEFAULT_MODEL, help="model directory or preset (default: %(default)s)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
        quantize_arg(p)
        if json_output:
            p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    p = sub.add_parser("caption", help="caption an image (or a region) with a location for every word")
    p.add_argument("image")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--box", help="region to caption: x0,y0,x1,y1 in image pixels")
    group.add_argument("--point", help="point on the region to caption: x,y in image pixels")
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=None, help="longest caption in tokens (default: the model's)"
    )
    p.add_argument("--num-beams", type=positive_int, default=1, help="beam width (default: 1, greedy)")
    p.add_argument(
        "--stream",
        action="store_true",
        help="print each word as soon as it is decoded, then the caption (greedy; --json: a JSON line per word)",
    )
    p.add_argument(
        "--no-refine",
        action="store_true",
        help="give words the point head's own boxes instead of the nearest object proposals (models with a proposal head)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="keep the decoder's attribute phrases (color, shape, ...) where it put them: neither placed on "
        "distinct object proposals nor checked against their region captions (models with attribute_words)",
    )
    model_args(p)
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("localize", help="find what a text refers to: box, per-word points, optional mask")
    p.add_argument("image")
    p.add_argument("text")
    p.add_argument(
        "--mask", action="store_true", help="also predict a segmentation mask: its area, with --json its COCO RLE"
    )
    p.add_argument(
        "--no-refine",
        action="store_true",
        help="answer the point head's own box instead of the nearest object proposal (models with a proposal head)",
    )
    model_args(p)
    p.set_defaults(func=cmd_localize)

    def dense_args(p):
        p.add_argument(
            "--score-threshold",
            type=float,
            default=PROPOSAL_SCORE_THRESHOLD,
            help="least objectness (default: %(default)s)",
        )
        p.add_argument(
            "--nms-iou", type=float, default=PROPOSAL_NMS_IOU, help="suppress overlaps above (default: %(default)s)"
        )
        p.add_argument(
            "--max-regions", type=positive_int, default=MAX_PROPOSALS, help="at most this many (default: %(default)s)"
        )

    p = sub.add_parser("dense", help="dense captioning: every salient object's box, score and caption")
    p.add_argument("image")
    dense_args(p)
    model_args(p)
    p.set_defaults(func=cmd_dense)

    p = sub.add_parser("visualize", help="draw a caption (or a localization) with its word points and boxes")
    p.add_argument("image")
    p.add_argument("--box", help="caption this region: x0,y0,x1,y1 in image pixels")
    p.add_argument("--text", help="localize this text instead of captioning (box, words and mask)")
    p.add_argument("--dense", action="store_true", help="draw the dense-caption regions instead")
    dense_args(p)
    p.add_argument("-o", "--output", required=True, help="image file to write (.png, .jpg, ...: by its suffix)")
    model_args(p, json_output=False)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("serve", help="run the REST service (settings from PIXELLLM_* environment variables)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve: replicas from PIXELLLM_RAY_* settings")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("api-key", help="make a new API key for the service and print it with its SHA-256 hash")
    p.add_argument("--keys-file", help="append the hash to this PIXELLLM_API_KEYS_FILE")
    p.add_argument("--note", help="a comment stored beside the hash, e.g. who has the key")
    p.set_defaults(func=cmd_api_key)

    p = sub.add_parser(
        "batch",
        help="send a folder, glob or JSONL manifest of images to the service; results JSONL keyed by id, resumable",
        description="Exit codes: 0 all done, 1 some entries failed (see the errors file), 2 the batch could not run, "
        "130 interrupted (Ctrl-C; a rerun resumes).",
    )
    p.add_argument(  # nargs="+" only to catch a glob the shell expanded: one input is taken
        "input",
        nargs="+",
        metavar="INPUT",
        help="a folder of images, a quoted glob ('imgs/**/*.png') or a JSONL manifest",
    )
    p.add_argument("-o", "--output", required=True, help="results JSONL; a rerun skips the ids already in it")
    p.add_argument("--errors", help="failures JSONL, rewritten each run (default: OUTPUT with .errors.jsonl)")
    p.add_argument("--server", default="http://127.0.0.1:8000", help="service URL (default: %(default)s)")
    p.add_argument("--text", help="folder or glob input: localize this text in every image instead of captioning")
    p.add_argument("--root", help="read no image outside this folder (default: the input folder or manifest's folder)")
    p.add_argument("--allow-outside-root", action="store_true", help="read images anywhere the manifest points")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)")
    p.add_argument(
        "--retries", type=int, default=5, help="retries on 429/502/503/504 and connection errors (default: %(default)s)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.epilog = "A service with API keys: export PIXELLLM_API_KEY=<key> (sent as Authorization: Bearer)."
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("train", help="train from a config JSON (see pixelllm/configs/train/)")
    p.add_argument("config", help="training config JSON")
    p.add_argument("--steps", type=positive_int, help="train to this step (default: the config's steps)")
    p.add_argument("--out-dir", help="checkpoints and the final model go here (default: the config's out_dir)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a model on held-out scenes and write JSON metrics")
    model_args(p, json_output=False)
    p.add_argument("--data", help="a folder written by `pixelllm data synth` (default: generate scenes)")
    p.add_argument("--num-scenes", type=positive_int, default=500, help="scenes to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1000, help="of the first scene (default: %(default)s)")
    renderer_arg(p, "independent")
    p.add_argument(
        "--num-beams", type=positive_int, default=1, help="beam width of every generated caption (1: greedy)"
    )
    p.add_argument("--out", help="write the metrics JSON here")
    g = p.add_argument_group("RefCOCO / RefCOCO+ / RefCOCOg (referring metrics only)")
    g.add_argument("--refcoco", metavar="DATA_ROOT", help="folder with <dataset>/refs(<split-by>).p, instances.json")
    g.add_argument("--dataset", default="refcoco", help="refcoco, refcoco+ or refcocog (default refcoco)")
    g.add_argument("--split-by", default="unc", help="unc, google or umd (default unc)")
    g.add_argument("--split", default="val", help="val, testA, testB, test, ... (default val)")
    g.add_argument("--image-dir", help="the COCO train2014 images (default DATA_ROOT/images/mscoco/images/train2014)")
    g.add_argument("--max-images", type=positive_int, help="evaluate the first N images only")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("synth", help="write synthetic grounded narratives (LN JSONL + images + annotations)")
    q.add_argument("--out", required=True, help="folder to write (new or empty, unless --overwrite)")
    q.add_argument("--n", type=positive_int, default=1000, help="scenes (default: %(default)s)")
    q.add_argument("--overwrite", action="store_true", help="write into a folder that holds files, over them")
    q.add_argument("--seed", type=int, default=0, help="of the first scene (default: %(default)s)")
    renderer_arg(q, "synthetic")
    q.set_defaults(func=cmd_data_synth)
    q = data_sub.add_parser(
        "coco-captions", help="write COCO captions (captions_train2017.json) as narratives JSONL, for training"
    )
    q.add_argument("annotations", help="a COCO captions JSON file")
    q.add_argument("--out", required=True, help="the JSONL file to write")
    q.set_defaults(func=cmd_data_coco_captions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # here, not at exit, so that a reader gone is a BrokenPipeError caught below
        return code
    except CLIError as e:
        message = str(e)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141
    except OSError as e:  # a file or folder that cannot be read or written; the message names it
        if args.verbose:
            raise
        message = str(e)
    except KeyboardInterrupt:
        print("pixelllm: interrupted", file=sys.stderr)
        return 130
    print(f"pixelllm: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
