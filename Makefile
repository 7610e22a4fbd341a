# A new user needs two commands: `make serve` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL ?= $(or $(PIXELLLM_MODEL),weights/pixelllm-tiny)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve caption test test-all lint format train-default eval-default clean docker-build docker-test

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -c constraints.txt -e '.[dev,eval,ablation,ray]'
	touch $@

# After upgrading packages in .venv (and passing the tests): pin what is installed for every fresh machine.
.PHONY: constraints
constraints:
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

serve: setup
	PIXELLLM_MODEL=$(MODEL) $(BIN)/pixelllm serve --host $(HOST) --port $(PORT)

caption: setup
	$(BIN)/pixelllm caption assets/sample.jpg --model $(MODEL)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint docker/Dockerfile docker/Dockerfile.cuda

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Known vulnerabilities in the installed (pinned) packages, from PyPI's advisory data (needs the network);
# --strict fails when a package cannot be checked, so "no findings" always means checked. README "Security".
.PHONY: audit
AUDIT_FLAGS ?=
audit: setup
	$(BIN)/pip-audit --local --skip-editable --strict --desc $(AUDIT_FLAGS)

# pytest exits 5 when it collects nothing; that is not a failure of the code under test.
test: lint browser-deps
	$(BIN)/pytest -q -m "not slow"; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-all: lint browser-deps
	$(BIN)/pytest -q

# Every benchmark, then benchmarks/RESULTS.md (benchmarks/run_all.py; DEVICE=cuda on a GPU machine,
# NOTE="..." is recorded with every result). bench-quick: the same with small counts.
.PHONY: bench bench-quick
DEVICE ?= auto
NOTE ?=
bench: setup
	$(BIN)/python benchmarks/run_all.py --device $(DEVICE) --note "$(NOTE)"

bench-quick: setup
	$(BIN)/python benchmarks/run_all.py --quick --device $(DEVICE) --note "$(NOTE)"

# Reproduce the shipped default model (see weights/pixelllm-tiny/MODEL_CARD.md).
train-default: setup
	$(BIN)/pixelllm train pixelllm/configs/train/tiny.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_continue.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage3.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage4.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage5.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage6.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage7.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage8.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage9.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage10.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage11.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage12.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage13.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage14.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage15.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage16.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage17.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage18.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage19.json
	$(BIN)/python scripts/average_weights.py runs/tiny-stage17/final runs/tiny-stage18/final runs/tiny-stage19/final --out runs/tiny-soup17-19
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage20.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage21.json
	$(BIN)/pixelllm train pixelllm/configs/train/tiny_stage23.json

# Wheels of everything but torch for a GPU machine without network (benchmarks/device_check.sh installs them).
.PHONY: device-wheels
PYTHON_VERSION ?= 3.12
device-wheels: setup
	$(BIN)/python benchmarks/device_wheels.py --python-version $(PYTHON_VERSION)

eval-default: setup
	$(BIN)/pixelllm eval --model $(MODEL) --num-scenes 500 --seed 1000 --renderer independent --out runs/eval-default.json

clean:
	rm -rf $(VENV) build *.egg-info

# Debian chromium + chromedriver for the browser tests (tests/test_server_browser.py); apt needs root.
.PHONY: browser-deps
browser-deps:
	@if (command -v chromium && command -v chromedriver) >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update && apt-get install -y chromium chromium-driver) || echo "installing chromium failed: the browser tests will be skipped (fail where CI is set)"; \
	else echo "chromium/chromedriver missing (install them as root on Debian): the browser tests will be skipped (fail where CI is set)"; fi

# Container images (README "Docker"): podman where installed (no daemon needed), else docker.
DOCKER ?= $(shell command -v podman >/dev/null 2>&1 && echo podman || echo docker)
DOCKER_IMAGE ?= pixelllm:cpu
# extra `build` flags, e.g. a local base image where no registry can be reached (README "Docker")
DOCKER_BUILD_FLAGS ?=

# BUILDAH_FORMAT=docker: podman's default OCI format drops the HEALTHCHECK (docker ignores the variable).
docker-build:
	BUILDAH_FORMAT=docker $(DOCKER) build $(DOCKER_BUILD_FLAGS) -f docker/Dockerfile -t $(DOCKER_IMAGE) .

# Build, run read-only, query /healthz and /v1/caption, stop: tests/test_docker.py (skips, saying why, without
# a working engine).
docker-test: setup
	DOCKER=$(DOCKER) DOCKER_IMAGE=$(DOCKER_IMAGE) $(BIN)/pytest -q -m slow tests/test_docker.py
