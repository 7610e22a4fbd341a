"""The batch client (`pixelllm batch`, scripts/batch_client.py) against a real service on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import uvicorn
from server_helpers import ROOT, broken_model_dir, free_port, metric, png, start_server, wait_for

from pixelllm.batch import BatchError, Options, discover, recover, retry_after_s, retry_delay, run_batch
from pixelllm.cli import main
from server import Settings, create_app
from server.security import hash_key

pytest_plugins = ["server_fixtures"]

N = 50
KEY = "batch-client-test-key"
IDS = [f"img_{i:02d}.png" for i in range(N)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i, name in enumerate(IDS):
        (folder / name).write_bytes(png(64, 48, seed=i))
    return folder


@pytest.fixture(scope="module")
def flaky_service(tmp_path_factory: pytest.TempPathFactory, random_tiny_dir: Path):
    """Needs API key KEY; answers 429 or 503 with Retry-After: 1 to 30% of /v1 requests; 100 ms per batch."""
    settings = dict(debug_fail_rate=0.3, debug_fail_statuses=[429, 503], debug_batch_delay_ms=100, max_batch_size=4)
    settings.update(api_key_hashes=hash_key(KEY), protect_metrics=False)
    proc = start_server(tmp_path_factory, random_tiny_dir, **settings)
    yield proc
    proc.stop()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def batch(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(["batch", *argv, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def requests_total(url: str, route: str, status: str) -> float:
    return metric(
        httpx.get(f"{url}/metrics").text, "pixelllm_requests_total", route=route, method="POST", status=status
    )


def test_folder_of_50_images_then_a_rerun_sends_nothing(service, images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.jsonl"
    before = requests_total(service.url, "/v1/caption", "200")
    code, stdout, _ = batch(capsys, str(images), "-o", str(out), "--server", service.url, "--json")
    assert code == 0, stdout
    summary = json.loads(stdout)
    assert (summary["total"], summary["succeeded"], summary["failed"], summary["skipped"]) == (N, N, 0, 0)
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == IDS
    for r in records:
        assert r["task"] == "caption" and r["image"] == str(images / r["id"])
        assert r["result"]["image"] == {"width": 64, "height": 48}
        assert all(set(w) >= {"text", "point", "box"} for w in r["result"]["words"])
    assert (tmp_path / "results.errors.jsonl").read_text() == ""
    assert requests_total(service.url, "/v1/caption", "200") == before + N

    written = out.read_bytes()
    code, stdout, _ = batch(capsys, str(images), "-o", str(out), "--server", service.url)
    assert code == 0
    assert stdout.startswith(f"{N} entries: 0 written, {N} already done, 0 failed"), stdout
    assert out.read_bytes() == written
    assert requests_total(service.url, "/v1/caption", "200") == before + N


def test_retries_429_and_503_until_every_record_arrives(flaky_service, images: Path, tmp_path: Path) -> None:
    url = flaky_service.url
    before = {s: requests_total(url, "/v1/caption", s) for s in ("200", "429", "503")}
    items, refused = discover(str(images))
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    options = Options(url, concurrency=8, retries=10, progress=False, api_key=KEY)
    summary = run_batch(items, refused, out, errors, options)
    assert (summary.succeeded, summary.failed) == (N, 0), errors.read_text()
    assert sorted(r["id"] for r in read_jsonl(out)) == IDS
    injected = {s: requests_total(url, "/v1/caption", s) - before[s] for s in ("429", "503")}
    assert injected["429"] > 0 and injected["503"] > 0, injected
    assert summary.retries == injected["429"] + injected["503"]  # each injected failure retried once, no more
    assert requests_total(url, "/v1/caption", "200") - before["200"] == N
    assert summary.elapsed_s >= 1.0  # a retry waits for Retry-After: 1
    assert "WARNING server.app [-] PIXELLLM_DEBUG_FAIL_RATE=0.3: that fraction of /v1 requests" in flaky_service.log()


def test_api_key_from_the_environment(
    flaky_service, images: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    three = str(images / "img_0[0-2].png")
    out = tmp_path / "out.jsonl"
    monkeypatch.delenv("PIXELLLM_API_KEY", raising=False)
    code, _, err = batch(capsys, three, "-o", str(out), "--server", flaky_service.url, "--retries", "10")
    assert code == 2 and "PIXELLLM_API_KEY" in err and "unauthorized" in err
    monkeypatch.setenv("PIXELLLM_API_KEY", "not-the-key")
    code, _, err = batch(capsys, three, "-o", str(out), "--server", flaky_service.url, "--retries", "10")
    assert code == 2 and "check PIXELLLM_API_KEY" in err
    assert "not-the-key" not in err
    for bad in ("caf\u00e9-key", "two words", "key\nkey"):  # a traceback, or httpx's error echoing the key
        monkeypatch.setenv("PIXELLLM_API_KEY", bad)
        code, _, err = batch(capsys, three, "-o", str(out), "--server", flaky_service.url)
        assert code == 2 and "the API key (PIXELLLM_API_KEY) has a space, a line break" in err, err
        assert bad not in err and "Traceback" not in err
    assert Options(api_key="").api_key == ""  # no key, as unset (the library's callers pass the environment's)
    monkeypatch.setenv("PIXELLLM_API_KEY", f"{KEY}\r\n")  # as `$(cat keys.txt)` leaves a Windows file's line
    code, _, _ = batch(capsys, three, "-o", str(out), "--server", flaky_service.url, "--retries", "10")
    assert code == 0
    assert sorted(r["id"] for r in read_jsonl(out)) == IDS[:3]


def test_sigkill_midway_then_rerun_writes_every_id_once(
    flaky_service, images: Path, tmp_path: Path, capsys, caplog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIXELLLM_API_KEY", KEY)
    out, ids = tmp_path / "out.jsonl", IDS[:20]
    pattern = str(images / "img_[01]?.png")  # a glob: the first 20 images
    args = [pattern, "-o", str(out), "--server", flaky_service.url, "--concurrency", "2", "--retries", "10"]
    argv = [sys.executable, "scripts/batch_client.py", *args, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    done_before = out.read_bytes().count(b"\n")
    assert 5 <= done_before < len(ids)
    with open(out, "ab") as f:  # as if the kill had landed inside a write
        f.write(b'{"id": "img_19.png", "task": "capt')

    code, stdout, _ = batch(capsys, *args, "--json")  # the rerun, in this process
    assert code == 0
    assert "torn last line" in caplog.text
    summary = json.loads(stdout)
    assert (summary["skipped"], summary["succeeded"], summary["failed"]) == (done_before, len(ids) - done_before, 0)
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line is whole JSON
    assert sorted(r["id"] for r in records) == ids  # every id exactly once


def test_path_traversal_is_refused_unless_allowed(service, tmp_path: Path, capsys) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "a.png").write_bytes(png(64, 48, seed=1))
    (outside / "b.png").write_bytes(png(64, 48, seed=2))
    (root / "link.png").symlink_to(outside / "b.png")
    entries = [
        {"id": "../../x", "image": "a.png"},
        {"id": "abs", "image": str(outside / "b.png")},
        {"id": "up", "image": "../outside/b.png"},
        {"id": "link", "image": "link.png"},
        {"id": "ok", "image": "a.png"},
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    args = [str(manifest), "-o", str(out), "--errors", str(errors), "--server", service.url]

    code, stdout, _ = batch(capsys, *args)
    assert code == 1 and f"errors:  {errors}" in stdout
    assert [r["id"] for r in read_jsonl(out)] == ["ok"]
    codes = {e["id"]: e["error"]["code"] for e in read_jsonl(errors)}
    assert codes == {"../../x": "invalid_id", "abs": "outside_root", "up": "outside_root", "link": "outside_root"}
    assert all(e["attempts"] == 0 for e in read_jsonl(errors))  # never sent

    code, _, _ = batch(capsys, *args, "--allow-outside-root")
    assert code == 1
    assert sorted(r["id"] for r in read_jsonl(out)) == ["abs", "link", "ok", "up"]
    assert [e["id"] for e in read_jsonl(errors)] == ["../../x"]  # an unsafe id is never allowed

    # a folder: its symlink out is refused too, and its file names become safe ids
    (root / "sub dir").mkdir()
    (root / "sub dir" / "c.png").write_bytes(png(64, 48, seed=3))
    folder_out = tmp_path / "folder.jsonl"
    code, _, _ = batch(capsys, str(root), "-o", str(folder_out), "--server", service.url)
    assert code == 1
    assert sorted(r["id"] for r in read_jsonl(folder_out)) == ["a.png", "sub_dir_c.png"]
    assert [(e["id"], e["error"]["code"]) for e in read_jsonl(tmp_path / "folder.errors.jsonl")] == [
        ("link.png", "outside_root")
    ]


def test_bad_entries_become_error_records_naming_the_problem(service, tmp_path: Path, capsys) -> None:
    (tmp_path / "a.png").write_bytes(png(64, 48, seed=4))
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    lines = [
        json.dumps({"id": "where", "image": "a.png", "text": ["the red circle", "a square"]}),
        json.dumps({"id": 7, "image": "a.png", "point": [10, 12]}),
        json.dumps({"id": "inverted", "image": "a.png", "box": [30, 20, 10, 40]}),
        json.dumps({"id": "short", "image": "a.png", "box": [1, 2, 3]}),
        json.dumps({"id": "huge", "image": "a.png", "box": [0, 0, 10**400, 5]}),  # an int no float holds
        json.dumps({"id": "missing", "image": "nope.png"}),
        json.dumps({"id": "garbage", "image": "garbage.png"}),
        json.dumps({"id": "task", "image": "a.png", "task": "segment"}),
        json.dumps({"id": "where", "image": "a.png"}),
        "{not json",
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # as a Windows editor saves it
    out = tmp_path / "out.jsonl"
    code, stdout, _ = batch(capsys, str(manifest), "-o", str(out), "--server", service.url, "--json")
    assert code == 1
    assert json.loads(stdout)["failed"] == 8
    results = {r["id"]: r for r in read_jsonl(out)}
    assert set(results) == {"where", "7"}
    assert [loc["text"] for loc in results["where"]["result"]["results"]] == ["the red circle", "a square"]
    assert results["7"]["result"]["point"] == {"x": 10.0, "y": 12.0}
    errors = {(e["id"], e["error"]["code"]): e for e in read_jsonl(tmp_path / "out.errors.jsonl")}
    assert set(errors) == {
        ("inverted", "invalid_request"),
        ("short", "invalid_coordinates"),
        ("huge", "invalid_coordinates"),
        ("missing", "image_not_found"),
        ("garbage", "unsupported_media_type"),
        ("task", "invalid_task"),
        ("where", "duplicate_id"),
        (None, "invalid_json"),
    }
    assert errors["inverted", "invalid_request"]["status"] == 422
    assert errors["inverted", "invalid_request"]["error"]["message"].startswith("box")
    assert errors["garbage", "unsupported_media_type"]["status"] == 415
    assert "line 4" in errors["short", "invalid_coordinates"]["error"]["message"]
    # a rerun skips the done ids, but the entry refused for repeating one is another image: still refused
    code, stdout, _ = batch(capsys, str(manifest), "-o", str(out), "--server", service.url, "--json")
    assert code == 1 and json.loads(stdout)["failed"] == 8 and json.loads(stdout)["skipped"] == 2
    assert ("where", "duplicate_id") in {
        (e["id"], e["error"]["code"]) for e in read_jsonl(tmp_path / "out.errors.jsonl")
    }


def test_files_whose_paths_make_one_id_are_refused_on_every_run(service, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    (folder / "a").mkdir(parents=True)
    for path in (folder / "a" / "b.png", folder / "a_b.png"):
        path.write_bytes(png(24, 16, seed=1))
    out = tmp_path / "out.jsonl"
    for run in range(2):
        code, stdout, _ = batch(capsys, str(folder), "-o", str(out), "--server", service.url, "--json")
        assert code == 1 and json.loads(stdout)["failed"] == 1, (run, stdout)
        (error,) = read_jsonl(tmp_path / "out.errors.jsonl")
        assert error["id"] == "a_b.png" and error["error"]["code"] == "duplicate_id"
    assert [r["id"] for r in read_jsonl(out)] == ["a_b.png"]
    assert main(["batch", str(folder), "-o", str(out), "--server", service.url]) == 1  # with the progress bar
    bar = capsys.readouterr().err
    assert "failed=1" in bar and "failed=0" not in bar  # the refused entry counts from the start


def test_folder_and_glob_ids_and_what_they_leave_out(tmp_path: Path) -> None:
    """Ids are paths from the folder (or the glob's fixed prefix) whatever `--root` says; hidden files, a
    glob's non-images (the run's own results) and a link out of the root unless widened are not sent."""
    folder, outside = tmp_path / "shots", tmp_path / "outside"
    (folder / "sub").mkdir(parents=True), (folder / ".thumbnails").mkdir(), outside.mkdir()
    for path in (folder / "a.png", folder / "sub" / "b.jpg", folder / "._a.png", folder / ".thumbnails" / "c.png"):
        path.write_bytes(png(24, 16, seed=1))
    (outside / "d.png").write_bytes(png(24, 16, seed=2))
    (folder / "d.png").symlink_to(outside / "d.png")
    (folder / "results.jsonl").write_text(RESULT_LINE)
    (folder / "notes.txt").write_text("notes")

    def ids(source: str, root: str | None = None) -> tuple[list[str], list[tuple[str, str]]]:
        items, refused = discover(source, root)
        return [i.id for i in items], [(r["id"], r["error"]["code"]) for r in refused]

    assert ids(str(folder)) == (["a.png", "sub_b.jpg"], [("d.png", "outside_root")])
    assert ids(str(folder), root=str(tmp_path)) == (["a.png", "d.png", "sub_b.jpg"], [])  # the same ids, widened
    assert ids(str(folder / "*")) == (["a.png"], [("d.png", "outside_root")])
    assert ids(str(folder / "**" / "*"), root=str(tmp_path)) == (["a.png", "d.png", "sub_b.jpg"], [])
    with pytest.raises(BatchError, match="has no images"):
        discover(str(folder / "*.txt"))


def test_a_folder_is_walked_through_symlinked_folders_as_a_glob_is(tmp_path: Path) -> None:
    """A linked subfolder is walked (a link out of the root refused unless widened); a link back up is not
    walked again."""
    folder, outside = tmp_path / "shots", tmp_path / "outside"
    (folder / "real").mkdir(parents=True), outside.mkdir()
    (folder / "real" / "a.png").write_bytes(png(24, 16, seed=1))
    (outside / "b.png").write_bytes(png(24, 16, seed=2))
    (folder / "inside").symlink_to(folder / "real")
    (folder / "linked").symlink_to(outside)
    (folder / "real" / "up").symlink_to(folder)

    def ids(**kwargs: object) -> tuple[list[str], list[tuple[str, str]]]:
        items, refused = discover(str(folder), **kwargs)
        return [i.id for i in items], [(r["id"], r["error"]["code"]) for r in refused]

    assert ids() == (["inside_a.png", "real_a.png"], [("linked_b.png", "outside_root")])
    assert ids(allow_outside_root=True) == (["inside_a.png", "linked_b.png", "real_a.png"], [])
    (folder / "real" / "up").unlink()  # a glob would go round it until the path is too long
    globbed, _ = discover(str(folder / "**" / "*.png"), allow_outside_root=True)
    assert {i.id for i in globbed} >= {"inside_a.png", "linked_b.png", "real_a.png"}


def test_a_file_name_that_is_not_utf8_is_sent_and_written(service, tmp_path: Path) -> None:
    """A name in another encoding (Latin-1 from an old archive) is sent and written as JSON escapes that read
    back into the same name, not a crash that loses the batch."""
    folder = tmp_path / "archive"
    folder.mkdir()
    latin = folder / os.fsdecode(b"caf\xe9.png")
    latin.write_bytes(png(32, 24, seed=5))
    (folder / "plain.png").write_bytes(png(32, 24, seed=6))
    items, refused = discover(str(folder))
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    summary = run_batch(items, refused, out, errors, Options(service.url, progress=False))
    assert (summary.succeeded, summary.failed) == (2, 0), errors.read_text()
    assert b"caf\\udce9.png" in out.read_bytes()
    assert {r["image"] for r in read_jsonl(out)} == {str(latin), str(folder / "plain.png")}
    assert recover(out).keys() == {"caf_.png", "plain.png"}


def test_a_rate_limited_service_slows_the_batch_but_fails_no_item(tmp_path_factory, tmp_path: Path, images: Path):
    """The service's own rate limit (2 requests at once, then 2 a second) answers most of 8 workers' requests 429
    with Retry-After: waiting those out uses up no retry, so even with one retry every item arrives."""
    server = start_server(
        tmp_path_factory, ROOT / "weights" / "pixelllm-tiny", rate_limit_per_minute=120, rate_limit_burst=2
    )
    try:
        items, refused = discover(str(images / "img_0*.png"))
        out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
        summary = run_batch(items, refused, out, errors, Options(server.url, concurrency=8, retries=1, progress=False))
        limited = requests_total(server.url, "/v1/caption", "429")
    finally:
        server.stop()
    assert (summary.succeeded, summary.failed) == (10, 0), errors.read_text()
    assert limited >= 8 and summary.retries == limited  # each 429 waited out, none counted as a failure


def test_a_proxy_answering_502_for_a_gone_service_stops_the_batch(tmp_path: Path, images: Path) -> None:
    """Behind a proxy a crashed service is a 502 page, not a refused connection: once an item's retries end on
    one and /readyz is not 200, the run stops (exit 2, rerun later) instead of trying every item."""

    class Proxy(BaseHTTPRequestHandler):
        def answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            ready, self.server.ready_once = not self.server.ready_once, True
            self.answer(200, b"{}") if ready else self.answer(502, b"<html>502 Bad Gateway</html>")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.answer(502, b"<html>502 Bad Gateway</html>")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    server.ready_once, server.daemon_threads = False, True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        items, refused = discover(str(images))
        options = Options(f"http://127.0.0.1:{server.server_port}", concurrency=2, retries=1, backoff_s=0.01)
        with pytest.raises(BatchError, match="stopped answering \\(http_502"):
            run_batch(items, refused, tmp_path / "o.jsonl", tmp_path / "e.jsonl", replace(options, progress=False))
    finally:
        server.shutdown()
    assert 1 <= len(read_jsonl(tmp_path / "e.jsonl")) <= 2  # the items in flight, not all 50


def test_an_empty_text_is_refused(tmp_path: Path, images: Path, capsys) -> None:
    for text in ("", "  "):  # an unset $VAR would caption everything instead
        code, _, err = batch(capsys, str(images), "-o", str(tmp_path / "o.jsonl"), "--text", text)
        assert code == 2 and "the text is empty" in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_a_rerun_asking_another_task_of_done_ids_is_refused(service, tmp_path: Path, capsys) -> None:
    """Skipping done ids would leave what is asked now undone: the run stops before sending anything."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i}.png").write_bytes(png(32, 24, seed=i))
    out = tmp_path / "out.jsonl"
    common = ["-o", str(out), "--server", service.url]
    assert batch(capsys, str(folder), *common)[0] == 0
    written = out.read_bytes()
    code, _, err = batch(capsys, str(folder), *common, "--text", "the dog")
    assert code == 2 and "already holds other results for 2 of these ids" in err, err
    assert "(caption; asked now: localize 'the dog')" in err and "another file with -o" in err
    assert out.read_bytes() == written
    there = tmp_path / "there.jsonl"
    assert batch(capsys, str(folder), "-o", str(there), "--server", service.url, "--text", "the dog")[0] == 0
    code, _, err = batch(capsys, str(folder), "-o", str(there), "--server", service.url, "--text", "the cat")
    assert code == 2 and "(localize 'the dog'; asked now: localize 'the cat')" in err, err
    assert batch(capsys, str(folder), "-o", str(there), "--server", service.url, "--text", "the dog")[0] == 0
    assert [r["text"] for r in read_jsonl(there)] == [["the dog"]] * 2
    # texts the service cleans (a tab, a decomposed accent, whitespace) are compared as asked: the same command resumes
    raw, raw_out = "cafe\u0301\tdog\n", tmp_path / "raw.jsonl"
    for _ in range(2):
        code, stdout, err = batch(capsys, str(folder), "-o", str(raw_out), "--server", service.url, "--text", raw)
        assert code == 0, err
    assert stdout.startswith("2 entries: 0 written, 2 already done"), stdout
    assert [r["result"]["results"][0]["text"] for r in read_jsonl(raw_out)] == ["caf\u00e9 dog"] * 2


