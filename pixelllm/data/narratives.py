"""Localized Narratives: per-word locations from mouse traces, and per-token training targets.

Records follow the official JSONL format (one record per line)::

    {"dataset_id", "image_id", "annotator_id", "caption",
     "timed_caption": [{"utterance", "start_time", "end_time"}, ...],
     "traces": [[{"x", "y", "t"}, ...], ...], "voice_recording"}

x, y are normalized image coordinates (x right, y down, [0, 1]; raw points slightly outside are clipped),
t is seconds. Each trace segment runs from the pointer entering the image to its leaving it. A word's
location comes from the trace during its utterance: each segment is linearly interpolated at those of
`samples_per_word` instants spread uniformly over [start_time, end_time] (clamped to the trace's time range)
that fall within it, never across the gap between two segments; the mean of those samples is the word's
point and their min/max its box. All coordinates here stay normalized to [0, 1].
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pixelllm.tokenizer import EOS_ID, Tokenizer

log = logging.getLogger(__name__)

INDEX_VERSION = 1  # of the saved index's layout and of the checks its records passed: raise it when either changes

REQUIRED_FIELDS = ("image_id", "caption", "timed_caption", "traces")


@dataclass
class LocatedWord:
    """An utterance matched to `caption[start:end]`, with its location (None when it has no trace)."""

    start: int
    end: int
    text: str
    point: tuple[float, float] | None
    box: tuple[float, float, float, float] | None


@dataclass
class TokenTargets:
    """Decoder targets for one caption: T = number of caption tokens + 1 (EOS last).

    ids: T token ids. boxes: (T, 4) float32 word-box corners (x0, y0, x1, y1), normalized [0, 1].
    points: (T, 2) float32 word points (x, y), normalized. located: (T,) bool, False where the token has
    no location (its boxes/points rows are zero); EOS is never located.
    """

    ids: list[int]
    boxes: np.ndarray
    points: np.ndarray
    located: np.ndarray


def read_narratives(path: str | Path) -> Iterator[dict]:
    """Yield the records of a Localized Narratives JSONL file, skipping blank lines.

    Raises ValueError naming the file and line for invalid JSON or a record missing a required field.
    """
    for _, record in _records_at(Path(path)):
        yield record


def _records_at(path: Path) -> Iterator[tuple[int, dict]]:
    """(byte offset of its line, record) of each record of the JSONL file `path` (UTF-8, lines ending in LF or
    CRLF, a byte-order mark allowed), checked as `read_narratives`."""
    with path.open("rb") as f:
        offset = 0
        for lineno, line in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = line.decode("utf-8-sig")  # -sig: a Windows editor's byte-order mark is not JSON
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text: {e}") from None
            if text.strip():
                yield offset, _parse_record(text, where)
            offset += len(line)


def _parse_record(line: str, where: str) -> dict:
    """The record a JSONL line holds; ValueError naming `where` if it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e} (a JSONL file holds each record whole on one line)") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"{where}: record is missing field(s) {', '.join(missing)}")
    problem = record_problem(record)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return record


class NarrativesIndex(Sequence[dict]):
    """The records of Localized Narratives JSONL files, in file order, read from disk when indexed.

    Opening reads and checks every record once (as `read_narratives`) but keeps only its file, byte offset and
    image_id: a parsed record takes several times its JSON in memory, too much for the large splits.
    The files must not change while the index is in use (a file whose size or modification time changed is an
    error when read). `cache`: a JSON file the index is saved to, and read back from while the files are as they
    were (same paths, sizes, inodes, modification and change times), so a resumed run does not read the whole
    split again.
    """

    def __init__(self, paths: Sequence[str | Path], progress: bool = False, cache: str | Path | None = None):
        self.paths = [Path(p) for p in paths]
        identities = [_identity(p) for p in self.paths]
        self._stamps = [(size, mtime) for size, _, mtime, _ in identities]  # what `_stamp` reads at each access
        key = {"version": INDEX_VERSION, "paths": [str(p.resolve()) for p in self.paths], "files_as_read": identities}
        saved = _read_index(Path(cache), key) if cache is not None else None
        if saved is not None:
            files, offsets, self.image_ids = saved["files"], saved["offsets"], saved["image_ids"]
            log.info("read the index of %d narratives from %s", len(offsets), cache)
        else:
            files, offsets, self.image_ids = self._scan(progress)
            if cache is not None:
                _write_index(Path(cache), {**key, "files": files, "offsets": offsets, "image_ids": self.image_ids})
        self._files = np.asarray(files, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)

    def _scan(self, progress: bool) -> tuple[list[int], list[int], list[str | int]]:
        """(file, byte offset, image_id) of every record, each read and checked."""
        files, offsets, image_ids = [], [], []
        total = sum(size for size, _ in self._stamps)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="reading narratives", disable=not progress, delay=2)
        with bar:  # shown for files that take more than 2 s to read
            for k, path in enumerate(self.paths):
                read = 0
                for offset, record in _records_at(path):
                    files.append(k)
                    offsets.append(offset)
                    image_ids.append(record["image_id"])
                    bar.update(offset - read)
                    read = offset
                bar.update(self._stamps[k][0] - read)
        return files, offsets, image_ids

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        """Record `i`, read from its file (checked when the index was made; here only that it is still there)."""
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index a NarrativesIndex with one int (records are read one at a time), not {i!r}")
        k, offset = self._files[i], int(self._offsets[i])
        path = self.paths[k]
        with path.open("rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            record = json.loads(line.decode("utf-8-sig"))
        except ValueError:
            record = None
        if (
            _stamp(path) != self._stamps[k]
            or not isinstance(record, dict)
            or record.get("image_id") != self.image_ids[i]
        ):
            raise ValueError(
                f"{path} changed since it was read (record {i}, of image_id {self.image_ids[i]!r}, at byte {offset}): "
                "start again to read it anew"
            )
        return record


def _read_index(cache: Path, key: dict) -> dict | None:
    """The index saved in `cache` if it was made, in this format, from the files `key` names as they are now;
    else None (no such file, another format or files, or not whole)."""
    try:
        saved = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    current = json.loads(json.dumps(key))  # as JSON holds it: lists, not tuples
    if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in current.items()):
        return None
    files, offsets, image_ids = (saved.get(k) for k in ("files", "offsets", "image_ids"))
    if not (isinstance(files, list) and isinstance(offsets, list) and isinstance(image_ids, list)):
        return None
    if not len(files) == len(offsets) == len(image_ids) or not set(files) <= set(range(len(key["paths"]))):
        return None
    return saved


