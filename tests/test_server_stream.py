"""`/v1/caption` streamed as Server-Sent Events, against real uvicorn processes serving the shipped model:
the events equal the plain answer, errors before the stream are JSON, the queue bound holds, and a client
that leaves stops the decoding."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from server_helpers import (
    DEFAULT_MODEL_DIR,
    ROOT,
    SLOW_WORD_S,
    assert_error,
    metric,
    png,
    start_server,
    wait_for,
)

from pixelllm.data.independent import render_independent_scene
from pixelllm.data.synthetic import scene_seed

pytest_plugins = ["server_fixtures"]

SAMPLE = (ROOT / "assets" / "sample.jpg").read_bytes()  # 578 x 530: the default model captions it in ~22 words
W, H = 578, 530
TIMING = {"decode", "encode", "first_word", "total"}
DONE = dict(route="/v1/caption", method="POST", status="200")
LEFT = dict(route="/v1/caption", method="POST", status="499")


def events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) for each Server-Sent Event in `lines`, as they arrive."""
    fields: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
            continue
        assert set(fields) == {"event", "data"}, fields
        yield fields["event"], json.loads(fields["data"])
        fields = {}
    assert not fields, f"an event was cut off: {fields}"


def stream(client: httpx.Client, **request: object) -> list[tuple[str, dict]]:
    with client.stream("POST", "/v1/caption", **request) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        return list(events(r.iter_lines()))


def split(answer: list[tuple[str, dict]]) -> tuple[list[dict], dict]:
    """The word events and the `done` event's data; `done` comes once, last, after every word."""
    kinds = [kind for kind, _ in answer]
    assert kinds == ["word"] * (len(kinds) - 1) + ["done"], kinds
    return [data for _, data in answer[:-1]], answer[-1][1]


def assert_same_words(streamed: list[dict], plain: list[dict]) -> None:
    """Same text and offsets; the same points, boxes and scores up to float rounding (per-step point head)."""
    assert [(w["text"], w["start"], w["end"]) for w in streamed] == [(w["text"], w["start"], w["end"]) for w in plain]
    for s, p in zip(streamed, plain):
        assert set(s) == set(p)
        assert (s["regressed_box"] is None) == (p["regressed_box"] is None)
        for key in ("point", "point_norm", "box", "box_norm", "regressed_box"):
            assert s[key] == pytest.approx(p[key], abs=1e-3), (key, s, p)
        assert s["score"] == pytest.approx(p["score"], abs=1e-5)


@pytest.fixture(scope="module")
def client(trained_service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=trained_service.url, timeout=60) as c:
        yield c


PROMPTS = {
    "image": {},
    "box": {"box": "40,60,300,320"},
    "point": {"point": "120,260"},
}


@pytest.mark.parametrize("prompt", PROMPTS, ids=str)
def test_streamed_events_equal_the_plain_answer(client: httpx.Client, prompt: str) -> None:
    fields = {"max_new_tokens": "32", **PROMPTS[prompt]}
    plain = client.post("/v1/caption", files={"image": SAMPLE}, data=fields)
    assert plain.status_code == 200, plain.text
    plain = plain.json()
    words, done = split(stream(client, params={"stream": "true"}, files={"image": SAMPLE}, data=fields))
    assert len(words) >= 2, plain["caption"]
    assert words == done["words"]  # each word as streamed is the word of the final answer
    assert_same_words(words, plain["words"])
    assert done["caption"] == plain["caption"]
    for key in ("box", "point", "image", "model"):
        assert done[key] == plain[key]
    assert done["image"] == {"width": W, "height": H}
    assert set(done["timing_ms"]) == TIMING
    assert 0 < done["timing_ms"]["first_word"] <= done["timing_ms"]["total"]


