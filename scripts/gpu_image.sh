#!/usr/bin/env bash
# The GPU image's software on this CPU: torch 2.11 (PyPI's CUDA build, which runs on a CPU), triton 3.6,
# transformers 5.17 and no `datasets`, in .venv/gpu-image. Runs what must hold there before a GPU window is spent:
# whole compiled models and the kernels' compile paths (tests/test_compile.py, the lookup's custom ops; torch 2.11
# traced the reference's data checks and refused wrap_triton of interpreted kernels, both fixed and kept so by
# this), the fused loss's op tests, every kernel's sm_90 build with the device's Triton 3.6 (registers differ from
# 3.9's: the sorted backward's 32 x 128 tile takes 216 there, 158 on 3.9), and `scripts/gpu.sh first-hour --dry-run`.
# About 4 minutes the first time (4.6 GB of wheels), 2 after.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_IMAGE_VENV:-.venv/gpu-image}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"$VENV/bin/python" -c "import torch, transformers; assert torch.__version__.startswith('2.11.')" 2>/dev/null \
  || "${pip[@]}" "torch==2.11.0" "transformers==5.17.0" "numpy<2.4" "pytest>=8" "pytest-benchmark>=4"
"$VENV/bin/python" -c "import torch, triton, transformers; print('gpu image:', torch.__version__, triton.__version__, transformers.__version__)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_compile.py tests/test_linear_cross_entropy.py \
  tests/test_linear_log_probs.py tests/test_kernels_compile.py \
  "tests/test_lookup.py::test_custom_ops_trace_under_torch_compile" ${PYTEST_ARGS:-}
out=$(mktemp -d)
PYTHON="$VENV/bin/python" bash scripts/gpu.sh first-hour --dry-run --out "$out/first-hour"
grep -q "| tests | ok" "$out/first-hour/first-hour.md"
echo "gpu image: first-hour dry run passed ($out/first-hour/first-hour.md)"
