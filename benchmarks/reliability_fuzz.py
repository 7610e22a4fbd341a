"""Reliability (issue 7), fuzz: schemathesis over every operation, and a corpus of malformed requests.

Against a real `python -m server` on localhost, default settings, the pixelllm-tiny preset with random weights
(as the CI schema test: it has every head, so /v1/dense runs too):
(a) schemathesis: the CI cases of tests/test_server_schema.py with a larger example budget, every
    schemathesis check but "schema-valid data is accepted" (the schema cannot say "a real image"), and
    "schema-invalid data is rejected" for multipart bodies (a form carries strings only);
(b) the corpus below: broken, hostile and odd inputs (images, bodies, fields, methods), each with the statuses
    that are right for it.
Goal: no 5xx, every error in the JSON error shape, every corpus case answered as expected.

    .venv/bin/python benchmarks/reliability_fuzz.py --quick    # 40 examples per schemathesis case
    .venv/bin/python benchmarks/reliability_fuzz.py            # 300 examples per schemathesis case

Prints a summary and writes benchmarks/results/reliability_fuzz.json (see common.write_result).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import tempfile
import textwrap
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import machine, resolve_device, write_result
from reliability_common import arguments, category, error_problem
from server_helpers import MAKE_MODEL, encode, png, random_image
from service_bench import make_model, serve
from test_server_schema import CASES, with_real_image

EXAMPLES = {"quick": 40, "full": 300}
MAX_FINDINGS = 20
JSON = {"content-type": "application/json"}


@dataclass
class Probe:
    """One malformed (or odd but valid) request and the statuses that are right for it."""

    name: str
    category: str
    expect: tuple[int, ...]
    method: str = "POST"
    path: str = "/v1/caption"
    kwargs: dict[str, Any] = field(default_factory=dict)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` RGB but holds one empty IDAT: a header-only decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bmp_header(width: int, height: int) -> bytes:
    """A 24-bit BMP header declaring `width` x `height`, with no pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def flip(data: bytes, start: int, count: int = 64) -> bytes:
    """`data` with `count` bytes from `start` inverted."""
    middle = bytes(b ^ 0xFF for b in data[start : start + count])
    return data[:start] + middle + data[start + count :]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def corpus() -> list[Probe]:
    """The malformed-input corpus: name, category, the right statuses, and the request."""
    ok_png, jpeg = png(64, 48, seed=5), encode(random_image(64, 48, seed=6), "JPEG", quality=90)
    gif = encode(random_image(64, 48, seed=7), "GIF")
    bad, big, value, ok = (422,), (413,), (415,), (200,)

    def image(data: bytes, name: str, expect: tuple[int, ...], **form: str) -> Probe:
        return Probe(name, "image", expect, kwargs={"files": {"image": data}, "data": {"max_new_tokens": "4", **form}})

    def body(name: str, expect: tuple[int, ...], path: str = "/v1/caption", **kwargs: Any) -> Probe:
        return Probe(name, "body", expect, path=path, kwargs=kwargs)

    def fields(name: str, expect: tuple[int, ...], path: str = "/v1/caption", **values: Any) -> Probe:
        return Probe(name, "fields", expect, path=path, kwargs={"json": {"image": b64(ok_png), **values}})

    def form(name: str, expect: tuple[int, ...], path: str = "/v1/caption", **values: Any) -> Probe:
        return Probe(name, "fields", expect, path=path, kwargs={"files": {"image": ok_png}, "data": values})

    def method(verb: str, path: str, expect: tuple[int, ...]) -> Probe:
        return Probe(f"{verb} {path}", "method", expect, method=verb, path=path)

    box = {"x0": 4, "y0": 4, "x1": 40, "y1": 40}
    infinite_box = json.dumps({"image": b64(ok_png), "box": {**box, "x1": "X"}}).replace('"X"', "1e400").encode()
    rgba = random_image(64, 48, seed=8, mode="RGBA")
    exif = random_image(64, 48, seed=9).getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return [
        # images: each sent as a multipart file to /v1/caption
        image(b"", "empty file", bad),
        image(ok_png[:8], "PNG signature only", bad + value),
        image(ok_png[: len(ok_png) // 2], "PNG truncated in half", bad),
        image(ok_png[:-12], "PNG without IEND", bad + ok),
        image(flip(ok_png, len(ok_png) // 2), "PNG with corrupt IDAT bytes", bad),
        image(flip(ok_png, 29, 4), "PNG with a bad IHDR CRC", bad + value),
        image(jpeg[: len(jpeg) // 2], "JPEG truncated in half", bad),
        image(jpeg[:2] + os.urandom(256), "JPEG SOI then noise", bad + value),
        image(flip(jpeg, len(jpeg) // 2, 32), "JPEG with corrupt scan bytes", bad + ok),
        image(gif[: len(gif) // 2], "GIF truncated in half", bad),
        image(os.urandom(4096), "random bytes", value),
        image(b"hello, this is not an image", "plain text", value),
        image(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "SVG", value),
        image(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "PDF", value),
        image(encode(random_image(16, 16, seed=1), "TIFF"), "TIFF (not an allowed format)", value),
        image(encode(random_image(16, 16, seed=1), "ICO"), "ICO (not an allowed format)", value),
        image(png_header(100_000, 100_000), "PNG header declaring 100000x100000 (bomb)", big),
        image(png_header(0, 10), "PNG header declaring width 0", bad + value),
        image(bmp_header(60_000, 60_000), "BMP header declaring 60000x60000 (bomb)", big),
        image(bmp_header(30, -30), "BMP header, negative (top-down) height, no pixels", bad),
        image(png(1, 1), "1x1 PNG", ok),
        image(png(100, 1), "100x1 PNG (aspect limit)", ok),
        image(png(102, 1), "102x1 PNG (too thin)", bad),
        image(encode(random_image(64, 48, seed=2, mode="I;16")), "16-bit grey PNG", ok),
        image(encode(rgba), "RGBA PNG", ok),
        image(encode(rgba.convert("P")), "palette PNG", ok),
        image(encode(random_image(64, 48, seed=3).convert("CMYK"), "JPEG"), "CMYK JPEG", ok),
        image(encode(random_image(64, 48, seed=4), "JPEG", exif=exif), "JPEG with EXIF rotation", ok),
        image(encode(random_image(64, 48, seed=4), "WEBP"), "WEBP", ok),
        image(gif, "GIF", ok),
        # bodies: content types, multipart and JSON framing, sizes
        body("no content type", value, content=b"abc"),
        body("text/plain", value, content=ok_png, headers={"content-type": "text/plain"}),
        body("urlencoded form", value, data={"image": "abc"}),
        body("XML", value, content=b"<a/>", headers={"content-type": "application/xml"}),
        body("multipart without boundary", bad, content=b"--x\r\n", headers={"content-type": "multipart/form-data"}),
        body(
            "multipart cut mid-part",
            bad,
            content=b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n' + ok_png[:100],
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        ),
        body("multipart without image", bad, files={"other": ok_png}),
        body("multipart with two images", bad, files=[("image", ok_png), ("image", ok_png)]),
        body("multipart image as a text field", value, files={"image": (None, "not an image")}),
        body("multipart box as a file", bad, files={"image": ok_png, "box": b"1,1,5,5"}),
        body("multipart unknown field", bad, files={"image": ok_png}, data={"colour": "red"}),
        body("body over the 20 MB limit", big, files={"image": b"\0" * (21 << 20)}),
        body("multipart with 5000 fields", bad, data={f"f{i}": "1" for i in range(5000)}, files={"image": ok_png}),
        body("multipart 100 KB text field", bad, "/v1/localize", data={"text": "a" * 100_000}, files={"image": ok_png}),
        body(
            "multipart empty boundary",
            bad,
            content=b"--\r\n",
            headers={"content-type": "multipart/form-data; boundary="},
        ),
        body("invalid JSON", bad, content=b'{"image": ', headers=JSON),
        body("JSON array", bad, json=[1, 2, 3]),
        body("JSON null", bad, content=b"null", headers=JSON),
        body(
            "JSON nested 5000 deep",
            bad,
            content=b"[" * 5000 + b"]" * 5000,
            headers=JSON,
        ),
        body("JSON not UTF-8", bad, content=b'{"image": "\xff\xfe"}', headers=JSON),
        body(
            "JSON NaN literal",
            bad,
            content=b'{"image": "", "max_new_tokens": NaN}',
            headers=JSON,
        ),
        body("JSON in UTF-16", bad, content=json.dumps({"image": b64(ok_png)}).encode("utf-16"), headers=JSON),
        body(
            "JSON duplicate keys",
            ok + bad,
            content=b'{"image": "", "image": "' + b64(ok_png).encode() + b'"}',
            headers=JSON,
        ),
        body("JSON image missing", bad, json={"max_new_tokens": 4}),
        body("JSON image a number", bad, json={"image": 12}),
        body("bad base64", bad, json={"image": "!!!not base64!!!"}),
        body("base64 with bad padding", bad, json={"image": b64(ok_png)[:-3]}),
        body("base64 of text", value, json={"image": b64(b"hello world")}),
        body("data: URL without comma", bad, json={"image": "data:image/png;base64"}),
        body("data: URL PNG", ok, json={"image": "data:image/png;base64," + b64(ok_png), "max_new_tokens": 4}),
        body(
            "base64 with line breaks",
            ok,
            json={"image": "\n".join(textwrap.wrap(b64(ok_png), 76)), "max_new_tokens": 4},
        ),
        # fields: boxes, points, texts, numbers, unknown fields
        fields("box inverted", bad, box={"x0": 40, "y0": 40, "x1": 4, "y1": 4}),
        fields("box empty", bad, box={"x0": 4, "y0": 4, "x1": 4, "y1": 40}),
        fields("box negative", bad, box={"x0": -4, "y0": 4, "x1": 40, "y1": 40}),
        fields("box outside the image", bad, box={"x0": 4, "y0": 4, "x1": 400, "y1": 40}),
        Probe("box 1e400 (infinite)", "fields", bad, kwargs={"content": infinite_box, "headers": JSON}),
        fields("box with a missing corner", bad, box={"x0": 4, "y0": 4, "x1": 40}),
        fields("box as a list", bad, box=[4, 4, 40, 40]),
        form("multipart box with 3 numbers", bad, box="4,4,40"),
        form("multipart box with nan", bad, box="nan,4,40,40"),
        form("multipart box with inf", bad, box="4,4,inf,40"),
        form("multipart box not numbers", bad, box="a,b,c,d"),
        fields("point negative", bad, point={"x": -1, "y": 3}),
        fields("point outside the image", bad, point={"x": 3, "y": 4800}),
        form("multipart point with 3 numbers", bad, point="1,2,3"),
        fields("box and point together", bad, box=box, point={"x": 5, "y": 5}),
        fields("max_new_tokens 0", bad, max_new_tokens=0),
        fields("max_new_tokens 1e6", bad, max_new_tokens=1_000_000),
        fields("max_new_tokens a string", bad, max_new_tokens="many"),
        fields("max_new_tokens 2.5", bad, max_new_tokens=2.5),
        fields("num_beams 9", bad, num_beams=9),
        fields("unknown field", bad, colour="red"),
        fields("localize without text", bad, path="/v1/localize"),
        fields("localize empty text", bad, path="/v1/localize", text=""),
        fields("localize blank text", bad, path="/v1/localize", text=" \t\n"),
        fields("localize 257-character text", bad, path="/v1/localize", text="a" * 257),
        fields("localize 17 texts", bad, path="/v1/localize", text=["cat"] * 17),
        fields("localize texts not strings", bad, path="/v1/localize", text=[1, 2]),
        fields("localize control characters", bad, path="/v1/localize", text="\x00\x01\x1b[31mred\x7f\u202e"),
        fields("localize emoji and RTL", ok, path="/v1/localize", text="🐱 قطة on a mat"),
        fields("localize mask_format jpeg", bad, path="/v1/localize", text="cat", mask=True, mask_format="jpeg"),
        fields("localize mask 'maybe'", bad, path="/v1/localize", text="cat", mask="maybe"),
        body(
            "multipart text not UTF-8 (Starlette reads it as latin-1)",
            ok + bad,
            "/v1/localize",
            files={"image": ok_png, "text": (None, b"\xff\xfecat")},
        ),
        fields("regions with nothing to do", bad, path="/v1/regions"),
        fields("regions 33 boxes", bad, path="/v1/regions", boxes=[box] * 33),
        fields(
            "regions 17 points and 16 texts", bad, path="/v1/regions", points=[{"x": 1, "y": 1}] * 17, texts=["a"] * 16
        ),
        fields("regions one bad box among good ones", bad, path="/v1/regions", boxes=[box, {**box, "x1": 1}]),
        fields("dense score_threshold 2", bad, path="/v1/dense", score_threshold=2),
        fields("dense nms_iou 0", bad, path="/v1/dense", nms_iou=0),
        fields("dense max_regions 0", bad, path="/v1/dense", max_regions=0),
        fields("dense with a box", bad, path="/v1/dense", box=box),
        fields("dense on the whole image", ok, path="/v1/dense", max_new_tokens=4, max_regions=4),
        Probe("dense on a 1x1 image", "fields", ok, path="/v1/dense", kwargs={"json": {"image": b64(png(1, 1))}}),
        # methods and paths
        method("GET", "/v1/caption", (405,)),
        method("PUT", "/v1/localize", (405,)),
        method("DELETE", "/v1/regions", (405,)),
        method("PATCH", "/healthz", (405,)),
        method("POST", "/readyz", (405,)),
        method("OPTIONS", "/v1/caption", (405,)),
        method("GET", "/v2/caption", (404,)),
        method("GET", "/static/../server/settings.py", (404,)),
        method("GET", "/static/%2e%2e/server/settings.py", (404,)),
    ]


def run_corpus(url: str) -> dict[str, Any]:
    """Send every probe once; a finding is a 5xx, an unexpected status, or a malformed error body."""
    probes, statuses, findings, rows = corpus(), Counter(), [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        for probe in probes:
            response = client.request(probe.method, probe.path, **probe.kwargs)
            statuses[category(response)] += 1
            problem = error_problem(response) if response.status_code >= 400 else None
            if response.status_code not in probe.expect:
                problem = f"expected {probe.expect}, got {response.status_code}: {response.text[:200]}"
            rows.append({"name": probe.name, "category": probe.category, "status": response.status_code})
            if problem:
                findings.append({"probe": probe.name, "problem": problem})
        healthy = client.get("/readyz").status_code == 200
    return {
        "cases": len(probes),
        "categories": dict(Counter(p.category for p in probes)),
        "requests": len(probes),
        "server_errors": sum(r["status"] >= 500 for r in rows),
        "statuses": dict(sorted(statuses.items())),
        "findings": findings,
        "ready_afterwards": healthy,
        "probes": rows,
    }


def fuzz_operation(url: str, operation: Any, mode: Any, real_image: bool, examples: int, seed: int) -> dict[str, Any]:
    """`examples` generated requests for one operation and generation mode: statuses and failed checks."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as with_seed
    from schemathesis.checks import negative_data_rejection, positive_data_acceptance
    from schemathesis.core.failures import Failure, FailureGroup

    statuses: Counter[str] = Counter()
    findings: list[dict[str, str]] = []

    @with_seed(seed)
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        if real_image:
            with_real_image(case)
        # a form carries only strings: most of its "wrong types" (an empty array, a number) are valid on the wire
        excluded = [positive_data_acceptance] + [negative_data_rejection] * (case.media_type == "multipart/form-data")
        response = case.call(base_url=url, timeout=120)
        statuses[category(response)] += 1
        try:
            case.validate_response(response, excluded_checks=excluded)
        except (Failure, FailureGroup) as exc:
            failures = exc.exceptions if isinstance(exc, FailureGroup) else (exc,)
            titles = "; ".join(f"{f.title}: {str(f.message)[:200]}" for f in failures)
            findings.append({"failure": titles, "curl": case.as_curl_command(base_url=url)[:500]})

    check()
    return {"statuses": statuses, "findings": findings}


def run_schemathesis(url: str, examples: int, seed: int) -> dict[str, Any]:
    """The CI cases of tests/test_server_schema.py with `examples` examples each, every response check."""
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    statuses: Counter[str] = Counter()
    findings, per_case = [], {}
    for method, path, mode, real_image in CASES:
        name = f"{method} {path} {mode.value}{' real image' * real_image}"
        out = fuzz_operation(url, schema[path][method], mode, real_image, examples, seed)
        statuses.update(out["statuses"])
        findings += [{"case": name, **f} for f in out["findings"]]
        per_case[name] = sum(out["statuses"].values())
    return {
        "examples_per_case": examples,
        "seed": seed,
        "requests": sum(per_case.values()),
        "server_errors": sum(n for k, n in statuses.items() if k[:1] == "5"),
        "statuses": dict(sorted(statuses.items())),
        "requests_per_case": per_case,
        "findings": findings[:MAX_FINDINGS],
        "findings_total": len(findings),
    }


def main() -> None:
    parser = arguments(__doc__, f"{EXAMPLES['quick']} examples per schemathesis case, not {EXAMPLES['full']}")
    parser.add_argument("--examples", type=int, help="examples per schemathesis case (overrides the mode)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    examples, device = args.examples or EXAMPLES[mode], resolve_device(args.device)
    machine_info = machine(device, args.threads, args.note)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reliability-fuzz-") as tmp:
        work = Path(tmp)
        # random weights, as the CI schema test: fast to build, and every head (so /v1/dense runs too)
        model = make_model(MAKE_MODEL, work / "pixelllm-tiny-random")
        with serve(model, work, device, args.threads) as server:
            corpus = run_corpus(server.url)
            fuzz = run_schemathesis(server.url, examples, args.seed)
            again = run_corpus(server.url)  # after the fuzzing, the same answers
            ready = httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
        traceback = "Traceback" in server.log()
    requests = corpus["requests"] + fuzz["requests"] + again["requests"]
    server_errors = corpus["server_errors"] + fuzz["server_errors"] + again["server_errors"]
    findings = len(corpus["findings"]) + fuzz["findings_total"] + len(again["findings"])
    body = {
        "model": "pixelllm-tiny preset, random weights (every endpoint, /v1/dense included)",
        "requests": requests,
        "server_errors": server_errors,
        "findings": findings,
        "ready_afterwards": ready,
        "traceback_in_server_log": traceback,
        "corpus": corpus,
        "schemathesis": fuzz,
        "corpus_again": {k: again[k] for k in ("requests", "server_errors", "statuses", "findings")},
        "wall_s": time.perf_counter() - started,
    }
    print_summary(body)
    met = server_errors == 0 and findings == 0 and ready and not traceback
    problems = [f["probe"] + ": " + f["problem"] for f in corpus["findings"]] + [
        f["case"] + ": " + f["failure"] for f in fuzz["findings"]
    ]
    write_result(
        "reliability_fuzz",
        body,
        mode=mode,
        machine_info=machine_info,
        figure=f"{requests} requests ({corpus['cases']} corpus cases twice, {fuzz['requests']} schemathesis): "
        f"{server_errors} 5xx, {findings} findings",
        goal="0 5xx, every corpus case answered as expected, no failed schemathesis check",
        met=met,
        limits="; ".join(problems[:5]) or f"ready afterwards: {ready}, traceback in the log: {traceback}",
        results_dir=args.results_dir,
    )


def print_summary(body: dict[str, Any]) -> None:
    corpus, fuzz = body["corpus"], body["schemathesis"]
    print(f"\nmodel: {body['model']}; {body['requests']} requests, {body['server_errors']} server errors (5xx)")
    print(f"corpus: {corpus['cases']} cases {corpus['categories']}, {len(corpus['findings'])} findings")
    for status, n in corpus["statuses"].items():
        print(f"    {n:4d}  {status}")
    for finding in corpus["findings"]:
        print(f"    FINDING {finding['probe']}: {finding['problem']}")
    print(
        f"schemathesis: {fuzz['requests']} requests ({fuzz['examples_per_case']} examples per case), "
        f"{fuzz['findings_total']} findings"
    )
    for status, n in fuzz["statuses"].items():
        print(f"    {n:4d}  {status}")
    for finding in fuzz["findings"]:
        print(f"    FINDING {finding['case']}: {finding['failure']}\n        {finding['curl']}")
    print(f"ready afterwards: {body['ready_afterwards']}; traceback in the log: {body['traceback_in_server_log']}")


if __name__ == "__main__":
    main()
