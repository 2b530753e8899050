"""The GQ search's features, in one place: ``score(c) = W . F`` up to a per-row constant, with
row features ``W = [(beta - 1/sigma^2)/2, mu/sigma^2]`` and codeword features ``F = [c^2, c]``."""

from __future__ import annotations

import torch

from ..rate import LOGVAR_RANGE


def row_features(
    mean: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0, logvar_range: tuple[float, float] = LOGVAR_RANGE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``W = [(beta - 1/sigma^2)/2, mu/sigma^2]``: (N, m) x 2 -> (N, 2m), float32 by default
    (``logvar`` clamped to ``logvar_range``)."""
    mean = mean.to(dtype)
    inv_var = torch.exp(-logvar.to(dtype).clamp(*logvar_range))
    return torch.cat([0.5 * (beta - inv_var), mean * inv_var], dim=-1).contiguous()


def codebook_features(codebook: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``F = [c^2, c]``: (K, m) -> (K, 2m), float32 by default."""
    c = codebook.to(dtype)
    return torch.cat([c.square(), c], dim=-1).contiguous()
