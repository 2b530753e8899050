"""The slow exact GQ search by the direct log-density formula, in float64 (tests and benchmarks only)."""

from __future__ import annotations

import math

import torch

from ..rate import LOGVAR_RANGE
from .features import codebook_features, row_features


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


def compare_with_reference(
    idx: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 1.0,
    rel_tol: float = 1e-5,
    ref_scores: torch.Tensor | None = None,
    rows_per_chunk: int = 64,
    logvar_range: tuple[float, float] = LOGVAR_RANGE,
) -> dict:
    """Check search indices against the float64 reference, allowing only float32 near-ties.

    A row's index may differ from the float64 argmax ``i`` only when its float64 score is within
    ``rel_tol * scale`` of the best, ``scale = max over the two codewords of sum_j |W_nj F_kj|``
    (``W = [(beta - 1/sigma^2)/2, mu/sigma^2]``, ``F = [c^2, c]``: the magnitude float32 rounding of
    the GEMM form works on). ``ref_scores`` may pass precomputed :func:`reference_scores` (N, K);
    otherwise they are computed ``rows_per_chunk`` rows at a time on ``mean``'s device.

    Returns ``{"rows", "equal", "near_ties", "wrong", "max_rel_gap"}``: ``wrong`` counts rows whose
    index is out of range or loses by more than the tolerance; ``max_rel_gap`` is the largest
    ``gap / scale`` over the differing rows (0.0 when all agree).
    """
    if mean.ndim != 2 or mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must both be (N, m), got {tuple(mean.shape)} and {tuple(logvar.shape)}")
    if codebook.ndim != 2 or codebook.shape[1] != mean.shape[1]:
        raise ValueError(f"codebook must be (K, {mean.shape[1]}), got {tuple(codebook.shape)}")
    n, k = mean.shape[0], codebook.shape[0]
    idx = idx.detach().flatten().long().to(mean.device)
    if idx.shape[0] != n:
        raise ValueError(f"idx must hold one index per row ({n}), got shape {tuple(idx.shape)}")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be positive, got {rows_per_chunk}")
    cb = codebook.detach().double().to(mean.device)
    f_abs = codebook_features(cb, torch.float64).abs()  # (K, 2m)
    out = {"rows": n, "equal": 0, "near_ties": 0, "wrong": 0, "max_rel_gap": 0.0}
    for s in range(0, n, rows_per_chunk):
        mu, lv = mean[s : s + rows_per_chunk].detach().double(), logvar[s : s + rows_per_chunk].detach().double()
        if ref_scores is None:
            scores = reference_scores(mu, lv, cb, beta, chunk=8, logvar_range=logvar_range)
        else:
            scores = ref_scores[s : s + rows_per_chunk].to(mean.device, torch.float64)
        got = idx[s : s + rows_per_chunk]
        best = scores.argmax(dim=1)
        in_range = (got >= 0) & (got < k)
        same = in_range & (got == best)
        safe = got.clamp(0, k - 1)
        rows = torch.arange(got.shape[0], device=mean.device)
        gap = scores[rows, best] - scores[rows, safe]
        w_abs = row_features(mu, lv, beta, logvar_range, torch.float64).abs()
        scale = torch.maximum((w_abs * f_abs[best]).sum(-1), (w_abs * f_abs[safe]).sum(-1)).clamp_min(1e-300)
        rel = torch.where(same, torch.zeros_like(gap), gap / scale)
        tie = in_range & ~same & (rel <= rel_tol)
        out["equal"] += int(same.sum())
        out["near_ties"] += int(tie.sum())
        out["wrong"] += int((~same & ~tie).sum())
        diff = ~same
        if bool(diff.any()):
            worst = float("inf") if bool((diff & ~in_range).any()) else float(rel[diff].max())
            out["max_rel_gap"] = max(out["max_rel_gap"], worst)
    return out
