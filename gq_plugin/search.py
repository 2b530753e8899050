"""Gaussian Quant search: ``argmax_k  log N(c_k; mu, sigma^2) - beta * log N(c_k; 0, I)``.

Expanding the squares (DESIGN.md section 1), up to a per-row constant

    s(c) = sum_j  a_j c_j^2 + b_j c_j,   a_j = (beta - 1/sigma_j^2) / 2,  b_j = mu_j / sigma_j^2

so the search is ``argmax_k  W[n] . F[k]`` with row features ``W = [a, b]`` (N x 2m) and
codeword features ``F = [c^2, c]`` (K x 2m): a GEMM of inner size 2m fused with a running
argmax. Backends never hold more than one ``tile_n x tile_k`` block of scores, so memory is
bounded by the tile size, not by ``N * K``.

Backends (``GQ_SEARCH_BACKEND=torch|cpp|cuda`` forces one):

* ``torch``: tiled ``torch.mm`` + running max, any device.
* ``cpp`` / ``cuda``: the fused kernels in ``csrc/`` (see :mod:`gq_plugin.kernels`), used
  automatically when they are built and the inputs live on a matching device.

Everything runs in float32, also under ``torch.autocast``. Ties go to the smallest index
(as ``torch.argmax``). Because the GEMM form rounds differently from the direct log-density
formula, two codewords whose exact scores differ by less than float32 resolution of the
score (about ``1e-6 * |score|``) may be ordered differently from :func:`search_reference`.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable

import torch

from .rate import LOGVAR_RANGE

BackendFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]

DEFAULT_TILE_N = 2048
DEFAULT_TILE_K = 8192

_BACKENDS: dict[str, BackendFn] = {}
_AVAILABLE: dict[str, Callable[[torch.device], bool]] = {}


def register_backend(name: str, fn: BackendFn, available: Callable[[torch.device], bool]) -> None:
    """Register an ``argmax_inner_product`` backend.

    ``fn(W, F, tile_n, tile_k) -> LongTensor (N,)`` must return, for each row of the float32
    contiguous ``W`` (N x D), the smallest index ``k`` maximising ``W[n] . F[k]`` (F is K x D).
    ``available(device)`` says whether it can run on tensors living on ``device``.
    """
    _BACKENDS[name] = fn
    _AVAILABLE[name] = available


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (compiled ones are loaded lazily)."""
    _load_compiled_backends()
    device = torch.device(device)
    return [n for n, ok in _AVAILABLE.items() if ok(device)]


_COMPILED_TRIED = False


def _load_compiled_backends() -> None:
    global _COMPILED_TRIED
    if _COMPILED_TRIED:
        return
    _COMPILED_TRIED = True
    try:
        from . import kernels  # noqa: F401  (registers "cpp"/"cuda" when they build)
    except ImportError:
        pass


def select_backend(device: torch.device | str, backend: str | None = None) -> str:
    """Pick the backend: ``backend`` argument > ``GQ_SEARCH_BACKEND`` > fastest available."""
    device = torch.device(device)
    requested = backend or os.environ.get("GQ_SEARCH_BACKEND") or None
    if requested is not None:
        requested = requested.lower()
        if requested == "auto":
            requested = None
    _load_compiled_backends()
    if requested is not None:
        if requested not in _BACKENDS:
            raise ValueError(f"backend must be one of {sorted(_BACKENDS)} or 'auto', got {requested!r}")
        if not _AVAILABLE[requested](device):
            raise RuntimeError(f"search backend {requested!r} is not available for device {device}")
        return requested
    preferred = ("cuda", "torch") if device.type == "cuda" else ("cpp", "torch")
    for name in preferred:
        if name in _BACKENDS and _AVAILABLE[name](device):
            return name
    return "torch"


# --------------------------------------------------------------------------- features