def _write_index(cache: Path, index: dict) -> None:
    """Save `index` to `cache` whole (written beside it, then renamed), or log why not: it only saves time."""
    partial = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=cache.parent, prefix=f"{cache.name}.", suffix=".partial")
        with os.fdopen(fd, "w") as f:
            json.dump(index, f)
        os.replace(partial, cache)
    except OSError as e:
        if partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(partial)
        log.warning("cannot save the narratives index to %s (%s): the next run reads the files again", cache, e)


def _stamp(path: Path) -> tuple[int, int]:
    """(size, modification time in ns) of a file: what tells that it changed."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _identity(path: Path) -> tuple[int, int, int, int]:
    """(size, inode, modification and change times in ns) of a file: a saved index is of these contents only
    while all four hold (a copy that keeps the modification time, `cp -p`, still changes the change time)."""
    stat = path.stat()
    return stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_problem(record: dict) -> str | None:
    """What is wrong with a record's fields (types, as the official schema has them), or None."""
    if isinstance(record["image_id"], bool) or not isinstance(record["image_id"], (str, int)):
        return "image_id must be a string or an integer"
    if not isinstance(record["caption"], str):
        return "caption must be a string"
    utterances = record["timed_caption"]
    if not isinstance(utterances, list):
        return "timed_caption must be a list"
    for i, utt in enumerate(utterances):
        if not isinstance(utt, dict) or not isinstance(utt.get("utterance"), str):
            return f"timed_caption[{i}] must be an object with a string 'utterance'"
        if not (_is_number(utt.get("start_time")) and _is_number(utt.get("end_time"))):
            return f"timed_caption[{i}] needs numbers 'start_time' and 'end_time'"
    traces = record["traces"]
    if not isinstance(traces, list) or not all(isinstance(segment, list) for segment in traces):
        return "traces must be a list of segments, each a list of points"
    for i, segment in enumerate(traces):
        for j, point in enumerate(segment):
            if not isinstance(point, dict) or not all(_is_number(point.get(k)) for k in ("x", "y", "t")):
                return f"traces[{i}][{j}] must be an object with numbers 'x', 'y' and 't'"
    return None


def _trace_segments(traces: list[list[dict]]) -> list[np.ndarray]:
    """Each non-empty trace segment (the pointer on the image, from entering it to leaving it) as an (N, 3)
    array of (t, x, y) sorted by t, x and y clipped to [0, 1]; the segments in order of their start."""
    segments = []
    for segment in traces:
        if segment:
            trace = np.asarray([(p["t"], p["x"], p["y"]) for p in segment], dtype=np.float64)
            trace = trace[np.argsort(trace[:, 0], kind="stable")]
            trace[:, 1:] = np.clip(trace[:, 1:], 0.0, 1.0)
            segments.append(trace)
    return sorted(segments, key=lambda trace: trace[0, 0])


def _sample_trace(segments: list[np.ndarray], start: float, end: float, n: int) -> np.ndarray | None:
    """(m, 2) trace positions at those of n instants uniform over [start, end] ∩ the traces' time range that
    fall within a segment, each interpolated within its segment: none between segments, where the pointer was
    off the image. A segment inside the interval but between two instants gives its points. None if nothing."""
    if not segments:
        return None
    first, last = segments[0][0, 0], max(trace[-1, 0] for trace in segments)
    if end < first or start > last:
        return None
    times = np.linspace(max(start, first), min(end, last), n)
    parts = []
    for trace in segments:
        inside = times[(times >= trace[0, 0]) & (times <= trace[-1, 0])]
        if len(inside) == 0:
            inside = trace[(trace[:, 0] >= start) & (trace[:, 0] <= end), 0]
        parts.append(
            np.stack([np.interp(inside, trace[:, 0], trace[:, 1]), np.interp(inside, trace[:, 0], trace[:, 2])], 1)
        )
    samples = np.concatenate(parts)
    return samples if len(samples) else None


