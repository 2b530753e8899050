#!/usr/bin/env bash
# One prepared GPU check (issues #15, #28), at most 9.5 minutes on one GPU (kernel build + self-check, tests on
# their own time, then a 210 s measurement budget); see docs/kernels.md "GPU check".
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine: report + JSON in $OUT (else benchmarks/results)
#   bash benchmarks/gpu_check.sh --cpu-dry-run    # anywhere: the same code at tiny shapes, < 1 minute
#   bash benchmarks/gpu_check.sh --only sd3 --budget-s 150     # rerun one section
#
# Needs no network. Packages the GPU image lacks (diffusers, omegaconf) and the LPIPS weights travel
# in .gpu_carry/ (made by benchmarks/gpu_check_prepare.sh on a machine with pip): installed here into
# /tmp, never into the image's site-packages.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
if compgen -G ".gpu_carry/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gq_site \
    .gpu_carry/wheels/*.whl || exit 2
  export PYTHONPATH=/tmp/gq_site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${GQ_LPIPS_WEIGHTS:-}" ] && [ -d .gpu_carry/lpips ]; then
  export GQ_LPIPS_WEIGHTS=$PWD/.gpu_carry/lpips
fi
export PYTHONUNBUFFERED=1
unset GQ_KERNELS_SELF_CHECK  # the kernel self-check is the first thing this check reports: never skipped here
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
exec timeout -k 10 "${GQ_CHECK_TIMEOUT:-420}" "$PY" benchmarks/gpu_check.py --out-dir "$OUT_DIR" "$@"
