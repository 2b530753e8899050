"""Full-reference pixel metrics: PSNR, SSIM and MS-SSIM, per image.

Conventions (those of the paper and of most VQ-VAE tables):

* inputs are NCHW float tensors in ``[-1, 1]`` (values outside are clamped by default),
* they are mapped to the 0-255 scale with ``x -> (x + 1) * 127.5`` **without rounding**,
* PSNR is computed per image from the MSE averaged over C, H, W, then averaged over images
  by the caller (``10 * log10(255^2 / MSE)``),
* SSIM / MS-SSIM use a Gaussian 11x11 window (sigma 1.5), ``data_range=255``, on RGB
  (mean over channels), 'valid' filtering as in the reference MATLAB code, through
  pytorch-msssim (torchmetrics as a fallback, whose padded filtering differs by ~1e-3).
  MS-SSIM needs 5 scales of an 11-px window, i.e. both sides >= 161 px; for smaller
  images :func:`ms_ssim` returns NaN.
"""

from __future__ import annotations

import math

import torch

__all__ = ["MS_SSIM_MIN_SIZE", "ms_ssim", "psnr", "ssim", "to_255"]

#: smallest image side MS-SSIM (5 scales, 11-px window) accepts: (11 - 1) * 2**4 + 1
MS_SSIM_MIN_SIZE = 161


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two NCHW batches of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def to_255(x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """``[-1, 1]`` -> ``[0, 255]`` as float (no rounding); clamps to the range first by default."""
    x = x.float()
    if clamp:
        x = x.clamp(-1.0, 1.0)
    return (x + 1.0) * 127.5


def psnr(x: torch.Tensor, y: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Per-image PSNR in dB on the 0-255 scale; inputs NCHW in ``[-1, 1]``; returns ``(N,)``.

    Identical images give ``inf``.
    """
    _check_pair(x, y)
    mse = (to_255(x, clamp) - to_255(y, clamp)).double().square().mean(dim=(1, 2, 3))
    return (10.0 * torch.log10(255.0**2 / mse)).float()


def _backend():
    """``("msssim", module)`` for pytorch-msssim, else ``("tm", torchmetrics.functional.image)``."""
    try:
        import pytorch_msssim

        return "msssim", pytorch_msssim
    except ImportError:
        pass
    try:
        from torchmetrics.functional import image as tmi

        return "tm", tmi
    except ImportError as e:
        raise ImportError("SSIM / MS-SSIM need pytorch-msssim or torchmetrics: pip install pytorch-msssim") from e


def ssim(x: torch.Tensor, y: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Per-image SSIM (RGB, Gaussian 11x11, sigma 1.5, data_range 255); returns ``(N,)``."""
    _check_pair(x, y)
    a, b = to_255(x, clamp), to_255(y, clamp)
    kind, mod = _backend()
    if kind == "msssim":
        return mod.ssim(a, b, data_range=255.0, size_average=False).float()
    return mod.structural_similarity_index_measure(a, b, data_range=255.0, reduction="none").float()


def ms_ssim(x: torch.Tensor, y: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Per-image MS-SSIM (5 scales, standard weights, data_range 255); returns ``(N,)``.

    Returns NaN for every image when a side is below :data:`MS_SSIM_MIN_SIZE` (161 px):
    MS-SSIM is undefined there, and padding or fewer scales would give numbers that cannot be
    compared with published ones. (The torchmetrics fallback needs >= 176 px.)
    """
    _check_pair(x, y)
    kind, mod = _backend()
    if min(x.shape[-2:]) < (MS_SSIM_MIN_SIZE if kind == "msssim" else 176):
        return torch.full((x.shape[0],), math.nan)
    a, b = to_255(x, clamp), to_255(y, clamp)
    if kind == "msssim":
        return mod.ms_ssim(a, b, data_range=255.0, size_average=False).float()
    return mod.multiscale_structural_similarity_index_measure(a, b, data_range=255.0, reduction="none").float()