def _words(text: str) -> list[tuple[str, int, int]]:
    """The words of `text` (maximal runs of letters and digits), lowercased, each with its (start, end)."""
    return [(m.group().lower(), m.start(), m.end()) for m in re.finditer(r"[^\W_]+", text)]


def word_locations(record: dict, samples_per_word: int = 16) -> list[LocatedWord]:
    """Locate each utterance of `record` in its caption and give it a point and box from the trace.

    The utterances' words are aligned with the caption's (case-insensitive, punctuation aside) by longest
    common runs, in order: an utterance is found when all its words align with consecutive caption words, and
    a misheard or unspoken word costs only its own utterance. A found utterance whose interval holds no trace
    (outside the trace's time range, between two segments while the pointer was off the image, or an empty
    trace) gets point=None, box=None.
    """
    caption = record["caption"]
    words = _words(caption)
    utterances = [(utt, _words(utt["utterance"])) for utt in record["timed_caption"]]
    spoken = [word for _, utt_words in utterances for word, _, _ in utt_words]
    matcher = SequenceMatcher(None, spoken, [word for word, _, _ in words], autojunk=False)
    aligned = {a + k: b + k for a, b, size in matcher.get_matching_blocks() for k in range(size)}
    segments = _trace_segments(record["traces"])
    located, first = [], 0
    for utt, utt_words in utterances:
        at = [aligned.get(k) for k in range(first, first + len(utt_words))]
        first += len(utt_words)
        if not at or None in at or at[-1] - at[0] != len(at) - 1:
            continue
        start, end = words[at[0]][1], words[at[-1]][2]
        samples = _sample_trace(segments, float(utt["start_time"]), float(utt["end_time"]), samples_per_word)
        point = box = None
        if samples is not None:
            point = (float(samples[:, 0].mean()), float(samples[:, 1].mean()))
            (x0, y0), (x1, y1) = samples.min(0), samples.max(0)
            box = (float(x0), float(y0), float(x1), float(y1))
        located.append(LocatedWord(start, end, caption[start:end], point, box))
    return located


def token_targets(text: str, words: list[LocatedWord], tokenizer: Tokenizer) -> TokenTargets:
    """Tokenize `text` (+ EOS) and give each token the location of the first located word it overlaps.

    Overlap is by character span, with the token's span stripped of whitespace first, so whitespace-only
    tokens (a lone SentencePiece "▁") and punctuation outside every word stay unlocated.
    """
    ids, spans = tokenizer.encode_with_offsets(text)
    located_words = [w for w in words if w.box is not None]
    n = len(ids) + 1
    boxes = np.zeros((n, 4), dtype=np.float32)
    points = np.zeros((n, 2), dtype=np.float32)
    located = np.zeros(n, dtype=bool)
    for k, (s, e) in enumerate(spans):
        piece = text[s:e]
        if not piece.strip():
            continue
        s, e = s + len(piece) - len(piece.lstrip()), e - (len(piece) - len(piece.rstrip()))
        word = next((w for w in located_words if s < w.end and e > w.start), None)
        if word is not None:
            boxes[k], points[k], located[k] = word.box, word.point, True
    return TokenTargets(ids=list(ids) + [EOS_ID], boxes=boxes, points=points, located=located)


def coco_captions_to_narratives(annotations: str | Path, out: str | Path) -> int:
    """Write COCO captions (`captions_train2017.json`: `annotations: [{id, image_id, caption}]`) as narratives
    JSONL, one record per caption with no trace (captions only: no word gets a location); returns the count.

    `image_id` stays COCO's integer, so `image_name` "{image_id:0>12}.jpg" names its train2017 file.
    """
    annotations = Path(annotations)
    try:
        data = json.loads(annotations.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the COCO captions file {annotations}: {e}") from None
    entries = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{annotations} is not a COCO captions file: it has no 'annotations' list")
    records = []
    for n, entry in enumerate(entries):
        if not (isinstance(entry, dict) and isinstance(entry.get("caption"), str) and "image_id" in entry):
            raise ValueError(f"{annotations}: annotations[{n}] needs 'image_id' and a string 'caption'")
        record = {
            "dataset_id": "coco_captions",
            "image_id": entry["image_id"],
            "annotator_id": entry.get("id", n),
            "caption": " ".join(entry["caption"].split()),
            "timed_caption": [],
            "traces": [],
            "voice_recording": "",
        }
        problem = record_problem(record)
        if problem:
            raise ValueError(f"{annotations}: annotations[{n}]: {problem}")
        records.append(json.dumps(record) + "\n")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(records), encoding="utf-8")
    return len(records)
