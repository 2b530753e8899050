"""TokenBridge's post-training per-channel Gaussian quantizer, re-implemented as a baseline.

Re-derived from the published description (Wang et al., "Bridging Continuous and Discrete
Tokens for Autoregressive Visual Generation", ``reconstruction.py:post_training_quantize`` and
``TokenBridge._init_gaussian_quantization`` / ``quantize``):

* ``n = 2**bits`` levels (6 bits = 64 by default), the same table for every channel;
* bin edges = standard-normal quantiles ``Phi^-1(i / n)``, ``i = 0..n``, clamped to
  ``[-std_range, std_range]`` (3.0);
* reconstruction value of each bin = the mean of the standard normal truncated to the bin,
  ``(phi(a) - phi(b)) / (Phi(b) - Phi(a))``;
* an input ``x`` is mapped linearly from ``[quant_min, quant_max] = [-5, 5]`` onto
  ``[-std_range, std_range]``, clamped, assigned to the *nearest* reconstruction value, and the
  dequantised value is mapped back linearly.

TokenBridge applies it to VAE latents multiplied by 0.2325 (unit-variance normalisation). The
table is computed in float64 with torch (no scipy at runtime) and stored as float32 buffers
``reconstruction_values (n,)`` and ``boundaries (n + 1,)`` as in TokenBridge.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def tokenbridge_tables(bits: int = 6, std_range: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(boundaries (n+1,), reconstruction_values (n,))`` in float64, ``n = 2**bits``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an int in [1, 16], got {bits!r}")
    if not std_range > 0:
        raise ValueError(f"std_range must be > 0, got {std_range}")
    n = 2**bits
    probs = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    edges = torch.special.ndtri(probs).clamp(-std_range, std_range)  # ndtri(0) = -inf -> clamped
    a, b = edges[:-1], edges[1:]
    pdf = lambda t: torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    mass = torch.special.ndtr(b) - torch.special.ndtr(a)
    centres = (pdf(a) - pdf(b)) / mass.clamp_min(1e-300)
    return edges, centres


class TokenBridgeQuantizer(nn.Module):
    """Per-channel Gaussian-quantile scalar quantizer (TokenBridge).

    ``quantize(x) -> (indices, dequant)`` for any shape (TokenBridge uses ``(B, L, C)``); indices
    int64 in ``[0, 2**bits)``, ``dequant`` shaped like ``x``. ``dequantize(indices)`` is the exact
    inverse of the index step.
    """

    def __init__(self, bits: int = 6, quant_min: float = -5.0, quant_max: float = 5.0, std_range: float = 3.0) -> None:
        super().__init__()
        if not quant_max > quant_min:
            raise ValueError(f"quant_max must be > quant_min, got [{quant_min}, {quant_max}]")
        self.bits = bits
        self.quant_levels = 2**bits
        self.quant_min = float(quant_min)
        self.quant_max = float(quant_max)
        self.std_range = float(std_range)
        edges, centres = tokenbridge_tables(bits, std_range)
        self.register_buffer("boundaries", edges.float())
        self.register_buffer("reconstruction_values", centres.float())

    @property
    def codebook_size(self) -> int:
        return self.quant_levels

    def to_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Linear map ``[quant_min, quant_max] -> [-std_range, std_range]``."""
        return (x - self.quant_min) / (self.quant_max - self.quant_min) * (2 * self.std_range) - self.std_range

    def from_normalized(self, v: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_normalized`."""
        return (v + self.std_range) / (2 * self.std_range) * (self.quant_max - self.quant_min) + self.quant_min

    def values(self) -> torch.Tensor:
        """The ``n`` reconstruction values in input units."""
        return self.from_normalized(self.reconstruction_values)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xn = self.to_normalized(x.float()).clamp(-self.std_range, self.std_range)
        # nearest reconstruction value; the table is sorted, so bucketize on the midpoints
        # (no (..., n) distance tensor): ties go to the lower value, as argmin does
        r = self.reconstruction_values
        mids = (r[1:] + r[:-1]) / 2
        indices = torch.bucketize(xn.contiguous(), mids, right=False)
        return indices, self.values()[indices].to(x.dtype)

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        return self.values()[indices.long()]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantize(x)
