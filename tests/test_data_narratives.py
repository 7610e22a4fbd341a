import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pixelllm.data.narratives import NarrativesIndex, read_narratives, token_targets, word_locations
from pixelllm.tokenizer import EOS_ID, Tokenizer, words_with_tokens


def make_record(caption, utterances, traces):
    """An LN record; utterances are (text, start_time, end_time), traces lists of (x, y, t) segments."""
    return {
        "dataset_id": "test",
        "image_id": "img",
        "annotator_id": 0,
        "caption": caption,
        "timed_caption": [{"utterance": u, "start_time": s, "end_time": e} for u, s, e in utterances],
        "traces": [[{"x": x, "y": y, "t": t} for x, y, t in segment] for segment in traces],
        "voice_recording": "",
    }


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["a red circle on the left and a blue square.", "the dog runs, the cat sleeps."] * 20
    return Tokenizer.train(texts, vocab_size=40)


def test_interpolates_between_two_raw_points():
    # the interval [0.25, 0.75] holds no raw point: samples come from the line between t=0 and t=1
    rec = make_record("dog", [("dog", 0.25, 0.75)], [[(0.0, 0.0, 0.0), (1.0, 0.5, 1.0)]])
    (word,) = word_locations(rec)
    assert word.point == pytest.approx((0.5, 0.25))
    assert word.box == pytest.approx((0.25, 0.125, 0.75, 0.375))


def test_mean_is_time_integrated():
    # the trace waits at x=0 for 0.9 s then moves to x=1 in 0.1 s: the point is near 0, not at the middle
    rec = make_record("dog", [("dog", 0.0, 1.0)], [[(0.0, 0.5, 0.0), (0.0, 0.5, 0.9), (1.0, 0.5, 1.0)]])
    (word,) = word_locations(rec, samples_per_word=101)
    assert word.point[0] == pytest.approx(0.05, abs=0.01)  # the mean of raw points would be 1/3
    assert word.box == pytest.approx((0.0, 0.5, 1.0, 0.5))


def test_points_outside_unit_square_are_clipped():
    rec = make_record("dog", [("dog", 0.0, 1.0)], [[(-0.2, 1.3, 0.0), (1.4, -0.1, 1.0)]])
    (word,) = word_locations(rec)
    assert word.box == pytest.approx((0.0, 0.0, 1.0, 1.0))
    assert all(0.0 <= v <= 1.0 for v in word.point)


def test_utterance_without_trace_is_unlocated():
    trace = [[(0.1, 0.1, 0.0), (0.2, 0.2, 1.0)]]
    rec = make_record("big dog", [("big", 0.5, 2.0), ("dog", 5.0, 6.0)], trace)
    big, dog = word_locations(rec)
    assert big.box == pytest.approx((0.15, 0.15, 0.2, 0.2))  # clamped to the trace's end at t=1
    assert dog.point is None and dog.box is None
    (empty,) = word_locations(make_record("dog", [("dog", 0.0, 1.0)], []))
    assert empty.point is None and empty.box is None


def test_no_location_between_segments_where_the_pointer_left_the_image():
    # segments given out of time order; between them (t 1..2) the pointer was off the image
    traces = [[(0.8, 0.8, 2.0), (0.9, 0.9, 3.0)], [(0.0, 0.0, 0.0), (0.2, 0.2, 1.0)]]
    utterances = [("a", 0.0, 1.0), ("b", 1.2, 1.8), ("c", 2.0, 3.0), ("d", 0.5, 2.5)]
    a, b, c, d = word_locations(make_record("a b c d", utterances, traces), samples_per_word=21)
    assert a.box == pytest.approx((0.0, 0.0, 0.2, 0.2))
    assert b.point is None and b.box is None
    assert c.box == pytest.approx((0.8, 0.8, 0.9, 0.9))
    # d: 5 samples in each segment (t 0.5..1.0, 2.0..2.5), none of the gap's 11
    assert d.box == pytest.approx((0.1, 0.1, 0.85, 0.85))
    assert d.point == pytest.approx((((0.1 + 0.2) / 2 + (0.8 + 0.85) / 2) / 2,) * 2)


def test_a_short_segment_between_two_instants_is_not_missed():
    traces = [
        [(0.0, 0.0, 0.0), (0.1, 0.1, 1.0)],
        [(0.7, 0.3, 5.02), (0.7, 0.3, 5.03)],
        [(0.9, 0.9, 9.0), (1.0, 1.0, 10.0)],
    ]
    (word,) = word_locations(make_record("dog", [("dog", 2.0, 8.0)], traces), samples_per_word=4)
    assert word.box == pytest.approx((0.7, 0.3, 0.7, 0.3))


