"""The benchmark suite: result files, the RESULTS.md writer, and one benchmark run in its smallest form."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import run_all  # noqa: E402
from common import machine, write_result  # noqa: E402


def table_rows(report: str) -> dict[str, list[str]]:
    """Benchmark name -> the cells of its row in the report's main table."""
    rows = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] in run_all.ORDER:
            rows[cells[0]] = cells
    return rows


@pytest.fixture
def sample_results(tmp_path: Path) -> Path:
    cpu = machine("cpu", threads=2)
    write_result(
        "point_head_overhead",
        {"results": []},
        mode="quick",
        machine_info=cpu,
        figure="tiny 1.015, base 1.007",
        goal="<= 1.05",
        met=True,
        results_dir=tmp_path,
    )
    write_result(
        "batching_speedup",
        {"speedup": 2.14},
        mode="quick",
        machine_info=cpu,
        figure="2.14x (20.4 / 9.5 req/s)",
        goal=">= 3x",
        met=False,
        limits="2 CPU cores, compute-bound",
        results_dir=tmp_path,
    )
    write_result(
        "latency",
        {
            "endpoints": {"POST /v1/caption": {"n": 10, "p50_ms": 84.26, "p95_ms": 92.94}},
            "rps_by_clients": {"1": 9.5, "4": 18.0, "16": 21.0},
        },
        mode="quick",
        machine_info=cpu,
        figure="caption p50 84 ms",
        results_dir=tmp_path,
    )
    (tmp_path / "unrelated.json").write_text("{}")
    return tmp_path


def test_report_lists_figures_goals_and_unmet_goals(sample_results: Path) -> None:
    report_path = sample_results / "RESULTS.md"
    assert run_all.main(["--report-only", "--results-dir", str(sample_results), "--report", str(report_path)]) == 0
    report = report_path.read_text()
    rows = table_rows(report)
    assert list(rows) == ["point_head_overhead", "batching_speedup", "latency"]  # issue order; unrelated.json left out
    assert rows["point_head_overhead"][1:4] == ["tiny 1.015, base 1.007", "<= 1.05", "yes"]
    assert rows["batching_speedup"][1:4] == ["2.14x (20.4 / 9.5 req/s)", ">= 3x", "**no**"]
    assert rows["latency"][2:4] == ["-", "-"]  # no goal
    assert "2-core" in rows["latency"][4] and "torch" in rows["latency"][4]
    assert rows["latency"][5].startswith("`python ")
    unmet = report.split("## Goals not met, and what limits them")[1].split("##")[0]
    assert "batching_speedup" in unmet and "2 CPU cores, compute-bound" in unmet
    assert "point_head_overhead" not in unmet
    assert "| POST /v1/caption | 10 | 84.3 | 92.9 |" in report
    assert "No GPU run" in report


def test_report_marks_failed_scripts_and_gpu_runs(sample_results: Path) -> None:
    results = run_all.load_results(sample_results)
    results["latency"]["machine"].update(device="cuda", device_name="NVIDIA H100")
    failed = {"vs_kosmos2": "vs_kosmos2.py failed (exit 1): pixelllm: needs about 17 GB of free memory"}
    run = {"mode": "quick", "device": "cpu", "date": "2026-01-01T00:00:00+00:00", "wall_s": 90.0}
    run["scripts"] = {"service_bench.py": {"exit": 0, "seconds": 61.2}, "vs_kosmos2.py": {"exit": 1, "seconds": 2.0}}
    report = run_all.render(results, failed, run)
    rows = table_rows(report)
    assert rows["vs_kosmos2"][1].startswith("not run: vs_kosmos2.py failed (exit 1)")
    assert rows["latency"][4].startswith("NVIDIA H100")
    assert "No GPU run" not in report
    assert "quick on cpu, 2026-01-01T00:00:00+00:00, 1.5 min (service_bench.py 61 s, vs_kosmos2.py 2 s)" in report