def test_default_model_words_of_several_tokens_stream_whole(client: httpx.Client) -> None:
    """Sub-word tokens are grouped: a word the tokenizer splits ('bottom' is 'bot' + 'tom') streams as one word."""
    from pixelllm import Tokenizer

    tokenizer = Tokenizer.from_file(DEFAULT_MODEL_DIR / "tokenizer.json")
    words, done = split(stream(client, params={"stream": "true"}, files={"image": SAMPLE}))
    texts = [w["text"] for w in words]
    assert texts == re.findall(r"[a-z]+", done["caption"])  # whole words, punctuation apart
    pieces = {t: tokenizer.decode_with_spans(tokenizer.encode(t, add_eos=False))[1] for t in texts}
    several = {t for t, spans in pieces.items() if len(spans) > 1}
    assert several, done["caption"]  # the sample's caption has words of several tokens
    assert all(done["caption"][w["start"] : w["end"]] == w["text"] for w in words)


def test_json_body_stream_field_and_cache(client: httpx.Client) -> None:
    """`"stream": true` in a JSON body streams too; streams fill and reuse the image embedding cache."""
    image = png(160, 120, seed=11)
    body = {"image": base64.b64encode(image).decode(), "stream": True, "max_new_tokens": 12}
    entries = metric(client.get("/metrics").text, "pixelllm_cache_entries")
    words, first = split(stream(client, json=body))
    assert first["cache_hit"] is False and first["timing_ms"]["encode"] > 0
    assert metric(client.get("/metrics").text, "pixelllm_cache_entries") == entries + 1  # the gauge sees it
    plain = client.post("/v1/caption", files={"image": image}, data={"max_new_tokens": "12"}).json()
    assert plain["cache_hit"] is True  # the stream cached the embedding
    assert_same_words(words, plain["words"])
    _, again = split(stream(client, json=body))
    assert again["cache_hit"] is True and again["timing_ms"]["encode"] == 0


def test_beam_search_cannot_stream(client: httpx.Client) -> None:
    for request in (
        dict(params={"stream": "true"}, files={"image": SAMPLE}, data={"num_beams": "3"}),
        dict(files={"image": SAMPLE}, data={"num_beams": "2", "stream": "true"}),
        dict(json={"image": base64.b64encode(SAMPLE).decode(), "stream": True, "num_beams": 2}),
    ):
        error = assert_error(client.post("/v1/caption", **request), 422, "invalid_request", field="num_beams")
        assert "greedily" in error["message"] and "num_beams=1" in error["message"]


def test_errors_before_the_stream_are_json(client: httpx.Client) -> None:
    streamed = {"params": {"stream": "true"}}
    assert_error(client.post("/v1/caption", **streamed, files={"image": SAMPLE}, data={"box": "0,0,900,10"}), 422)
    assert_error(client.post("/v1/caption", **streamed, files={"image": b"not an image"}), 415)
    r = client.post("/v1/caption", params={"stream": "maybe"}, files={"image": SAMPLE})
    assert_error(r, 422, "invalid_request", field="query.stream")


def test_openapi_documents_the_stream(client: httpx.Client) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v1/caption"]["post"]
    assert any(p["name"] == "stream" and p["in"] == "query" for p in op["parameters"])
    assert "text/event-stream" in op["responses"]["200"]["content"]


# --- the slow service: every streamed word 0.25 s late, 2 requests at most, 4 s timeout ----------------------


def slow_metrics(service) -> str:
    return httpx.get(f"{service.url}/metrics").text


def test_client_disconnect_stops_the_decoding(slow_stream_service, client: httpx.Client) -> None:
    words = client.post("/v1/caption", files={"image": SAMPLE}).json()["words"]
    full_s = (len(words) + 1) * SLOW_WORD_S  # what the whole stream takes on the slow service (or its 4 s timeout)
    assert full_s > 3
    before = slow_metrics(slow_stream_service)
    with httpx.Client(base_url=slow_stream_service.url, timeout=30) as c:
        started = time.monotonic()
        headers = {"X-Request-ID": "stream-left-early"}
        with c.stream("POST", "/v1/caption", params={"stream": "true"}, files={"image": SAMPLE}, headers=headers) as r:
            answer = events(r.iter_lines())  # (dropping this generator would close the connection)
            kind, first = next(answer)
            assert kind == "word" and first["text"] == words[0]["text"]
            assert metric(slow_metrics(slow_stream_service), "pixelllm_queue_depth") == 1
    # the connection is closed: the server stops decoding and frees the queue slot long before the caption's end
    wait_for(lambda: metric(slow_metrics(slow_stream_service), "pixelllm_queue_depth") == 0, 2.0)
    assert time.monotonic() - started < full_s / 2
    after = slow_metrics(slow_stream_service)
    for name, labels in (("pixelllm_streams_cancelled_total", {}), ("pixelllm_requests_total", LEFT)):
        assert metric(after, name, **labels) == metric(before, name, **labels) + 1, name  # counted as 499, not 200
    assert metric(after, "pixelllm_requests_total", **DONE) == metric(before, "pixelllm_requests_total", **DONE)
    log = slow_stream_service.log()
    assert "[stream-left-early] streamed caption cancelled: the client left" in log  # logged in the decoding thread
    assert re.search(r"POST /v1/caption 499 ", log), log[-2000:]