def test_a_service_gone_midway_stops_the_batch(tmp_path_factory, tmp_path: Path, images: Path, random_tiny_dir) -> None:
    """A crashed service ends the run (exit 2 from the CLI) after the requests in flight fail, instead of
    spending every remaining item's retries; the rerun goes on from there."""
    server = start_server(tmp_path_factory, random_tiny_dir, debug_batch_delay_ms=200, max_batch_size=1)
    items, refused = discover(str(images))
    out, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    options = Options(server.url, concurrency=2, retries=2, backoff_s=0.1, progress=False)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            run_batch(items, refused, out, errors, options)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 3, timeout_s=120)
    finally:
        server.proc.kill()  # a crash: no draining
        server.stop(graceful=False)
    killed = time.monotonic()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert time.monotonic() - killed < 10  # 2 retries at 0.1-0.2 s backoff, not 47 items' worth
    (error,) = outcome
    assert isinstance(error, BatchError) and f"the service at {server.url} stopped answering" in str(error)
    written = len(read_jsonl(out))
    assert f"{written} results written, {N - written} ids left: rerun the same command" in str(error)
    failures = read_jsonl(errors)
    assert 1 <= len(failures) <= 2 and {f["error"]["code"] for f in failures} == {"connection_error"}


def test_a_service_too_slow_to_answer_is_not_taken_for_gone(tmp_path: Path, images: Path) -> None:
    """A listener that is ready, then answers nothing in time: each request times out (a connection error
    after its retries) but the /readyz probe connects, so the run goes through every item."""

    class Hung(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.server.ready_answered:
                time.sleep(2)
            self.server.ready_answered = True
            with contextlib.suppress(OSError):  # a late answer: the client has gone
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        def do_POST(self) -> None:
            time.sleep(2)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hung)
    server.ready_answered, server.daemon_threads = False, True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        items, refused = discover(str(images / "img_0[0-2].png"))
        options = Options(f"http://127.0.0.1:{server.server_port}", concurrency=2, timeout_s=0.3, retries=0)
        summary = run_batch(
            items, refused, tmp_path / "o.jsonl", tmp_path / "e.jsonl", replace(options, progress=False)
        )
    finally:
        server.shutdown()
    assert (summary.succeeded, summary.failed) == (0, 3)
    assert {e["error"]["code"] for e in read_jsonl(tmp_path / "e.jsonl")} == {"connection_error"}


