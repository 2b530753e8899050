"""Gaussian Quant search: ``argmax_k  log N(c_k; mu, sigma^2) - beta * log N(c_k; 0, I)``.

Expanding the squares (the data path in docs/design.md, section 1), up to a per-row constant

    s(c) = sum_j  a_j c_j^2 + b_j c_j,   a_j = (beta - 1/sigma_j^2) / 2,  b_j = mu_j / sigma_j^2

so the search is ``argmax_k  W[n] . F[k]`` with row features ``W = [a, b]`` (N x 2m) and
codeword features ``F = [c^2, c]`` (K x 2m): a GEMM of inner size 2m fused with a running
argmax. Backends never hold more than one ``tile_n x tile_k`` block of scores, so memory is
bounded by the tile size, not by ``N * K``.

Backends (``GQ_SEARCH_BACKEND=torch|cpp|cuda`` forces one):

* ``torch``: tiled ``torch.mm`` + running max, any device.
* ``cpp`` / ``cuda``: the fused kernels in ``csrc/`` (see :mod:`gq_plugin.search.kernels`), used
  automatically when they are built, have passed their first-use self-check on the device
  (:mod:`gq_plugin.search.selfcheck`; ``GQ_KERNELS_SELF_CHECK=0`` skips it) and the inputs live
  on a matching device.

Everything runs in float32, also under ``torch.autocast``. Ties go to the smallest index
(as ``torch.argmax``). Because the GEMM form rounds differently from the direct log-density
formula, two codewords whose exact scores differ by less than float32 resolution of the
score (about ``1e-6 * |score|``) may be ordered differently from :func:`search_reference`.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch

from ..rate import LOGVAR_RANGE
from .features import codebook_features, row_features
from .reference import compare_with_reference, reference_scores, search_reference
from .selfcheck import SelfCheckResult, forget, verdict
from .torch_backend import DEFAULT_TILE_K, DEFAULT_TILE_N, argmax_ip_torch

__all__ = [
    "DEFAULT_TILE_K",
    "DEFAULT_TILE_N",
    "argmax_inner_product",
    "available_backends",
    "backend_names",
    "codebook_features",
    "compare_with_reference",
    "gq_search",
    "reference_scores",
    "register_backend",
    "row_features",
    "search_reference",
    "select_backend",
    "verify_backend",
]

BackendFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def _kernel(attr: str):
    """A compiled-kernel entry of :mod:`.kernels`, imported on first use (the leaf module never
    imports this package back)."""

    def call(*args):
        from . import kernels

        return getattr(kernels, attr)(*args)

    call.__name__ = attr
    return call


# The backend table, in one place: name -> (fn(W, F, tile_n, tile_k) -> (N,) int64, available(device)).
_BACKENDS: dict[str, BackendFn] = {"torch": argmax_ip_torch, "cpp": _kernel("argmax_ip_cpu"), "cuda": _kernel("argmax_ip_cuda")}
_AVAILABLE: dict[str, Callable[[torch.device], bool]] = {
    "torch": lambda device: True,
    "cpp": _kernel("cpu_available"),
    "cuda": _kernel("cuda_available"),
}
# Preference order per device type: the first available one wins.
PREFERENCE = {"cuda": ("cuda", "torch"), "cpu": ("cpp", "torch")}
# The fused CUDA kernel holds a row's features in registers: rows wider than this use the torch backend.
CUDA_MAX_FEATURES = 64
# Compiled backends serve only after passing the first-use self-check on the device (selfcheck.py):
# name -> the widest rows (features) it takes, None = any.
_SELF_CHECKED: dict[str, int | None] = {"cpp": None, "cuda": CUDA_MAX_FEATURES}


def register_backend(
    name: str, fn: BackendFn, available: Callable[[torch.device], bool], self_check: bool = False,
    max_features: int | None = None,
) -> None:
    """Register an ``argmax_inner_product`` backend.

    ``fn(W, F, tile_n, tile_k) -> LongTensor (N,)`` must return, for each row of the float32
    contiguous ``W`` (N x D), the smallest index ``k`` maximising ``W[n] . F[k]`` (F is K x D).
    ``available(device)`` says whether it can run on tensors living on ``device``.
    ``self_check=True`` (for compiled code) makes it pass the first-use self-check
    (:mod:`gq_plugin.search.selfcheck`) on rows up to ``max_features`` wide (None: any width)
    before it serves a search on a device.
    """
    _BACKENDS[name] = fn
    _AVAILABLE[name] = available
    _SELF_CHECKED.pop(name, None)
    forget(name)
    if self_check:
        _SELF_CHECKED[name] = max_features


def verify_backend(name: str, device: torch.device | str) -> SelfCheckResult:
    """The self-check verdict on backend ``name`` for ``device``: run once per process and device
    (the first search that could use the kernel runs it too), then cached. A failing kernel is
    disabled for the process with one ``RuntimeWarning`` naming it and the failing case. Backends
    without a self-check (``torch``) pass with ``cases == 0``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when the backend cannot run on
    ``device`` (not built).
    """
    device = torch.device(device)
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {name!r}")
    if not _AVAILABLE[name](device):
        raise RuntimeError(f"search backend {name!r} is not available for device {device}")
    if name not in _SELF_CHECKED:
        return SelfCheckResult(name, str(device), True, 0, 0.0)
    from .kernels import warn_fallback

    return verdict(name, _BACKENDS[name], device, _SELF_CHECKED[name], warn_fallback)


def _usable(name: str, device: torch.device) -> bool:
    """Built for ``device`` and, for a compiled backend, trusted by its self-check there."""
    return _AVAILABLE[name](device) and (name not in _SELF_CHECKED or verify_backend(name, device).passed)


def backend_names() -> list[str]:
    """Every registered backend name (available on this machine or not)."""
    return sorted(_BACKENDS)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (compiled ones are built and self-checked
    on first ask; one that failed its self-check is not listed)."""
    device = torch.device(device)
    return [n for n in _BACKENDS if _usable(n, device)]


