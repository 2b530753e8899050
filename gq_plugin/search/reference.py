"""The slow exact GQ search by the direct log-density formula, in float64 (tests and benchmarks only)."""

from __future__ import annotations

import math

import torch

from ..rate import LOGVAR_RANGE


def reference_scores(
    mean: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor, beta: float = 1.0, chunk: int = 256,
    logvar_range: tuple[float, float] = LOGVAR_RANGE,
) -> torch.Tensor:
    """Exact scores ``log N(c; mu, sigma^2) - beta log N(c; 0, I)`` in float64, (N, K).

    The direct log-density formula, materialising (chunk, K, m): slow and memory hungry.
    For tests and benchmarks only.
    """
    mu = mean.detach().double()
    lv = logvar.detach().double().clamp(*logvar_range)
    cb = codebook.detach().double().to(mu.device)
    log2pi = math.log(2 * math.pi)
    prior = (-0.5 * (cb.square() + log2pi)).sum(-1)  # (K,)
    out = torch.empty(mu.shape[0], cb.shape[0], dtype=torch.float64, device=mu.device)
    for s in range(0, mu.shape[0], chunk):
        m_, l_ = mu[s : s + chunk, None, :], lv[s : s + chunk, None, :]
        logq = -0.5 * ((cb[None] - m_).square() * torch.exp(-l_) + l_ + log2pi)
        out[s : s + chunk] = logq.sum(-1) - beta * prior
    return out


def search_reference(
    mean: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor, beta: float = 1.0, chunk: int = 256,
    logvar_range: tuple[float, float] = LOGVAR_RANGE,
) -> torch.Tensor:
    """Slow exact (float64) GQ search by the direct formula; for tests and benchmarks only."""
    return reference_scores(mean, logvar, codebook, beta, chunk, logvar_range).argmax(dim=1)
