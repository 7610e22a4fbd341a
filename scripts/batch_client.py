"""Batch client: `python scripts/batch_client.py INPUT -o results.jsonl [options]`, the same as `pixelllm batch`.

python scripts/batch_client.py images/ -o results.jsonl --server http://127.0.0.1:8000
python scripts/batch_client.py manifest.jsonl -o results.jsonl --concurrency 16 --json
"""

import sys

from pixelllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