def select_backend(device: torch.device | str, backend: str | None = None) -> str:
    """Pick the backend: ``backend`` argument > ``GQ_SEARCH_BACKEND`` > fastest available.

    A compiled backend is chosen only once it has passed its self-check on ``device``; forcing one
    that failed it raises ``RuntimeError`` (automatic selection falls back to the next one).
    """
    device = torch.device(device)
    requested = backend or os.environ.get("GQ_SEARCH_BACKEND") or None
    if requested is not None:
        requested = requested.lower()
        if requested == "auto":
            requested = None
    if requested is not None:
        if requested not in _BACKENDS:
            raise ValueError(f"backend must be one of {sorted(_BACKENDS)} or 'auto', got {requested!r}")
        if not _AVAILABLE[requested](device):
            raise RuntimeError(f"search backend {requested!r} is not available for device {device}")
        check = verify_backend(requested, device)
        if not check.passed:
            raise RuntimeError(f"search backend {requested!r} failed its self-check on {check.device} ({check.failure})")
        return requested
    for name in PREFERENCE.get(device.type, ("torch",)):
        if name in _BACKENDS and _usable(name, device):
            return name
    return "torch"


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
    if name == "cuda" and w.shape[1] > CUDA_MAX_FEATURES:
        name = "torch"
    with torch.autocast(device_type=w.device.type, enabled=False):
        return _BACKENDS[name](w.float().contiguous(), f.float().contiguous(), int(tile_n), int(tile_k))


# Scores are sums of 2m products |w| * |f|: with max|w| * max|f| * 2m below this bound no float32
# partial sum can overflow (float32 max is about 2**128).
_SCORE_BOUND = 2.0**120


