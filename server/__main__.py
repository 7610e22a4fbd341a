"""`python -m server --host H --port P`: serve with settings from `PIXELLLM_*` environment variables."""

import argparse
import sys

from .app import run
from .errors import StartupError

parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
args = parser.parse_args()
try:
    run(args.host, args.port)
except StartupError as exc:
    sys.exit(f"python -m server: error: {exc}")
