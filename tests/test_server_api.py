"""Every endpoint and error path of the service, against a real uvicorn process."""

from __future__ import annotations

import base64
import io
import json
import platform
import re

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client import generate_latest
from pycocotools import mask as mask_utils
from server_fixtures import MAIN_SETTINGS
from server_helpers import assert_error, metric, png

pytest_plugins = ["server_fixtures"]

IMAGE = png(128, 96, seed=1)
W, H = 128, 96


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def check_words(words: list[dict], text: str) -> None:
    assert len(words) >= 2, text  # the test model is chosen to say words here (server_helpers.MAKE_MODEL)
    for w in words:
        assert text[w["start"] : w["end"]] == w["text"]
        assert 0.0 <= w["score"] <= 1.0
        assert w["point_norm"]["x"] == pytest.approx(w["point"]["x"] / W)
        assert w["point_norm"]["y"] == pytest.approx(w["point"]["y"] / H)
        assert w["box_norm"]["x1"] == pytest.approx(w["box"]["x1"] / W)
        assert w["box_norm"]["y0"] == pytest.approx(w["box"]["y0"] / H)
        assert w["box"]["x0"] <= w["box"]["x1"] and w["box"]["y0"] <= w["box"]["y1"]


def check_common(body: dict, random_tiny_dir) -> None:
    assert body["image"] == {"width": W, "height": H}
    assert body["model"] == "pixelllm-tiny"
    assert {"decode", "queue", "encode", "batch", "total"} <= set(body["timing_ms"])


def test_health_and_ready(service_client: httpx.Client) -> None:
    assert service_client.get("/healthz").json() == {"status": "ok", "model": None}
    ready = {"status": "ready", "model": "pixelllm-tiny", "max_body_bytes": MAIN_SETTINGS["max_body_bytes"]}
    assert service_client.get("/readyz").json() == ready


def test_caption_multipart(service_client: httpx.Client, random_tiny_dir) -> None:
    r = service_client.post("/v1/caption", files={"image": ("a.png", IMAGE, "image/png")}, data={"max_new_tokens": "8"})
    assert r.status_code == 200, r.text
    body = r.json()
    check_common(body, random_tiny_dir)
    assert body["box"] is None and body["point"] is None and 0 < body["score"] <= 1
    check_words(body["words"], body["caption"])


def test_caption_box_and_point_multipart_and_json(service_client: httpx.Client) -> None:
    box = {"x0": 8.0, "y0": 8.0, "x1": 64.0, "y1": 80.0}
    form = service_client.post("/v1/caption", files={"image": IMAGE}, data={"box": "8,8,64,80", "max_new_tokens": "8"})
    js = service_client.post("/v1/caption", json={"image": b64(IMAGE), "box": box, "max_new_tokens": 8})
    data_url = service_client.post(
        "/v1/caption", json={"image": "data:image/png;base64," + b64(IMAGE), "box": box, "max_new_tokens": 8}
    )
    with_bom = service_client.post(  # as PowerShell's Out-File writes a JSON file: a UTF-8 BOM first
        "/v1/caption",
        content=b"\xef\xbb\xbf" + json.dumps({"image": b64(IMAGE), "box": box, "max_new_tokens": 8}).encode(),
        headers={"content-type": "application/json"},
    )
    for r in (form, js, data_url, with_bom):
        assert r.status_code == 200, r.text
        assert r.json()["box"] == box
    assert form.json()["caption"] == js.json()["caption"] == data_url.json()["caption"] == with_bom.json()["caption"]
    check_words(form.json()["words"], form.json()["caption"])
    point = service_client.post(
        "/v1/caption", files={"image": IMAGE}, data={"point": "30.5,40", "num_beams": "2", "max_new_tokens": "6"}
    )
    assert point.status_code == 200, point.text
    assert point.json()["point"] == {"x": 30.5, "y": 40.0}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode on numpy 2