def row_features(mean: torch.Tensor, logvar: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``W = [(beta - 1/sigma^2)/2, mu/sigma^2]``: (N, m) x 2 -> (N, 2m) float32."""
    mean = mean.float()
    inv_var = torch.exp(-logvar.float().clamp(*LOGVAR_RANGE))
    return torch.cat([0.5 * (beta - inv_var), mean * inv_var], dim=-1).contiguous()


def codebook_features(codebook: torch.Tensor) -> torch.Tensor:
    """``F = [c^2, c]``: (K, m) -> (K, 2m) float32."""
    c = codebook.float()
    return torch.cat([c.square(), c], dim=-1).contiguous()


# --------------------------------------------------------------------------- torch backend


def _argmax_ip_torch(w_all: torch.Tensor, f_all: torch.Tensor, tile_n: int, tile_k: int) -> torch.Tensor:
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


register_backend("torch", _argmax_ip_torch, lambda device: True)


# --------------------------------------------------------------------------- public API


def argmax_inner_product(
    w: torch.Tensor,
    f: torch.Tensor,
    backend: str | None = None,
    tile_n: int = DEFAULT_TILE_N,
    tile_k: int = DEFAULT_TILE_K,
) -> torch.Tensor:
    """``argmax_k w[n] . f[k]`` for every row n, without an N x K buffer (float32)."""
    if w.ndim != 2 or f.ndim != 2 or w.shape[1] != f.shape[1]:
        raise ValueError(f"w must be (N, D) and f (K, D), got {tuple(w.shape)} and {tuple(f.shape)}")
    if f.shape[0] < 1:
        raise ValueError("f must have at least one row")
    if tile_n < 1 or tile_k < 1:
        raise ValueError(f"tile_n and tile_k must be positive, got {tile_n}, {tile_k}")
    if w.device != f.device:
        raise ValueError(f"w and f must be on the same device, got {w.device} and {f.device}")
    if w.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=w.device)
    name = select_backend(w.device, backend)
    with torch.autocast(device_type=w.device.type, enabled=False):
        return _BACKENDS[name](w.float().contiguous(), f.float().contiguous(), int(tile_n), int(tile_k))


def gq_search(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 1.0,
    backend: str | None = None,
    features: torch.Tensor | None = None,
    tile_n: int = DEFAULT_TILE_N,
    tile_k: int = DEFAULT_TILE_K,
) -> torch.Tensor:
    """Indices (int64, shape (N,)) of the GQ codeword for each posterior row.

    ``mean`` and ``logvar`` are (N, m); ``codebook`` is (K, m). ``features`` may pass a
    precomputed :func:`codebook_features` of the codebook.
    """
    if mean.ndim != 2 or mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must both be (N, m), got {tuple(mean.shape)} and {tuple(logvar.shape)}")
    if codebook.ndim != 2 or codebook.shape[1] != mean.shape[1]:
        raise ValueError(f"codebook must be (K, {mean.shape[1]}), got {tuple(codebook.shape)}")
    with torch.autocast(device_type=mean.device.type, enabled=False):
        w = row_features(mean, logvar, beta)
        f = codebook_features(codebook) if features is None else features
        return argmax_inner_product(w, f.to(w.device), backend=backend, tile_n=tile_n, tile_k=tile_k)


# --------------------------------------------------------------------------- slow reference


def reference_scores(
    mean: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor, beta: float = 1.0, chunk: int = 256
) -> torch.Tensor:
    """Exact scores ``log N(c; mu, sigma^2) - beta log N(c; 0, I)`` in float64, (N, K).

    The direct log-density formula, materialising (chunk, K, m): slow and memory hungry.
    For tests and benchmarks only.
    """
    mu = mean.detach().double()
    lv = logvar.detach().double().clamp(*LOGVAR_RANGE)
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
    mean: torch.Tensor, logvar: torch.Tensor, codebook: torch.Tensor, beta: float = 1.0, chunk: int = 256
) -> torch.Tensor:
    """Slow exact (float64) GQ search by the direct formula; for tests and benchmarks only."""
    return reference_scores(mean, logvar, codebook, beta, chunk).argmax(dim=1)


def warn_fallback(reason: str) -> None:
    """One-line warning used when a compiled backend cannot be used."""
    warnings.warn(f"gq_plugin: falling back to the torch search backend ({reason})", RuntimeWarning, stacklevel=3)
