"""The ``torch`` search backend: tiled ``torch.mm`` + running argmax, on any device.

Never holds more than one ``tile_n x tile_k`` block of scores, so memory is bounded by the tile
size, not by ``N * K``. Ties go to the smallest index (an earlier tile keeps ties).
"""

from __future__ import annotations

import math

import torch

DEFAULT_TILE_N = 2048
DEFAULT_TILE_K = 8192


def argmax_ip_torch(w_all: torch.Tensor, f_all: torch.Tensor, tile_n: int = DEFAULT_TILE_N, tile_k: int = DEFAULT_TILE_K) -> torch.Tensor:
    """``argmax_k w_all[n] . f_all[k]`` for every row (float32, contiguous inputs)."""
    n_rows, k_total = w_all.shape[0], f_all.shape[0]
    out = torch.empty(n_rows, dtype=torch.long, device=w_all.device)
    f_t = f_all.t()
    tile_n = min(tile_n, n_rows)
    tile_k = min(tile_k, k_total)
    buf = torch.empty(tile_n, tile_k, dtype=torch.float32, device=w_all.device)
    for n0 in range(0, n_rows, tile_n):
        w = w_all[n0 : n0 + tile_n]
        n = w.shape[0]
        best_v = torch.full((n,), -math.inf, dtype=torch.float32, device=w.device)
        best_i = torch.zeros(n, dtype=torch.long, device=w.device)
        for k0 in range(0, k_total, tile_k):
            ft = f_t[:, k0 : k0 + tile_k]
            s = buf[:n, : ft.shape[1]]
            torch.mm(w, ft, out=s)
            v, i = s.max(dim=1)
            better = v > best_v  # strict: an earlier tile keeps ties
            best_v = torch.where(better, v, best_v)
            best_i = torch.where(better, i + k0, best_i)
        out[n0 : n0 + n] = best_i
    return out