def test_localize_texts_and_masks(service_client: httpx.Client) -> None:
    one = service_client.post("/v1/localize", json={"image": b64(IMAGE), "text": "a red circle"})
    assert one.status_code == 200, one.text
    (result,) = one.json()["results"]
    assert result["text"] == "a red circle" and result["mask"] is None
    assert result["regressed_box"] is None  # the random proposal head proposes nothing to refine with
    check_words(result["words"], result["text"])
    assert [w["text"] for w in result["words"]] == ["a", "red", "circle"]
    assert result["box_norm"]["x0"] == pytest.approx(result["box"]["x0"] / W)

    many = service_client.post(
        "/v1/localize",
        files={"image": IMAGE},
        data={"text": ["a red circle", "the sky"], "mask": "true", "mask_format": "both"},
    )
    assert many.status_code == 200, many.text
    results = many.json()["results"]
    assert [r["text"] for r in results] == ["a red circle", "the sky"]
    assert results[0]["box"] == pytest.approx(result["box"])
    for r in results:
        m = r["mask"]
        assert m["size"] == [H, W]
        rle = mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()})
        png_mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(m["png"])))) > 127
        assert rle.shape == (H, W) and np.array_equal(rle.astype(bool), png_mask)


def test_regions_many_prompts_one_call(service_client: httpx.Client) -> None:
    boxes = [{"x0": 0, "y0": 0, "x1": 64, "y1": 48}, {"x0": 10, "y0": 20, "x1": 128, "y1": 96}]
    r = service_client.post(
        "/v1/regions",
        json={
            "image": b64(IMAGE),
            "boxes": boxes,
            "points": [{"x": 5, "y": 6}],
            "texts": ["a dog", "grass"],
            "max_new_tokens": 6,
            "mask": True,
            "mask_format": "png",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["box"] for c in body["captions"][:2]] == [{k: float(v) for k, v in b.items()} for b in boxes]
    assert body["captions"][2]["point"] == {"x": 5.0, "y": 6.0} and body["captions"][2]["box"] is None
    assert [loc["text"] for loc in body["localizations"]] == ["a dog", "grass"]
    assert all(loc["mask"]["png"] and loc["mask"]["counts"] is None for loc in body["localizations"])
    form = service_client.post(
        "/v1/regions",
        files={"image": IMAGE},
        data={
            "boxes": ["0,0,64,48", "10,20,128,96"],
            "points": "5,6",
            "texts": ["a dog", "grass"],
            "max_new_tokens": "6",
        },
    )
    assert form.status_code == 200, form.text
    boxed = body["captions"][:2]
    assert all(len(c["words"]) >= 2 for c in boxed), boxed  # so the comparisons say something (the point's: none)
    assert [c["caption"] for c in form.json()["captions"]] == [c["caption"] for c in body["captions"]]
    # the same prompt alone gives the same answer as inside the many-prompt call
    alone = service_client.post(
        "/v1/caption", files={"image": IMAGE}, data={"box": "10,20,128,96", "max_new_tokens": "6"}
    )
    assert alone.json()["caption"] == body["captions"][1]["caption"]


def test_cache_hit_skips_encoder(service_client: httpx.Client) -> None:
    image = png(1000, 750, seed=42)  # big enough that decoding it clearly outweighs hashing it, even under load
    before = service_client.get("/metrics").text
    first = service_client.post("/v1/caption", files={"image": image}, data={"max_new_tokens": "4"}).json()
    second = service_client.post("/v1/localize", files={"image": image}, data={"text": "a thing"}).json()
    after = service_client.get("/metrics").text
    assert first["cache_hit"] is False and first["timing_ms"]["encode"] > 0
    assert second["cache_hit"] is True and second["timing_ms"]["encode"] == 0
    assert second["timing_ms"]["decode"] < first["timing_ms"]["decode"] / 3  # a hit hashes the bytes, no decode
    assert metric(after, "pixelllm_cache_hits_total") == metric(before, "pixelllm_cache_hits_total") + 1
    assert metric(after, "pixelllm_cache_misses_total") == metric(before, "pixelllm_cache_misses_total") + 1


def test_metrics(service_client: httpx.Client) -> None:
    service_client.post("/v1/caption", files={"image": IMAGE}, data={"max_new_tokens": "4"})
    service_client.post("/v1/caption", files={"image": IMAGE}, data={"box": "1,1,0,0"})
    service_client.get("/no/such/path")
    text = service_client.get("/metrics").text
    assert metric(text, "pixelllm_requests_total", route="/v1/caption", method="POST", status="200") >= 1
    assert metric(text, "pixelllm_requests_total", route="/v1/caption", method="POST", status="422") >= 1
    assert metric(text, "pixelllm_requests_total", route="other", method="GET", status="404") >= 1
    assert metric(text, "pixelllm_request_seconds_count", route="/v1/caption") >= 2
    assert metric(text, "pixelllm_batch_size_count") >= 1
    assert "pixelllm_queue_depth 0.0" in text
    assert metric(text, "pixelllm_cache_entries") >= 1 and metric(text, "pixelllm_cache_bytes") > 0
    if platform.libc_ver()[0] == "glibc":  # the model's weights and the cache are in use; free is what malloc keeps
        assert metric(text, "pixelllm_malloc_in_use_bytes") > metric(text, "pixelllm_cache_bytes")
        assert metric(text, "pixelllm_malloc_free_bytes") >= 0


def test_docs_and_openapi(service_client: httpx.Client) -> None:
    page = service_client.get("/docs").text
    assert "SwaggerUIBundle" in page
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    # no CDN (works offline); relative to /docs (works under a proxy's path prefix)
    assert len(assets) == 3 and all(a.startswith("static/docs/") for a in assets), assets
    assert all(service_client.get(f"/{a}").status_code == 200 for a in assets)
    assert "url: 'openapi.json'" in page
    schema = service_client.get("/openapi.json").json()
    assert {"/v1/caption", "/v1/localize", "/v1/regions", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "CaptionJSON" in schema["components"]["schemas"]


BOX_TEXTS = [
    "10,20,50,60",
    "10, 20, 50, 60",
    " 10,20,50,60\t",
    "+10,2e1,5E1,60.",
    ".5,20,50.25,60",
    "10,20,50",
    "10;20;50;60",
    "1_0,20,50,60",
    "-0,20,50,60",
    "0x1,20,50,60",
    "10,20,50,60,",
    "\u0661,20,50,60",
    "",
]


def test_the_openapi_box_pattern_is_what_the_server_takes(service_client: httpx.Client) -> None:
    """A multipart box the documented pattern matches is taken (200); one it does not is a 422 naming the box."""
    content = service_client.get("/openapi.json").json()["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    pattern = content["multipart/form-data"]["schema"]["properties"]["box"]["pattern"]
    matched = [t for t in BOX_TEXTS if re.fullmatch(pattern, t)]
    assert 3 < len(matched) < len(BOX_TEXTS) - 3  # both kinds are tried
    for text in BOX_TEXTS:
        r = service_client.post("/v1/caption", files={"image": IMAGE}, data={"box": text, "max_new_tokens": "1"})
        if text in matched:
            assert r.status_code == 200, (text, r.text)
        else:  # names the box, or its coordinate that is negative
            assert re.match(r"box(\.x0|\.y0|\.x1|\.y1)?: ", assert_error(r, 422, "invalid_request")["message"])


def test_made_up_methods_are_counted_as_one_series() -> None:
    """h11 (uvicorn's parser without httptools, as in the Docker image) passes any token as a method: each must not
    become a metrics series of its own, or a client grows the registry and /metrics without bound."""
    import asyncio

    from server.metrics import Metrics
    from server.middleware import MetricsMiddleware

    async def not_allowed(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def ignore(message) -> None:
        pass

    metrics = Metrics()
    counted = MetricsMiddleware(not_allowed, metrics, routes={"/v1/caption"})
    for method in [f"X{i:05d}" for i in range(50)] + ["GET", "DELETE"]:
        asyncio.run(counted({"type": "http", "method": method, "path": "/v1/caption"}, None, ignore))
    series = [s.labels for s in metrics.requests.collect()[0].samples if s.name == "pixelllm_requests_total"]
    assert sorted(s["method"] for s in series) == ["DELETE", "GET", "other"]
    text = generate_latest(metrics.registry).decode()
    assert metric(text, "pixelllm_requests_total", route="/v1/caption", method="other", status="405") == 50


def test_not_found_and_method_not_allowed(service_client: httpx.Client) -> None:
    assert_error(service_client.get("/v2/caption"), 404, "not_found")
    assert_error(service_client.get("/v1/caption"), 405, "method_not_allowed")
    slash = assert_error(service_client.post("/v1/caption/", files={"image": IMAGE}), 404, "not_found")
    assert slash["message"] == "Not Found: the path is /v1/caption, without the trailing slash"
    assert assert_error(service_client.get("/v2/caption/"), 404)["message"] == "Not Found"


def test_body_too_large(service_client: httpx.Client, service) -> None:
    big = b"\0" * 2_100_000
    assert_error(service_client.post("/v1/caption", files={"image": big}), 413, "payload_too_large")
    # chunked, no Content-Length: the limit holds while reading
    chunks = (b"x" * 100_000 for _ in range(30))
    fresh = httpx.Client(base_url=service.url, timeout=30)
    assert_error(fresh.post("/v1/caption", content=chunks, headers={"content-type": "application/json"}), 413)
    fresh.close()
    assert service_client.get("/healthz").status_code == 200


def test_unsupported_media_types(service_client: httpx.Client) -> None:
    assert_error(service_client.post("/v1/caption", content=b"hello", headers={"content-type": "text/plain"}), 415)
    assert_error(
        service_client.post(
            "/v1/caption", content=b"x=1", headers={"content-type": "application/x-www-form-urlencoded"}
        ),
        415,
    )
    assert_error(service_client.post("/v1/caption", files={"image": b"just some text"}), 415, "unsupported_media_type")


def form(**data: object) -> dict:
    return {"files": {"image": IMAGE}, "data": data}


def js(**fields: object) -> dict:
    return {"json": {"image": b64(IMAGE), **fields}}


BAD = [
    ("/v1/caption", form(box="10,10,5,50"), "box"),  # inverted
    ("/v1/caption", form(box="10,10,10,50"), "box"),  # empty
    ("/v1/caption", form(box="0,0,200,50"), "box"),  # outside the 128x96 image
    ("/v1/caption", form(box="1,2,3"), "box"),
    ("/v1/caption", form(box="a,b,c,d"), "box"),
    ("/v1/caption", form(box="nan,0,5,5"), "box"),
    ("/v1/caption", form(box="-1,0,5,5"), "box.x0"),  # as JSON's: greater than or equal to 0
    ("/v1/caption", form(box="1_0,0,5,5"), "box"),
    ("/v1/caption", form(box="1e999,0,5,5"), "box"),
    ("/v1/caption", js(box={"x0": 0, "y0": 0, "x1": 5}), "box.y1"),
    ("/v1/caption", js(box=[0, 0, 5, 5]), "box"),
    ("/v1/caption", js(box={"x0": 0, "y0": 0, "x1": 0.5, "y1": 0.5, "normalized": True}), "box.normalized"),
    ("/v1/regions", js(points=[{"x": 5, "y": 5, "label": 1}]), "points.0.label"),
    ("/v1/caption", form(point="500,5"), "point"),
    ("/v1/caption", form(point="5"), "point"),
    ("/v1/caption", form(point="inf,5"), "point"),
    ("/v1/caption", js(point={"x": -1, "y": 1}), "point.x"),
    ("/v1/caption", form(box="0,0,5,5", point="1,1"), "point"),  # not both
    ("/v1/caption", form(max_new_tokens="0"), "max_new_tokens"),
    ("/v1/caption", form(max_new_tokens="1000"), "max_new_tokens"),
    ("/v1/caption", form(max_new_tokens="many"), "max_new_tokens"),
    ("/v1/caption", js(num_beams=0), "num_beams"),
    ("/v1/caption", js(num_beams=99), "num_beams"),
    ("/v1/caption", form(colour="red"), "colour"),
    ("/v1/caption", {"files": {"image": IMAGE, "file": ("a.jpg", IMAGE)}}, "file"),  # unknown, though a file
    ("/v1/caption", {**form(), "params": {"max_new_tokens": "2"}}, "max_new_tokens"),  # in the query
    ("/v1/localize", {**form(text="a"), "params": {"stream": "true"}}, "stream"),  # only captions stream
    ("/v1/regions", {**js(texts=["a"]), "params": {"mask": "true"}}, "mask"),
    ("/v1/dense", {**form(), "params": {"max_regions": "2"}}, "max_regions"),
    ("/v1/caption", form(box=["0,0,5,5", "0,0,6,6"]), "box"),
    ("/v1/caption", {"json": {"box": {"x0": 0, "y0": 0, "x1": 5, "y1": 5}}}, "image"),
    ("/v1/caption", {"files": {"box": (None, "0,0,5,5")}}, "image"),
    ("/v1/caption", {"files": {"image": IMAGE, "box": ("b.txt", b"0,0,5,5")}}, "box"),
    ("/v1/caption", {"json": {"image": "not base64!"}}, "image"),
    ("/v1/caption", {"content": b"{not json", "headers": {"content-type": "application/json"}}, "body"),
    ("/v1/caption", {"json": [1, 2]}, "body"),
    ("/v1/localize", form(text=""), "text"),
    ("/v1/localize", form(text="   "), "text"),
    ("/v1/localize", js(text="x" * 65), "text"),
    ("/v1/localize", js(text=["ok", ""]), "text.1"),
    ("/v1/localize", js(text=["a", "b", "c", "d", "e"]), "text"),
    ("/v1/localize", js(), "text"),
    ("/v1/localize", js(text=[]), "text"),
    ("/v1/localize", js(text=3), "text"),
    ("/v1/localize", js(text=["a", 3]), "text"),
    ("/v1/localize", js(text="a", mask_format="jpeg"), "mask_format"),
    ("/v1/localize", form(text="a", mask="maybe"), "mask"),
    ("/v1/localize", js(text="a", mask_format="png"), "mask_format"),  # without mask=true: it did nothing
    ("/v1/regions", form(texts=["a"], mask="false", mask_format="both"), "mask_format"),
    ("/v1/regions", js(), "boxes"),
    ("/v1/regions", js(texts=["a"] * 7), "texts"),
    ("/v1/regions", js(boxes=[{"x0": 0, "y0": 0, "x1": 1, "y1": 1}] * 7), "boxes"),
    (
        "/v1/regions",
        js(boxes=[{"x0": 0, "y0": 0, "x1": 1, "y1": 1}, {"x0": 0, "y0": 0, "x1": 999, "y1": 1}]),
        "boxes.1",
    ),
    ("/v1/regions", form(points=["1,1", "1,1000"]), "points.1"),
    ("/v1/regions", form(points=["1,1", "nan,3"]), "points.1"),
    ("/v1/regions", form(boxes=["1,1,2"]), "boxes.0"),
    ("/v1/regions", form(texts=["a", ""]), "texts.1"),
    ("/v1/regions", js(texts=[""]), "texts.0"),
]


@pytest.mark.parametrize("path, request_kwargs, field", BAD, ids=[f"{p}-{f}-{i}" for i, (p, _, f) in enumerate(BAD)])
def test_invalid_fields_are_422_naming_the_field(service_client: httpx.Client, path, request_kwargs, field) -> None:
    assert_error(service_client.post(path, **request_kwargs), 422, field=field)


def test_error_messages_say_what_is_wrong(service_client: httpx.Client) -> None:
    """Not just which field: a negative coordinate is out of range (not badly written) in multipart as in JSON,
    a file in an unknown field is an unknown field, and a query parameter says where parameters go."""
    for kwargs in form(box="-5,0,100,80"), js(box={"x0": -5, "y0": 0, "x1": 100, "y1": 80}):
        error = assert_error(service_client.post("/v1/caption", **kwargs), 422, field="box.x0")
        assert "greater than or equal to 0" in error["message"]
    error = assert_error(service_client.post("/v1/caption", files={"file": ("a.jpg", IMAGE)}), 422, field="file")
    assert "unknown field (fields: image, box, point, max_new_tokens, num_beams, stream)" in error["message"]
    error = assert_error(service_client.post("/v1/localize", params={"stream": "1"}, **form(text="a")), 422)
    assert error["message"] == "stream: unknown query parameter (this endpoint takes none); parameters go in the body"
    error = assert_error(service_client.post("/v1/caption", params={"beams": "2"}, **form()), 422)
    assert "(this endpoint takes only stream)" in error["message"]
    error = assert_error(service_client.post("/v1/caption", **js(box=[0, 0, 5, 5])), 422, "invalid_request", "box")
    assert error["message"] == 'box: give an object {"x0", "y0", "x1", "y1"} in pixels, not a list'
    error = assert_error(service_client.post("/v1/regions", **js(points=["1,1"])), 422, field="points.0")
    assert error["message"].endswith('{"x", "y"} in pixels, not a string (that form is for multipart bodies)')
    broken = service_client.post("/v1/caption", content=b"{not json", headers={"content-type": "application/json"})
    assert assert_error(broken, 422, "invalid_body")["message"].startswith("body: malformed JSON (")
    error = assert_error(service_client.get("/v1/caption"), 405, "method_not_allowed")
    assert error["message"] == "Method Not Allowed: /v1/caption takes POST"
    error = assert_error(service_client.post("/v1/localize", **form(text="a", mask_format="png")), 422)
    assert error["message"] == "mask_format: mask_format says how to send the mask: ask for one with mask=true"
    error = assert_error(service_client.post("/v1/regions", **form(boxes="0,0,5,5", mask="true")), 422, field="mask")
    assert error["message"] == "mask: masks are of the texts' objects: give texts, or leave mask out"
    for name in ("num_beams", "max_new_tokens"):
        error = assert_error(service_client.post("/v1/regions", **js(texts=["a"], **{name: 2})), 422, field=name)
        assert error["message"] == f"{name}: {name} says how to caption boxes and points: give some, or leave it out"
    huge = b'{"image": "", "max_new_tokens": ' + b"9" * 5000 + b"}"
    error = assert_error(
        service_client.post("/v1/caption", content=huge, headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    )
    assert error["message"].startswith("body: a number is out of range (")  # JSON all the same, not malformed
    nan_json = {"content": b'{"image": "", "nms_iou": NaN}', "headers": {"content-type": "application/json"}}
    for kwargs in form(score_threshold="nan"), nan_json:
        error = assert_error(service_client.post("/v1/dense", **kwargs), 422)
        assert error["message"].endswith(": Input should be a finite number"), error


def test_an_image_sent_as_a_text_field_says_to_send_a_file(service_client: httpx.Client) -> None:
    """`curl -F 'image=<photo.png'` (for `@`) sends the bytes as text, which the form decodes: they cannot be had
    back, so the answer says how to send a file, for a small image and for one over the text fields' 64 KiB."""
    headers = {"content-type": "multipart/form-data; boundary=xyz"}

    def text_part(value: bytes) -> bytes:  # no filename: a text field, as curl sends `-F 'image=<file'`
        return b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\n' + value + b"\r\n--xyz--\r\n"

    small = service_client.post("/v1/caption", content=text_part(IMAGE), headers=headers)
    error = assert_error(small, 422, "invalid_request", field="image")
    assert error["message"] == (
        "image: a text field, not a file: send the image as a file part (curl: -F image=@photo.jpg, with @)"
    )
    large = service_client.post("/v1/caption", content=text_part(b"x" * (65 << 10)), headers=headers)
    assert "text fields are at most 64 KiB: send the image as a file part" in assert_error(large, 422)["message"]


def test_malformed_multipart_is_422(service_client: httpx.Client) -> None:
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    assert_error(service_client.post("/v1/caption", content=b"--xyz\r\ngarbage", headers=headers), 422)
    no_boundary = {"content-type": "multipart/form-data"}
    assert_error(service_client.post("/v1/caption", content=b"abc", headers=no_boundary), 422)
    part = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + IMAGE
    cut_short = service_client.post("/v1/caption", content=part, headers=headers)  # no closing boundary
    error = assert_error(cut_short, 422, "invalid_request", field="image")
    assert error["message"] == "image: field required (the body has no complete part: cut short?)"
    complete = service_client.post("/v1/caption", content=part + b"\r\n--xyz--\r\n", headers=headers)
    assert complete.status_code == 200, complete.text


def test_base64_images_with_spaces_around_no_padding_or_a_data_url_without_its_comma() -> None:
    from server.bodies import decode_base64
    from server.errors import ApiError

    encoded = base64.b64encode(IMAGE).decode()
    assert decode_base64(f"\n  data:image/png;base64,{encoded}\n") == IMAGE == decode_base64(f" {encoded} ")
    assert decode_base64(f"DATA:image/png;base64,{encoded}") == IMAGE  # a URL scheme in any case
    cuts = [IMAGE[: len(IMAGE) - i] for i in range(3) if (len(IMAGE) - i) % 3]  # base64 of each ends in = or ==
    for cut in cuts:  # the padding left out, as many encoders do
        unpadded = base64.b64encode(cut).decode().rstrip("=")
        assert unpadded != base64.b64encode(cut).decode() and decode_base64(unpadded) == cut
    with pytest.raises(ApiError) as refused:
        decode_base64("data:image/png;base64" + encoded)
    assert refused.value.message == "image: a data: URL has a comma before its base64 (data:image/png;base64,...)"