def spoken(words: str) -> list[tuple[str, float, float]]:
    """One utterance per word, a second each."""
    return [(w, float(i), i + 1.0) for i, w in enumerate(words.split())]


@pytest.mark.parametrize(
    "caption, said, found",
    [
        # a misheard "the" for "this" does not jump to a later "the", skipping the words before it
        ("this dog is near the car", "the dog is near the car", "dog@5 is near the@17 car"),
        # words of the caption nobody said: the rest is still found, each with its own utterance's time
        (
            "a dog on the left side of the big red ball and a cat on the right",
            "a dog on the left side red ball and a cat on the right",
            "a@0 dog on the@9 left side red ball and a@47 cat on the@56 right",
        ),
        # three misheard words in a row cost those three only
        ("a dog on the left side of a ball", "a dog on teh lfet sdie of a ball", "a@0 dog on of a@26 ball"),
        ("a big red dog", "a dog", "a dog"),
    ],
    ids=["misheard", "unspoken", "misheard-run", "unspoken-adjectives"],
)
def test_utterances_align_with_the_caption_despite_misheard_or_unspoken_words(caption, said, found):
    utts = spoken(said)
    words = word_locations(make_record(caption, utts, [[(0.5, 0.5, 0.0), (0.5, 0.5, float(len(utts)))]]))
    expected = [w.split("@") for w in found.split()]
    assert [w.text for w in words] == [text for text, *_ in expected]
    for word, (_, *at) in zip(words, expected):
        assert caption[word.start : word.end] == word.text and (not at or word.start == int(at[0]))


def test_each_found_word_has_its_own_utterances_time():
    caption = "a dog on the left side of the big red ball"
    said = spoken("a dog on the left side red ball")
    trace = [[(i / 10, 0.5, float(i)) for i in range(11)]]  # x = t / 10
    words = word_locations(make_record(caption, said, trace), samples_per_word=3)
    assert [(w.text, round(w.point[0], 3)) for w in words] == [
        (text, round((t0 + t1) / 20, 3)) for text, t0, t1 in said
    ]


def test_utterances_matched_in_caption_order():
    caption = "The large cat, and... a DOG!"
    utts = [("the", 0, 1), ("large", 1, 2), ("zebra", 2, 3), ("cat", 3, 4), ("and", 4, 5), ("a", 5, 6), ("dog", 6, 7)]
    words = word_locations(make_record(caption, utts, [[(0.5, 0.5, 0.0), (0.5, 0.5, 7.0)]]))
    assert [w.text for w in words] == ["The", "large", "cat", "and", "a", "DOG"]  # zebra skipped
    assert [caption[w.start : w.end] for w in words] == [w.text for w in words]
    assert words[4].start == caption.index(" a ") + 1  # not the "a" inside "large"
    hyphen = word_locations(make_record("an ice-cream cone", [("ice cream", 0, 1)], [[(0.5, 0.5, 0.0)]]))
    assert [w.text for w in hyphen] == ["ice-cream"]


def test_token_targets(tokenizer):
    caption = "a red circle, the dog."
    utts = [("a", 0, 1), ("red", 1, 2), ("circle", 2, 3), ("the", 3, 4), ("dog", 10, 11)]
    trace = [[(0.1, 0.1, 0.0), (0.2, 0.2, 1.0), (0.3, 0.3, 2.0), (0.4, 0.4, 3.0), (0.5, 0.5, 4.0)]]
    words = word_locations(make_record(caption, utts, trace))
    targets = token_targets(caption, words, tokenizer)
    ids, spans = tokenizer.encode_with_offsets(caption)
    assert targets.ids == ids + [EOS_ID]
    n = len(ids) + 1
    assert targets.boxes.shape == (n, 4) and targets.boxes.dtype == np.float32
    assert targets.points.shape == (n, 2) and targets.located.shape == (n,)
    assert not targets.located[-1]
    assert not targets.boxes[~targets.located].any()

    by_text = {w.text: w for w in words}
    split_words = 0
    for start, end, members in words_with_tokens(caption, spans):
        word = by_text[caption[start:end]]
        split_words += len(members) > 1
        for k in members:
            if word.box is None:  # "dog" has no trace in its interval
                assert not targets.located[k]
            else:
                assert targets.located[k]
                np.testing.assert_allclose(targets.boxes[k], word.box, rtol=1e-6)
                np.testing.assert_allclose(targets.points[k], word.point, rtol=1e-6)
    assert split_words > 0, "the test tokenizer should split some word into several tokens"
    for k, (s, e) in enumerate(spans):
        if not caption[s:e].strip(" ,."):  # punctuation and lone-space tokens
            assert not targets.located[k]