def test_a_model_that_failed_to_load_is_not_retried(tmp_path: Path, images: Path, random_tiny_dir: Path) -> None:
    """An app whose weights do not load, under uvicorn in this process (`pixelllm serve` itself would exit): the
    client stops at once with the reason instead of retrying a 503 that retrying cannot fix."""
    broken = broken_model_dir(tmp_path / "broken", like=random_tiny_dir)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Settings(model=str(broken))), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.started and httpx.get(f"{url}/healthz").status_code == 503, timeout_s=60)
        items, refused = discover(str(images))
        start = time.monotonic()
        with pytest.raises(BatchError, match="not ready: load_failed: the model failed to load"):
            run_batch(
                items, refused, tmp_path / "o.jsonl", tmp_path / "e.jsonl", Options(url, retries=5, progress=False)
            )
        assert time.monotonic() - start < 0.5  # a retry would wait at least backoff_s (0.5 s)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_errors_that_stop_the_batch_exit_2(tmp_path: Path, images: Path, capsys) -> None:
    code, _, err = batch(capsys, str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl"))
    assert code == 2 and "input not found" in err
    code, _, err = batch(capsys, str(tmp_path / "*.png"), "-o", str(tmp_path / "o.jsonl"))
    assert code == 2 and "nothing to send" in err
    code, _, err = batch(capsys, str(images), "-o", str(tmp_path / "o.jsonl"), "--server", "127.0.0.1:8000")
    assert code == 2 and "http:// or https:// URL" in err
    server = f"http://127.0.0.1:{free_port()}"
    code, _, err = batch(capsys, str(images), "-o", str(tmp_path / "o.jsonl"), "--server", server, "--retries", "1")
    assert code == 2 and "cannot reach the service" in err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.errors.jsonl").exists()  # nothing written
    picture = tmp_path / "picture.png"  # an image given as the output by mistake
    picture.write_bytes(png(24, 16, seed=1))
    code, _, err = batch(capsys, str(images), "-o", str(picture))
    assert code == 2 and "picture.png is not a results file: it is not UTF-8 text (an image?)" in err
    assert picture.read_bytes() == png(24, 16, seed=1)
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(RESULT_LINE + "not a record\n")
    code, _, err = batch(capsys, str(images), "-o", str(corrupt))
    assert code == 2 and "line 2 is not a results record" in err
    code, _, err = batch(capsys, str(images / IDS[0]), "-o", str(tmp_path / "o.jsonl"))
    assert code == 2 and "is an image: give a folder, a quoted glob or a JSONL manifest" in err
    code, _, err = batch(capsys, str(images / IDS[0]), str(images / IDS[1]), "-o", str(tmp_path / "o.jsonl"))
    assert code == 2 and "give one input, got 2" in err and "quote a glob" in err


RESULT_LINE = '{"id": "a", "task": "caption", "image": "a.png", "result": {}}\n'
ERROR_LINE = '{"id": "b", "image": "b.png", "status": 415, "attempts": 1, "error": {"code": "c", "message": "m"}}\n'


@pytest.mark.parametrize(
    "content",
    [
        b"important notes, no newline",
        b'{"id": "m1", "image": "imgs/cat.png"}',  # a one-line manifest without its newline
        b'{"id": "m1", "image": "imgs/cat.png"}\n{"id": "m2", "image": "imgs/dog.png"}\n',  # a manifest
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        RESULT_LINE.encode() + b"notes\n",
        RESULT_LINE.encode() + b"a torn line that is no record",
    ],
    ids=["notes", "manifest-line", "manifest", "png", "results-then-notes", "results-then-other-tail"],
)
@pytest.mark.parametrize("as_errors", [False, True], ids=["output", "errors"])
def test_a_file_given_by_mistake_is_left_as_it_is(
    tmp_path: Path, images: Path, capsys, content: bytes, as_errors: bool
) -> None:
    """Neither the output (appended to, torn line cut) nor the errors file (rewritten) may be anything but a
    file of this client: the batch exits 2 before touching it, or the other one, or the service."""
    given, other = tmp_path / "given.txt", tmp_path / "other.jsonl"
    given.write_bytes(content)
    other_line = ERROR_LINE if not as_errors else RESULT_LINE  # valid for its role: only `given` is refused
    other.write_text(other_line)
    output, errors = (other, given) if as_errors else (given, other)
    server = f"http://127.0.0.1:{free_port()}"  # nothing listens: a batch that got as far as sending fails else
    code, _, err = batch(capsys, str(images), "-o", str(output), "--errors", str(errors), "--server", server)
    assert code == 2, err
    assert f"{given} " in err and ("an errors" if as_errors else "a results") in err and "left as it is" in err
    assert given.read_bytes() == content and other.read_text() == other_line


def test_the_input_manifest_as_output_is_refused(tmp_path: Path, images: Path, capsys) -> None:
    manifest = tmp_path / "m.jsonl"
    text = "".join(json.dumps({"id": i, "image": str(images / i)}) + "\n" for i in IDS[:3])
    manifest.write_text(text)
    code, _, err = batch(capsys, str(manifest), "-o", str(manifest), "--allow-outside-root")
    assert code == 2 and "line 1 is not a results record (no task, result)" in err
    assert manifest.read_text() == text


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_failed_write_names_its_file(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("{not json\n")  # refused: its error record is written before any request
    code, _, err = batch(capsys, str(manifest), "-o", str(tmp_path / "o.jsonl"), "--errors", "/dev/full")
    assert code == 2 and "cannot write /dev/full" in err


def test_recover_cuts_only_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    second = b'{"id": 2, "task": "localize", "image": "b.png", "result": {}}\n'
    for torn in (b'{"id": "c", "res', b'{"i', b"{"):
        path.write_bytes(RESULT_LINE.encode() + b"\n" + second + torn)
        assert recover(path) == {"a": ("caption", ()), "2": ("localize", ())}
        assert path.read_bytes() == RESULT_LINE.encode() + b"\n" + second
    assert recover(tmp_path / "absent.jsonl") == {}
    compact = b'{"id":"d","task":"caption","image":"d.png","result":{}}'
    for last in (second.rstrip(), compact):  # a whole record without its newline (an editor, jq -c) is kept
        path.write_bytes(RESULT_LINE.encode() + last)
        assert set(recover(path)) == {"a", str(json.loads(last)["id"])}
        assert path.read_bytes() == RESULT_LINE.encode() + last + b"\n"  # and ended, for the records to come
    for line, reason in (b"[1]", "not a JSON object"), (b'"id task image result"', "not a JSON object"):
        path.write_bytes(RESULT_LINE.encode() + line + b"\n")
        with pytest.raises(BatchError, match=f"line 2 is not a results record \\({reason}\\)"):
            recover(path)


def test_retry_delay_honors_retry_after_with_jitter() -> None:
    rng, options = random.Random(0), Options(backoff_s=0.5, max_backoff_s=4.0)
    assert retry_after_s("3") == 3.0 and retry_after_s(None) is None and retry_after_s("soon") is None
    assert 8.0 < retry_after_s(formatdate(time.time() + 10, usegmt=True)) <= 10.0
    assert all(7.0 <= retry_delay(0, 7.0, options, rng) <= 8.4 for _ in range(100))
    delays = [retry_delay(2, None, options, rng) for _ in range(100)]
    assert all(1.0 <= d <= 2.0 for d in delays) and len(set(delays)) > 90  # 0.5 * 2**2, jittered
    assert all(2.0 <= retry_delay(10, None, options, rng) <= 4.0 for _ in range(100))  # capped


def test_batch_client_starts_without_loading_torch():
    """The HTTP-only client must not pay for importing the model stack."""
    code = "import sys, pixelllm.batch, pixelllm.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