def test_point_head_overhead_smallest_form(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/point_head_overhead.py", "--presets", "pixelllm-tiny", "--tokens", "4"]
    cmd += ["--repeats", "1", "--warmup", "0", "--results-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "point_head_overhead.json").read_text())
    assert result["benchmark"] == "point_head_overhead" and result["mode"] == "full"
    assert result["command"].startswith("python benchmarks/point_head_overhead.py --presets pixelllm-tiny")
    (tiny,) = result["results"]
    assert tiny["preset"] == "pixelllm-tiny" and tiny["tokens"] == 4
    ratio = tiny["generate"]["ratio"]
    assert ratio > 0 and result["summary"]["met"] == (ratio <= 1.05)
    assert result["summary"]["figure"].startswith(f"tiny {ratio:.3f}")
    assert {"cpu", "cpu_count", "torch", "device", "device_name", "load_average"} <= set(result["machine"])
    assert "point_head_overhead: tiny" in proc.stdout


def test_narratives_memory_smallest_form(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/narratives_memory.py", "--records", "200", "--points", "400"]
    proc = subprocess.run([*cmd, "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "narratives_memory.json").read_text())
    assert result["settings"] == {"records": 200, "words": 40, "points": 400}
    assert result["list_bytes"] > 2 * result["file_bytes"] and result["file_bytes"] > 20 * result["index_bytes"] > 0
    assert result["list_over_index"] == result["list_bytes"] / result["index_bytes"]
    assert 0 < result["access_ms_median"] <= result["access_ms_p95"] and result["saved_index_read_s"] > 0
    assert result["summary"]["figure"].startswith("200 records of") and result["summary"]["met"] is None


def test_quantize_int8_smallest_form(tmp_path: Path) -> None:
    cmd = [sys.executable, "benchmarks/quantize_int8.py", "--quick", "--presets", "pixelllm-tiny", "--tokens", "4"]
    cmd += ["--scenes", "1", "--results-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "quantize_int8.json").read_text())
    assert result["benchmark"] == "quantize_int8" and result["mode"] == "quick"
    tiny = result["speed"]["pixelllm-tiny"]
    assert len(tiny["ms_all"]["float32"]) == len(tiny["ms_all"]["int8"]) == 3
    assert tiny["speedup"] == pytest.approx(tiny["ms_median"]["float32"] / tiny["ms_median"]["int8"])
    assert set(result["eval"]) == {"float32", "int8"} and 0 <= result["eval"]["int8"]["referring_acc@0.5"] <= 1
    assert result["summary"]["figure"].startswith("cached-image region caption, 4 tokens: tiny ")
    skipped = subprocess.run([*cmd[:2], "--device", "cuda"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert skipped.returncode == 0 and "runs on the CPU only" in skipped.stderr


@pytest.mark.slow
def test_service_bench_quick(tmp_path: Path) -> None:
    """`service_bench.py --quick` end to end (real servers; pixelllm-base built with random weights): its four
    result files, each figure recomputed from the measurements beside it."""
    cmd = [sys.executable, "benchmarks/service_bench.py", "--quick", "--device", "cpu", "--max-new-tokens", "4"]
    proc = subprocess.run(
        [*cmd, "--results-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(results) == {"batching_speedup", "latency", "regions_scaling", "cache_speedup"}
    assert all(r["mode"] == "quick" and r["settings"]["max_new_tokens"] == 4 for r in results.values())

    batching = results["batching_speedup"]
    rps = {n: c["rps"] for n, c in batching["sweep"]["clients"].items()}
    assert set(rps) == {"1", "4", "8", "16"} and all(v > 0 for v in rps.values())
    assert batching["speedup"] == pytest.approx(rps["8"] / rps["1"])
    assert batching["summary"]["met"] == (batching["speedup"] >= 3)
    assert batching["summary"]["limits"].startswith(f"{os.cpu_count()} CPU threads (of {os.cpu_count()} cores), ")

    endpoints = results["latency"]["endpoints"]
    assert {"POST /v1/caption", "POST /v1/localize (mask png)", "GET /healthz"} <= set(endpoints)
    assert all(0 < e["p50_ms"] <= e["p95_ms"] for e in endpoints.values())

    regions = results["regions_scaling"]
    assert regions["ratio"] == pytest.approx(regions["boxes_32"]["p50_ms"] / regions["one_box"]["p50_ms"])

    cache = results["cache_speedup"]
    for prompts in (cache["prompts"], cache["prompts_quantize_int8"]):
        for c in prompts.values():
            assert c["second_ms_median"] < c["first_ms_median"] and c["encode_ms_median"] > 0
    assert cache["summary"]["met"] == all(c["speedup_median"] >= 5 for c in cache["prompts"].values())
