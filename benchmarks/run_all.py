"""Run every benchmark, then write benchmarks/RESULTS.md from benchmarks/results/*.json.

    python benchmarks/run_all.py --quick          # make bench-quick: small counts, minutes on 2 CPU cores
    python benchmarks/run_all.py                  # make bench: full counts
    python benchmarks/run_all.py --device cuda    # every script on the GPU (vs_kosmos2 in bf16)
    python benchmarks/run_all.py --report-only    # only rewrite RESULTS.md from the JSON files

A script that fails does not stop the others; its benchmarks show as not run in RESULTS.md, and the exit
status is 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, ROOT, resolve_device

HERE = Path(__file__).resolve().parent
REPORT = HERE / "RESULTS.md"
# script -> the result files it writes, in the order they run; a script that is absent is skipped
SCRIPTS = {
    "point_head_overhead.py": ["point_head_overhead"],
    "service_bench.py": ["batching_speedup", "latency", "regions_scaling", "cache_speedup"],
    "quantize_int8.py": ["quantize_int8"],
    "stream_latency.py": ["stream_latency"],
    "train_throughput.py": ["train_throughput"],
    "narratives_memory.py": ["narratives_memory"],
    "vs_kosmos2.py": ["vs_kosmos2"],
    "reliability_fuzz.py": ["reliability_fuzz"],
    "reliability_overload.py": ["reliability_overload"],
    "reliability_load.py": ["reliability_load"],
}
ORDER = [  # rows of the report
    "point_head_overhead",
    "cache_speedup",
    "quantize_int8",
    "batching_speedup",
    "latency",
    "regions_scaling",
    "stream_latency",
    "train_throughput",
    "narratives_memory",
    "vs_kosmos2",
    "reliability_fuzz",
    "reliability_overload",
    "reliability_load",
]


def run_scripts(quick: bool, device: str, note: str, results_dir: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Run each script present; -> {benchmark name: why it has no result from this run} for the failures, and
    {script: its exit status and seconds}."""
    failed, scripts = {}, {}
    for script, names in SCRIPTS.items():
        if not (HERE / script).is_file():
            continue
        cmd = [sys.executable, str(HERE / script), "--device", device, *["--quick"] * quick]
        cmd += ["--note", note] * bool(note) + ["--results-dir", str(results_dir)] * (results_dir != RESULTS_DIR)
        print(f"\n=== {script}", flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        tail: deque[str] = deque(maxlen=1)
        for line in proc.stderr:  # passed through as it comes; the last line says why a script failed
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())
        code = proc.wait()
        scripts[script] = {"exit": code, "seconds": round(time.perf_counter() - start, 1)}
        print(f"=== {script}: exit {code} after {scripts[script]['seconds']:.0f} s", flush=True)
        if code != 0:
            failed.update(dict.fromkeys(names, f"{script} failed (exit {code}): {tail[0] if tail else 'no message'}"))
    return failed, scripts