def test_streams_hold_queue_slots(slow_stream_service) -> None:
    """Two streams running fill the queue (max_queue=2): a third request, streamed or not, is 429."""
    url = slow_stream_service.url
    running, release = threading.Barrier(3), threading.Event()
    firsts: list[str] = []

    def hold_a_stream() -> None:
        request = dict(params={"stream": "true"}, files={"image": SAMPLE}, timeout=30)
        with httpx.stream("POST", f"{url}/v1/caption", **request) as r:
            answer = events(r.iter_lines())
            firsts.append(next(answer)[0])
            running.wait(timeout=20)
            release.wait(timeout=20)

    threads = [threading.Thread(target=hold_a_stream) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        running.wait(timeout=20)
        for request in (dict(params={"stream": "true"}), {}):
            r = httpx.post(f"{url}/v1/caption", files={"image": SAMPLE}, timeout=30, **request)
            assert_error(r, 429, "queue_full")
            assert r.headers["retry-after"] == "1"
    finally:
        release.set()
        for t in threads:
            t.join(timeout=30)
    assert firsts == ["word", "word"]
    wait_for(lambda: metric(slow_metrics(slow_stream_service), "pixelllm_queue_depth") == 0, 2.0)
    assert httpx.post(f"{url}/v1/caption", files={"image": png()}, data={"max_new_tokens": "2"}).status_code == 200


def test_a_stream_past_the_timeout_ends_with_an_error_event(slow_stream_service) -> None:
    before = slow_metrics(slow_stream_service)
    with httpx.stream(
        "POST", f"{slow_stream_service.url}/v1/caption", params={"stream": "true"}, files={"image": SAMPLE}, timeout=30
    ) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    answer = list(events(iter(lines)))
    kinds = [kind for kind, _ in answer]
    assert kinds[-1] == "error" and set(kinds[:-1]) == {"word"} and len(kinds) > 5, kinds
    assert answer[-1][1] == {"error": {"code": "timeout", "message": "no complete caption within 4 s"}}
    assert lines[-2] == 'data: {"error":{"code":"timeout","message":"no complete caption within 4 s"}}'  # compact
    timed_out = dict(route="/v1/caption", method="POST", status="504")
    after = slow_metrics(slow_stream_service)
    assert (
        metric(after, "pixelllm_requests_total", **timed_out)
        == metric(before, "pixelllm_requests_total", **timed_out) + 1
    )


def test_a_timeout_before_the_first_word_is_a_json_504(tmp_path_factory) -> None:
    """Each word 4 s late, a 1 s timeout: no word comes in time, so the answer is the plain JSON error, at the
    timeout (it came once the late first word's step asked whether to stop, 4 s on)."""
    server = start_server(tmp_path_factory, DEFAULT_MODEL_DIR, debug_batch_delay_ms=4000, request_timeout_s=1)
    try:
        start = time.monotonic()
        r = httpx.post(f"{server.url}/v1/caption", params={"stream": "true"}, files={"image": SAMPLE}, timeout=30)
        assert time.monotonic() - start < 3
        assert_error(r, 504, "timeout")
        assert r.json()["error"]["message"] == "no complete caption within 1 s"
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "pixelllm_requests_total", route="/v1/caption", method="POST", status="504") == 1
    finally:
        server.stop()


