#!/usr/bin/env bash
# Prepare .gpu_carry/ for benchmarks/gpu_check.sh: run this on the development machine (pip and the
# project's venv with network to the package registry), NOT on the GPU machine, which has no network.
#
#   bash benchmarks/gpu_check_prepare.sh      # -> .gpu_carry/wheels/*.whl + .gpu_carry/lpips/lpips_alex.pt
#
# The GPU image (see docs/kernels.md "GPU check") has torch, accelerate, numpy, pyyaml, pytest, ninja
# and nvcc, but not diffusers or omegaconf: their wheels travel (pure Python, --no-deps; their other
# requirements are in the image). The LPIPS(alex) weights travel as a converted state dict (~10 MB).
# .gpu_carry/ is added to .git/info/exclude, so it travels only when `carry` names it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu_carry/' "$exclude" 2>/dev/null || echo '/.gpu_carry/' >>"$exclude"
rm -rf .gpu_carry
mkdir -p .gpu_carry/wheels .gpu_carry/lpips
# the versions this venv tests with (diffusers >= 0.42 needs huggingface-hub >= 1.32; the image has 1.33)
versions=$("$PY" -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in ('diffusers', 'omegaconf')))")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu_carry/wheels $versions
"$PY" - <<'PYEOF'
import torch

from gq_plugin.lab.metrics.lpips import load_lpips_state_dict

torch.save(load_lpips_state_dict("alex"), ".gpu_carry/lpips/lpips_alex.pt")
PYEOF
ls -la .gpu_carry/wheels .gpu_carry/lpips
du -sh .gpu_carry