def machine_text(m: dict[str, Any]) -> str:
    load = m.get("load_average") or [None]
    text = f"{m.get('cpu_count')}-core {m.get('cpu', m.get('device_name'))}"
    if str(m.get("device", "cpu")).startswith("cuda"):
        text = f"{m['device_name']}, {text}"
    return text + f", torch {m.get('torch')}, load {load[0]}"


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(results: dict[str, dict[str, Any]], failed: dict[str, str], run: dict[str, Any] | None = None) -> str:
    """The Markdown report: one table row per benchmark, then the unmet goals with what limits them. `run`:
    the last run of this script (run_all.json), if any."""
    names = [n for n in ORDER if n in results or n in failed] + sorted(set(results) - set(ORDER))
    dates = sorted({r["machine"]["date"][:10] for r in results.values() if r.get("machine", {}).get("date")})
    modes = sorted({r.get("mode", "?") for r in results.values()})
    lines = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/run_all.py` (`make bench`, `make bench-quick`) from `benchmarks/results/<name>.json`,",
        "which hold every raw figure and the machine. Ratios are measured side by side in one run; the shared",
        "CPU machine is noisy, so the load average at the start of each benchmark is listed with it.",
        "",
        f"Mode: {', '.join(modes) or '-'}; date: {', '.join(dates) or '-'}.",
        "",
        *(
            [
                f"Last `run_all.py` run: {run['mode']} on {run['device']}, {run['date']}, {run['wall_s'] / 60:.1f} min ("
                + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in run["scripts"].items())
                + ").",
                "",
            ]
            if run
            else []
        ),
        "| benchmark | figure | goal | met? | machine | command |",
        "|---|---|---|---|---|---|",
    ]
    unmet = []
    for name in names:
        if name in failed:
            lines.append(f"| {name} | not run: {cell(failed[name])} | - | - | - | - |")
            continue
        r = results[name]
        s = r.get("summary") or {}
        met = {True: "yes", False: "**no**", None: "-"}[s.get("met")]
        figure = s.get("figure", "(no summary in the JSON)")
        lines.append(
            f"| {name} | {cell(figure)} | {cell(s.get('goal') or '-')} | {met} | "
            f"{cell(machine_text(r.get('machine', {})))} | `{cell(r.get('command', '?'))}` |"
        )
        if s.get("met") is False:
            unmet.append(
                f"- **{name}** ({figure}; goal {s.get('goal')}): {s.get('limits') or 'no explanation recorded'}"
            )
    if unmet:
        lines += ["", "## Goals not met, and what limits them", "", *unmet]
    latency = results.get("latency")
    if latency and "endpoints" in latency:
        lines += ["", "## Latency per endpoint (default model, serial requests)", ""]
        lines += ["| endpoint | n | p50 ms | p95 ms |", "|---|---|---|---|"]
        lines += [
            f"| {e} | {s['n']} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} |" for e, s in latency["endpoints"].items()
        ]
        rps = latency["rps_by_clients"]
        lines += [
            "",
            f"Captions per second at {', '.join(rps)} concurrent clients: {', '.join(f'{v:.1f}' for v in rps.values())}.",
        ]
    if not any(str(r.get("machine", {}).get("device", "")).startswith("cuda") for r in results.values()):
        lines += [
            "",
            "## GPU",
            "",
            "No GPU run: the machine these figures come from has no GPU, so the full-size paper preset was not run",
            "in bf16. Every script takes `--device cuda`; `python benchmarks/run_all.py --device cuda` runs them all",
            "there (vs_kosmos2 then compares the full pixelllm-t5xl with Kosmos-2 in bf16, 32 tokens, 5 captions).",
        ]
    return "\n".join(lines) + "\n"


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    known = {name for names in SCRIPTS.values() for name in names}
    paths = sorted(p for p in results_dir.glob("*.json") if p.stem in known)
    return {p.stem: json.loads(p.read_text()) for p in paths}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="each script's quick form")
    parser.add_argument("--device", default="auto", help="cpu or cuda (default: cuda when visible)")
    parser.add_argument("--note", default="", help="recorded with every result, e.g. what else ran on the machine")
    parser.add_argument("--report-only", action="store_true", help="run nothing; rewrite the report from the JSON")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    run_file = args.results_dir / "run_all.json"
    failed: dict[str, str] = {}
    if not args.report_only:
        start, device = time.perf_counter(), resolve_device(args.device)
        failed, scripts = run_scripts(args.quick, device, args.note, args.results_dir)
        run = {
            "mode": "quick" if args.quick else "full",
            "device": device,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - start, 1),
            "scripts": scripts,
        }
        run_file.write_text(json.dumps(run, indent=2) + "\n")
    results = {k: v for k, v in load_results(args.results_dir).items() if k not in failed}
    run = json.loads(run_file.read_text()) if run_file.is_file() else None
    args.report.write_text(render(results, failed, run))
    print(f"\nwrote {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
