"""Memory a Localized Narratives source holds: parsed records in a list vs `NarrativesIndex` (offsets on disk).

Writes made-up records of the official format (`--words` timed words, `--points` trace points in 4 segments,
coordinates to 4 decimals) to a temporary JSONL file, then measures with tracemalloc the memory each way keeps
after reading it; then, with tracemalloc off, the time each way takes to read the file, the time to read the
index back from its saved copy (what a resumed run does), and the time to read one record by index (the cost a
training step pays per sample, beside decoding its image).

    python benchmarks/narratives_memory.py --quick     # 1000 records
    python benchmarks/narratives_memory.py             # 5000 records
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from common import RESULTS_DIR, machine, write_result

from pixelllm.data.narratives import NarrativesIndex, read_narratives

RECORDS = {"quick": 1000, "full": 5000}
WORDS = [
    "a",
    "the",
    "large",
    "small",
    "green",
    "red",
    "blue",
    "circle",
    "square",
    "star",
    "in",
    "middle",
    "of",
    "image",
    "left",
    "right",
    "there",
    "is",
]


def make_record(image_id: int, words: int, points: int, rng: random.Random) -> dict:
    caption = [rng.choice(WORDS) for _ in range(words)]
    timed = [{"utterance": w, "start_time": 0.5 * k, "end_time": 0.5 * k + 0.4} for k, w in enumerate(caption)]
    step = 0.5 * words / points
    trace = [{"x": round(rng.random(), 4), "y": round(rng.random(), 4), "t": round(k * step, 3)} for k in range(points)]
    quarter = points // 4
    return {
        "dataset_id": "benchmark",
        "image_id": image_id,
        "annotator_id": 0,
        "caption": " ".join(caption),
        "timed_caption": timed,
        "traces": [trace[k : k + quarter] for k in range(0, points, quarter)],
        "voice_recording": "",
    }


def kept_bytes(read: Callable[[], object]) -> int:
    """Bytes still allocated after `read()`, while what it returned is kept."""
    tracemalloc.start()
    kept = read()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return size


def seconds(read: Callable[[], object]) -> float:
    start = time.perf_counter()
    read()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{RECORDS['quick']} records instead of {RECORDS['full']}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="unused: reading is on the CPU")
    parser.add_argument("--records", type=int, help="records to write (default: by --quick)")
    parser.add_argument("--words", type=int, default=40, help="timed words per record")
    parser.add_argument("--points", type=int, default=800, help="trace points per record")
    parser.add_argument("--note", default="", help="recorded with the machine, e.g. what else ran on it")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    n = args.records or RECORDS[mode]
    rng = random.Random(0)
    machine_info = machine("cpu", note=args.note)
    with tempfile.TemporaryDirectory(prefix="narratives-memory-") as tmp:
        path = Path(tmp) / "narratives.jsonl"
        with path.open("w") as f:
            for i in range(n):
                f.write(json.dumps(make_record(i, args.words, args.points, rng)) + "\n")
        file_bytes = path.stat().st_size
        list_bytes = kept_bytes(lambda: list(read_narratives(path)))
        index_bytes = kept_bytes(lambda: NarrativesIndex([path]))
        list_s = seconds(lambda: list(read_narratives(path)))
        index_s = seconds(lambda: NarrativesIndex([path]))
        cache = Path(tmp) / "index.json"
        NarrativesIndex([path], cache=cache)
        cached_s = seconds(lambda: NarrativesIndex([path], cache=cache))
        index = NarrativesIndex([path], cache=cache)
        assert len(index) == n
        picks = [rng.randrange(n) for _ in range(200)]
        access_ms = []
        for i in picks:
            start = time.perf_counter()
            index[i]
            access_ms.append(1000 * (time.perf_counter() - start))
    mib = 2**20
    ratio = list_bytes / index_bytes
    figure = (
        f"{n} records of {file_bytes / n / 1024:.1f} KiB JSON: a list of parsed records keeps {list_bytes / mib:.1f} "
        f"MiB ({list_bytes / file_bytes:.1f}x the file), the index {index_bytes / mib:.2f} MiB ({ratio:.0f}x less); "
        f"reading the file {index_s:.2f} s, the saved index {cached_s:.3f} s; one record by index "
        f"{statistics.median(access_ms):.2f} ms (median of 200)"
    )
    write_result(
        "narratives_memory",
        {
            "settings": {"records": n, "words": args.words, "points": args.points},
            "file_bytes": file_bytes,
            "list_bytes": list_bytes,
            "list_read_s": list_s,
            "index_bytes": index_bytes,
            "index_read_s": index_s,
            "index_read_mb_per_s": file_bytes / mib / index_s,
            "saved_index_read_s": cached_s,
            "list_over_index": ratio,
            "access_ms_median": statistics.median(access_ms),
            "access_ms_p95": statistics.quantiles(access_ms, n=20)[-1],
        },
        mode=mode,
        machine_info=machine_info,
        figure=figure,
        results_dir=args.results_dir,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
