"""Codebook statistics and bit-rate helpers for evaluation tables.

* usage: fraction of the K codes hit at least once,
* entropy (bits) of the empirical code distribution, and perplexity ``2 ** entropy``
  (K for a perfectly uniform code distribution, 1 when a single code is used),
* nominal bpp ``n_codebooks * log2 K / pixels_per_token`` (what the token grid can carry),
* real bpp ``8 * bytes / pixels`` of an actual bit-stream (e.g. entropy-coded indices).
"""

from __future__ import annotations

import math

import torch

from ...quantizer import codebook_usage
from ...rate import bits_per_pixel, real_bpp

__all__ = ["codebook_stats", "entropy_bpp", "nominal_bpp", "real_bpp"]


def codebook_stats(indices: torch.Tensor, codebook_size: int, prefix: str = "") -> dict[str, float]:
    """``{usage, used, entropy_bits, perplexity}`` of an integer index tensor of any shape.

    All sub-codebooks are pooled (GQ shares one codebook across groups).

    >>> codebook_stats(torch.arange(16), 16)["perplexity"]
    16.0
    """
    stats = codebook_usage(indices, codebook_size).as_dict()
    return {f"{prefix}{k}": float(v) for k, v in stats.items()}


def nominal_bpp(n_codebooks: int, codebook_size: int, pixels_per_token: int) -> float:
    """Nominal bits per pixel of a token grid: ``n_codebooks * log2 K / pixels_per_token``.

    >>> nominal_bpp(1, 2**16, 64)   # SD3 VAE (f8), m=16, K=2^16
    0.25
    """
    return bits_per_pixel(n_codebooks, codebook_size, pixels_per_token)


def entropy_bpp(indices: torch.Tensor, codebook_size: int, n_codebooks: int, pixels_per_token: int) -> float:
    """Bits per pixel an ideal i.i.d. entropy coder would reach on these indices.

    ``n_codebooks * H(indices) / pixels_per_token`` with H the empirical entropy in bits;
    a lower bound for :func:`real_bpp` of a memoryless code.
    """
    h = codebook_usage(indices, codebook_size).entropy_bits
    return n_codebooks * h / pixels_per_token if pixels_per_token > 0 else math.nan