def test_a_client_gone_before_the_first_event_stops_the_decoding() -> None:
    """Starlette cancels a streamed response whose client is already gone before it iterates the events at all
    (uvicorn answers `receive()` with `http.disconnect` at once then): the decoding thread must stop anyway.
    Driven in-process through the ASGI interface, so the disconnect is there before the response starts."""
    from starlette.testclient import TestClient

    from server import Settings, create_app

    settings = Settings(model=str(DEFAULT_MODEL_DIR), debug_batch_delay_ms=SLOW_WORD_S * 1000)
    body = json.dumps({"image": base64.b64encode(SAMPLE).decode(), "stream": True}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # uvicorn's: the response listens for the disconnect
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/caption",
        "raw_path": b"/v1/caption",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:  # the body, then the client is gone: answered at once, as uvicorn does
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    app = create_app(settings)
    with TestClient(app) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 120.0)  # the model loads after start-up
        started = time.monotonic()
        client.portal.call(app, scope, receive, send)
        # answered 499 into the void before the stream started: no event went out
        assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
        assert not any(b"event:" in m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        # the thread stops at its next word (0.25 s each); unstopped it would decode all ~22 words (5.5 s)
        wait_for(lambda: metric(client.get("/metrics").text, "pixelllm_streams_cancelled_total") == 1, 3.0)
        wait_for(lambda: metric(client.get("/metrics").text, "pixelllm_queue_depth") == 0, 1.0)
        assert time.monotonic() - started < 3.0


def test_verified_words_stream_with_the_decoders_word(client: httpx.Client) -> None:
    """Seed 77 scene 6: the decoder calls its one small orange star a diamond, the region caption of the proposal
    its phrase was snapped to says star: both answers say star and keep 'diamond' in `generated_text`."""
    image = io.BytesIO()
    Image.fromarray(render_independent_scene(scene_seed(77, 6)).image).save(image, format="PNG")
    plain = client.post("/v1/caption", files={"image": image.getvalue()})
    assert plain.status_code == 200, plain.text
    plain = plain.json()
    changed = [(w["generated_text"], w["text"]) for w in plain["words"] if w["generated_text"] is not None]
    assert changed == [("diamond", "star")] and "star" in plain["caption"]
    assert [plain["caption"][w["start"] : w["end"]] for w in plain["words"]] == [w["text"] for w in plain["words"]]
    words, done = split(stream(client, params={"stream": "true"}, files={"image": image.getvalue()}))
    assert words == done["words"] and done["caption"] == plain["caption"]
    assert [(w["generated_text"], w["text"]) for w in words if w["generated_text"] is not None] == changed


def test_a_model_failure_is_a_json_500_before_the_first_word_and_an_error_event_after(monkeypatch) -> None:
    """The decoding raises at its first word, then after one word: a plain JSON 500, then a 200 stream that ends
    with a `model_error` event; the metrics count both as 500."""
    from starlette.testclient import TestClient

    from server import Settings, create_app

    app = create_app(Settings(model=str(DEFAULT_MODEL_DIR)))
    with TestClient(app) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 120.0)
        predictor = app.state.engine.predictor
        real = predictor.caption_stream_embedding

        def failing_after(words_first: int):
            def stream(*args, **kwargs):
                words = real(*args, **kwargs)
                for _ in range(words_first):
                    yield next(words)
                raise RuntimeError("injected model failure")

            return stream

        monkeypatch.setattr(predictor, "caption_stream_embedding", failing_after(0))
        r = client.post("/v1/caption", params={"stream": "true"}, files={"image": SAMPLE})
        assert_error(r, 500, "model_error")
        monkeypatch.setattr(predictor, "caption_stream_embedding", failing_after(1))
        r = client.post("/v1/caption", params={"stream": "true"}, files={"image": SAMPLE})
        assert r.status_code == 200
        answer = list(events(r.iter_lines()))
        assert [kind for kind, _ in answer] == ["word", "error"], answer
        assert answer[1][1]["error"]["code"] == "model_error"
        failed = dict(route="/v1/caption", method="POST", status="500")
        assert metric(client.get("/metrics").text, "pixelllm_requests_total", **failed) == 2