def _pow2_scale(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Multiply by ``2**-e`` (exact: only the exponent changes) so that ``max|x| < 1`` (per row
    when ``dim`` is given); the argmax of inner products is unchanged by a positive scale."""
    amax = x.abs().amax(dim=dim, keepdim=dim is not None) if dim is not None else x.abs().max()
    _, e = torch.frexp(amax)
    return torch.ldexp(x, -e.to(x.dtype))


def gq_search(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 1.0,
    backend: str | None = None,
    features: torch.Tensor | None = None,
    tile_n: int = DEFAULT_TILE_N,
    tile_k: int = DEFAULT_TILE_K,
    logvar_range: tuple[float, float] = LOGVAR_RANGE,
) -> torch.Tensor:
    """Indices (int64, shape (N,)) of the GQ codeword for each posterior row.

    ``mean`` and ``logvar`` are (N, m) floating-point tensors; ``codebook`` is (K, m).
    ``features`` may pass a precomputed :func:`codebook_features` of the codebook; ``logvar`` is
    clamped to ``logvar_range``.

    Validated with one host sync per call: NaN/inf in ``mean`` or ``logvar`` (before the clamp)
    or a non-finite ``beta`` raise ``ValueError``. Huge but finite inputs (e.g. ``|mean| >= 1e25``
    at ``logvar = -30``), whose scores would overflow float32, are searched with features
    recomputed in float64 and rescaled by powers of two (the argmax is scale-invariant), so the
    result stays exact; inputs whose features overflow even float64 raise ``ValueError``.
    """
    if not isinstance(mean, torch.Tensor) or not isinstance(logvar, torch.Tensor):
        raise ValueError(f"mean and logvar must be tensors, got {type(mean).__name__} and {type(logvar).__name__}")
    if mean.ndim != 2 or mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must both be (N, m), got {tuple(mean.shape)} and {tuple(logvar.shape)}")
    for name, t in (("mean", mean), ("logvar", logvar)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if codebook.ndim != 2 or codebook.shape[1] != mean.shape[1]:
        raise ValueError(f"codebook must be (K, {mean.shape[1]}), got {tuple(codebook.shape)}")
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a finite number, got {beta!r}") from None
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
    with torch.autocast(device_type=mean.device.type, enabled=False):
        w = row_features(mean, logvar, beta, logvar_range)
        f = (codebook_features(codebook) if features is None else features).to(w.device)
        if w.shape[0] == 0 or f.shape[0] == 0:
            return argmax_inner_product(w, f, backend=backend, tile_n=tile_n, tile_k=tile_k)
        # the one check: finiteness of the inputs and the size of the features, one host sync
        stats = torch.stack([
            torch.isfinite(mean).all().to(torch.float64), torch.isfinite(logvar).all().to(torch.float64),
            w.abs().max().to(torch.float64), f.abs().max().to(torch.float64),
        ]).tolist()
        if stats[0] != 1.0:
            raise ValueError("mean contains non-finite values (NaN or inf)")
        if stats[1] != 1.0:
            raise ValueError("logvar contains non-finite values (NaN or inf)")
        width = w.shape[1]
        if not math.isfinite(stats[3]):
            raise ValueError("codebook contains non-finite values (or its squares overflow float32)")
        if not stats[3] * width < _SCORE_BOUND:
            f = _pow2_scale(codebook_features(codebook.to(w.device), torch.float64) if features is None else f.double()).float()
            stats[3] = 1.0
        if not stats[2] * stats[3] * width < _SCORE_BOUND:  # float32 scores would overflow: rescale rows
            w64 = row_features(mean, logvar, beta, logvar_range, dtype=torch.float64)
            if not bool(torch.isfinite(w64).all()):
                raise ValueError(
                    f"mean/logvar too large: the GQ features mu/sigma^2 overflow float64 (|mean| up to {float(mean.abs().max()):.3g})"
                )
            w = _pow2_scale(w64, dim=1).float()
        return argmax_inner_product(w, f, backend=backend, tile_n=tile_n, tile_k=tile_k)
