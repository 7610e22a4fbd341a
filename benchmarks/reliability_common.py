"""What the reliability scripts (reliability_*.py) share: the model they serve, their command line, and how a
response is told apart: its status category, and whether an error is in the service's JSON error shape."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import RESULTS_DIR, ROOT  # noqa: E402
from server_helpers import MAKE_MODEL  # noqa: E402
from service_bench import DEFAULT_WEIGHTS, make_model  # noqa: E402


def default_model(work: Path) -> tuple[Path, str]:
    """The shipped default model, or a random-weight tiny one saved under `work` when it is absent."""
    if DEFAULT_WEIGHTS.is_dir():
        return DEFAULT_WEIGHTS, f"trained weights {DEFAULT_WEIGHTS.relative_to(ROOT)}"
    return make_model(MAKE_MODEL, work / "pixelllm-tiny-random"), "pixelllm-tiny, RANDOM weights"


def arguments(doc: str, quick: str) -> argparse.ArgumentParser:
    """The command line every benchmark script takes (run_all.py passes these)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--device", default="auto", help="PIXELLLM_DEVICE for the server (default: auto)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS for the server")
    parser.add_argument("--note", default="", help="recorded with the machine, e.g. what else ran on it")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser


def category(response: httpx.Response) -> str:
    """'200', or an error's status and code: '429 queue_full'."""
    if response.status_code < 400:
        return str(response.status_code)
    try:
        return f"{response.status_code} {response.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} (not the JSON error shape)"


def error_problem(response: httpx.Response) -> str | None:
    """What is wrong with an error response, or None: it must be JSON `{"error": {"code", "message"}}`."""
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    if not (isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == {"code", "message"}):
        return f"not the error shape: {str(body)[:200]}"
    if "Traceback" in body["error"]["message"]:
        return "a stack trace in the message"
    return None