def test_read_narratives(tmp_path):
    rec = make_record("dog", [("dog", 0.0, 1.0)], [[(0.5, 0.5, 0.0)]])
    path = tmp_path / "ln.jsonl"
    path.write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    assert list(read_narratives(path)) == [rec, rec]
    path.write_text("\ufeff" + json.dumps(rec) + "\r\n", encoding="utf-8")  # as a Windows editor saves it
    assert list(read_narratives(path)) == [rec]

    path.write_text(json.dumps(rec) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"ln\.jsonl:2: invalid JSON"):
        list(read_narratives(path))
    path.write_text(json.dumps(rec, indent=2) + "\n")  # pretty-printed: a record over many lines
    with pytest.raises(ValueError, match=r"ln\.jsonl:1: invalid JSON: .* each record whole on one line"):
        list(read_narratives(path))
    path.write_text(json.dumps({k: v for k, v in rec.items() if k != "traces"}) + "\n")
    with pytest.raises(ValueError, match=r"ln\.jsonl:1: .*traces"):
        list(read_narratives(path))

    path.write_bytes(json.dumps({**rec, "caption": "dog"}).encode()[:-2] + b"\xff\xfe}\n")  # not UTF-8
    with pytest.raises(ValueError, match=r"ln\.jsonl:1: not UTF-8 text"):
        list(read_narratives(path))
    for blank in ("\ufeff\n", "\ufeff \r\n", "\u00a0\u00a0\n"):  # a BOM on a blank first line; no-break spaces
        path.write_text(blank + json.dumps(rec) + "\n", encoding="utf-8")
        assert list(read_narratives(path)) == [rec], blank
    path.write_text("\ufeff", encoding="utf-8")  # a file holding only a BOM
    assert list(read_narratives(path)) == []


def test_the_index_reads_each_record_from_disk_when_asked(tmp_path):
    """Over shards, blank lines, a BOM and CRLF: the same records as read_narratives, in order, holding only
    offsets and image_ids in memory; a file changed under it is an error that says so."""
    records = [make_record(f"dog {i}", [("dog", 0.0, 1.0)], [[(0.1 * i, 0.5, 0.0)]]) for i in range(5)]
    for i, record in enumerate(records):
        record["image_id"] = i if i % 2 else f"img{i}"
    first, second = tmp_path / "ln-0.jsonl", tmp_path / "ln-1.jsonl"
    first.write_text("\ufeff" + json.dumps(records[0]) + "\r\n\n" + json.dumps(records[1]) + "\r\n", encoding="utf-8")
    second.write_text("".join(json.dumps(r) + "\n" for r in records[2:]))
    index = NarrativesIndex([first, second])
    assert len(index) == 5 and index.image_ids == [r["image_id"] for r in records]
    assert [index[i] for i in range(5)] == records == [*read_narratives(first), *read_narratives(second)]
    assert index[-1] == records[-1] and list(index) == records
    with pytest.raises(IndexError):
        index[5]
    with pytest.raises(TypeError, match="one int"):
        index[1:3]

    # edited after it was read: the size or time tells, and a record of another image at the offset does
    stat = second.stat()
    second.write_text(
        "".join(json.dumps({**r, "image_id": "imgX"} if i == 0 else r) + "\n" for i, r in enumerate(records[2:]))
    )
    os.utime(second, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same length, same time: only the record differs
    assert index[3] == records[3]
    with pytest.raises(
        ValueError, match=r"ln-1\.jsonl changed since it was read \(record 2, of image_id 'img2', at byte 0"
    ):
        index[2]
    second.write_text(json.dumps(records[3]))
    with pytest.raises(
        ValueError, match=r"ln-1\.jsonl changed since it was read \(record 3, of image_id 3, at byte \d+"
    ):
        index[3]
    first.write_text(json.dumps(records[0]) + "\n{cut")
    with pytest.raises(ValueError, match=r"ln-0\.jsonl:2: invalid JSON"):
        NarrativesIndex([first])


def test_the_index_is_saved_and_read_back_while_the_files_are_as_they_were(tmp_path, monkeypatch, caplog):
    import pixelllm.data.narratives as narratives

    records = [make_record(f"dog {i}", [("dog", 0.0, 1.0)], [[(0.5, 0.5, 0.0)]]) for i in range(3)]
    for i, record in enumerate(records):
        record["image_id"] = i if i % 2 else f"img{i}"
    path, cache = tmp_path / "ln.jsonl", tmp_path / "run" / "index.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    built = NarrativesIndex([path], cache=cache)
    assert cache.is_file() and not list(cache.parent.glob("*.partial"))

    def not_read(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(narratives, "_records_at", not_read)
    with caplog.at_level("INFO", logger="pixelllm.data.narratives"):
        again = NarrativesIndex([path], cache=cache)
    assert f"read the index of 3 narratives from {cache}" in caplog.text
    assert again.image_ids == built.image_ids == [r["image_id"] for r in records]
    assert [again[i] for i in range(3)] == records
    monkeypatch.undo()

    stat = path.stat()
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(records)))  # changed in place, same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later time, whatever the clock's tick
    assert NarrativesIndex([path], cache=cache).image_ids == [r["image_id"] for r in reversed(records)]
    saved = json.loads(cache.read_text())

    def read_again(paths):
        monkeypatch.setattr(narratives, "_records_at", not_read)
        with pytest.raises(AssertionError, match="was read again"):
            NarrativesIndex(paths, cache=cache)
        monkeypatch.undo()

    other, copy = tmp_path / "other.jsonl", tmp_path / "copy.jsonl"
    shutil.copy2(path, other)
    read_again([other])  # the same bytes and times under another name
    shutil.copy2(path, copy)
    os.replace(copy, path)
    read_again([path])  # another file put in its place, with its size and modification time (cp -p)
    NarrativesIndex([path], cache=cache)
    saved = json.loads(cache.read_text())
    for broken in (
        "{cut",
        json.dumps({**saved, "version": saved["version"] + 1}),
        json.dumps({**saved, "offsets": saved["offsets"][:-1]}),
        json.dumps({**saved, "files": [1, 1, 1]}),
        json.dumps({k: v for k, v in saved.items() if k != "image_ids"}),
    ):
        cache.write_text(broken)
        read_again([path])  # broken, of another version, or not whole
    assert NarrativesIndex([path], cache=cache).image_ids == [r["image_id"] for r in reversed(records)]
    assert not list(cache.parent.glob("*.partial"))


def test_an_index_that_cannot_be_saved_warns_and_works(tmp_path, caplog):
    path = tmp_path / "ln.jsonl"
    path.write_text(json.dumps(make_record("dog", [("dog", 0.0, 1.0)], [[(0.5, 0.5, 0.0)]])) + "\n")
    (tmp_path / "file").write_text("")  # the cache's folder is a file: nothing can be written there
    with caplog.at_level("WARNING", logger="pixelllm.data.narratives"):
        index = NarrativesIndex([path], cache=tmp_path / "file" / "index.json")
    assert len(index) == 1 and "cannot save the narratives index to" in caplog.text


def test_the_index_keeps_far_less_in_memory_than_the_records(tmp_path):
    """A parsed record with a trace takes several times its JSON; the index keeps an offset and an image_id."""
    trace = [[(i / 400, 0.5, i * 0.01) for i in range(400)]]
    path = tmp_path / "ln.jsonl"
    path.write_text("".join(json.dumps(make_record("a dog", [("dog", 0.0, 1.0)], trace)) + "\n" for _ in range(200)))

    def allocated(read):
        tracemalloc.start()
        kept = read()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert len(kept) == 200
        return size

    records, index = allocated(lambda: list(read_narratives(path))), allocated(lambda: NarrativesIndex([path]))
    assert records > 2 * path.stat().st_size and index < path.stat().st_size / 50, (records, index)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda r: r["traces"][0][0].pop("t"), r"traces\[0\]\[0\]"),
        (lambda r: r["timed_caption"][0].pop("end_time"), r"timed_caption\[0\]"),
        (lambda r: r.update(traces=None), "traces must be a list"),
        (lambda r: r.update(traces=[{"x": 0.1, "y": 0.1, "t": 0.0}]), "traces must be a list"),
        (lambda r: r.update(caption=None), "caption must be a string"),
        (lambda r: r.update(image_id=True), "image_id"),
        (lambda r: r["traces"][0][0].update(x="0.5"), r"traces\[0\]\[0\]"),
        (lambda r: r["timed_caption"][0].update(start_time=float("nan")), r"timed_caption\[0\]"),
    ],
)
def test_a_malformed_record_is_an_error_naming_its_file_and_line(tmp_path, change, problem):
    """Checked when the file is read, not when training first draws the record (possibly hours in)."""
    good = make_record("dog", [("dog", 0.0, 1.0)], [[(0.5, 0.5, 0.0)]])
    bad = json.loads(json.dumps(good))
    change(bad)
    path = tmp_path / "ln.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=rf"ln\.jsonl:2: .*{problem}"):
        list(read_narratives(path))


def test_the_readmes_record_reads_as_it_is_shown(tmp_path):
    """The README's narratives record, copied into a file as it stands there, is one valid record."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("Training data is Localized-Narratives JSONL", 1)[1].split("```json\n", 1)[1].split("```")[0]
    (tmp_path / "ln.jsonl").write_text(block)
    (record,) = read_narratives(tmp_path / "ln.jsonl")
    assert record["image_id"] == "img001" and record["traces"]
