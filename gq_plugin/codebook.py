"""Seeded Gaussian codebooks and the channel-to-group maps.

A GQ codebook is never learned: it is ``K`` points in ``R^m`` drawn from the prior
``N(0, I)``, regenerated from ``(kind, seed, K, m)`` wherever the model is loaded. It is
generated on the CPU in float64 and cast at the end, so every device, OS and thread count
sees the same bits; a fingerprint (a hash of the float32 codebook) is stored in state dicts
so that a checkpoint trained against one codebook refuses to load against another.

Two kinds are offered:

* ``"sobol"`` (default, the authors' reference): ``K`` points of a scrambled Sobol sequence
  (``torch.quasirandom.SobolEngine(m, scramble=True, seed=seed)``, drawn in float32 as the
  reference does) pushed through the standard-normal inverse CDF. A quasi-random Gaussian
  codebook: every 1-D projection of ``2^n`` points is exactly stratified.
* ``"iid"``: i.i.d. standard-normal draws from a seeded CPU ``torch.Generator`` (the paper's
  description).

Grouping (which channels form one sub-codebook vector):

* ``"contiguous"``: group ``g`` owns channels ``g*m ... g*m+m-1``.
* ``"strided"``: group ``g`` owns channels ``g, g+G, g+2G, ...`` with ``G = C/m`` (the
  authors' repository layout).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict

import torch

CODEBOOK_KINDS = ("sobol", "iid")
GROUPINGS = ("contiguous", "strided")

# Uniforms are kept strictly inside (0, 1) so the inverse CDF stays finite.
_U_EPS = 2.0**-40


def check_codebook_args(codebook_size: int, codebook_dim: int, kind: str = "sobol") -> None:
    """Validate ``(K, m, kind)``; raise ``ValueError`` naming the bad argument."""
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int):
        raise ValueError(f"codebook_size must be an int, got {type(codebook_size).__name__}")
    if codebook_size < 2:
        raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
    if codebook_size > 2**31 - 1:
        raise ValueError(f"codebook_size must be < 2**31, got {codebook_size}")
    if isinstance(codebook_dim, bool) or not isinstance(codebook_dim, int) or codebook_dim < 1:
        raise ValueError(f"codebook_dim must be a positive int, got {codebook_dim!r}")
    if kind not in CODEBOOK_KINDS:
        raise ValueError(f"codebook must be one of {CODEBOOK_KINDS}, got {kind!r}")
    if kind == "sobol" and codebook_dim > torch.quasirandom.SobolEngine.MAXDIM:
        raise ValueError(
            f"codebook_dim={codebook_dim} exceeds the Sobol engine's maximum dimension "
            f"{torch.quasirandom.SobolEngine.MAXDIM}; use codebook='iid'"
        )
    if kind == "sobol" and codebook_size > 2**SOBOL_MAXBIT:
        raise ValueError(f"codebook_size={codebook_size} exceeds the Sobol engine's 2**{SOBOL_MAXBIT} points; use codebook='iid' or a smaller K")
    need, have = codebook_bytes(codebook_size, codebook_dim), memory_bytes()
    if have is not None and need > have:
        raise ValueError(
            f"codebook_size={codebook_size} x codebook_dim={codebook_dim} does not fit: building the codebook needs "
            f"{need / 2**30:.1f} GiB (float64 draw + float32 codebook + search features), this machine has {have / 2**30:.1f} GiB"
        )


SOBOL_MAXBIT = 30  # torch.quasirandom.SobolEngine draws at most 2**30 points
# bytes per codebook entry while a quantizer is built: the float64 draw (8), the float32 codebook
# (4) and its float32 search features [c^2, c] (8)
BYTES_PER_ENTRY = 20


def codebook_bytes(codebook_size: int, codebook_dim: int) -> int:
    """Peak bytes to build a ``(K, m)`` codebook and its search features."""
    return int(codebook_size) * int(codebook_dim) * BYTES_PER_ENTRY


def memory_bytes() -> int | None:
    """Physical memory of this machine in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def as_index_tensor(indices, name: str = "indices") -> torch.Tensor:
    """``indices`` as an int64 tensor: any integer dtype (uint16/32/64 included, which torch
    cannot reduce directly); ``ValueError`` for floats, bools, complex and non-tensors."""
    if not isinstance(indices, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {indices.dtype}")
    idx = indices.long()
    if indices.dtype == torch.uint64 and idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"{name} hold values >= 2**63 (uint64), far outside any codebook")
    return idx


# The float64 codebooks behind make_codebook are cached (the same (K, m, seed, kind) is asked for by
# every quantizer and every .to(dtype)), within a byte budget: least recently used ones go first,
# and one larger than the budget is never kept.
CACHE_BYTES = 256 * 2**20
_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _make_codebook_f64(codebook_size: int, codebook_dim: int, seed: int, kind: str) -> torch.Tensor:
    key = (codebook_size, codebook_dim, seed, kind)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    cb = _draw_codebook_f64(*key)
    size = cb.numel() * cb.element_size()
    with _CACHE_LOCK:
        if size <= CACHE_BYTES:
            _CACHE[key] = cb
            while sum(t.numel() * t.element_size() for t in _CACHE.values()) > CACHE_BYTES:
                _CACHE.popitem(last=False)
    return cb


def cache_bytes() -> int:
    """Bytes held by the float64 codebook cache (at most ``CACHE_BYTES``)."""
    with _CACHE_LOCK:
        return sum(t.numel() * t.element_size() for t in _CACHE.values())


def _draw_codebook_f64(codebook_size: int, codebook_dim: int, seed: int, kind: str) -> torch.Tensor:
    if kind == "sobol":
        engine = torch.quasirandom.SobolEngine(codebook_dim, scramble=True, seed=seed)
        u = engine.draw(codebook_size, dtype=torch.float32).to(torch.float64)
        u = u.clamp(_U_EPS, 1.0 - _U_EPS)
        cb = torch.special.ndtri(u)
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        cb = torch.randn(codebook_size, codebook_dim, generator=gen, dtype=torch.float64)
    cb.requires_grad_(False)
    return cb


def make_codebook(
    codebook_size: int,
    codebook_dim: int,
    seed: int = 42,
    kind: str = "sobol",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Return the ``(K, m)`` Gaussian codebook for ``(kind, seed, K, m)``.

    Deterministic: the same arguments give the same tensor in every process, on every
    device and with any thread count (it is generated on the CPU in float64).

    >>> cb = make_codebook(2**16, 16)
    >>> cb.shape
    torch.Size([65536, 16])
    """
    check_codebook_args(codebook_size, codebook_dim, kind)
    cb = _make_codebook_f64(codebook_size, codebook_dim, int(seed), kind)
    return cb.to(dtype=dtype, device=device, copy=True)


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """Hex SHA-256 (first 16 hex digits) of the codebook as little-endian float32 plus its shape."""
    cb = codebook.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(cb.shape)}".encode())
    h.update(cb.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()[:16]


def fingerprint_to_tensor(fingerprint: str) -> torch.Tensor:
    """Pack a 16-hex-digit fingerprint into an int64 tensor of shape (1,) (safetensors-friendly)."""
    value = int(fingerprint, 16)
    if value >= 2**63:
        value -= 2**64
    return torch.tensor([value], dtype=torch.int64)


def tensor_to_fingerprint(t: torch.Tensor) -> str:
    """Inverse of :func:`fingerprint_to_tensor`."""
    value = int(t.reshape(-1)[0].item())
    if value < 0:
        value += 2**64
    return f"{value:016x}"


# --------------------------------------------------------------------------- grouping maps


def check_grouping(num_channels: int, codebook_dim: int, grouping: str) -> int:
    """Validate the channel split and return the number of groups ``G = C / m``."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if num_channels % codebook_dim != 0:
        raise ValueError(
            f"codebook_dim={codebook_dim} must divide the number of latent channels "
            f"({num_channels}); valid codebook_dim values: {divisors(num_channels)}"
        )
    return num_channels // codebook_dim


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    return [d for d in range(1, n + 1) if n % d == 0]


def group_index_map(num_channels: int, codebook_dim: int, grouping: str = "contiguous") -> torch.Tensor:
    """``(G, m)`` long tensor: entry ``[g, j]`` is the channel holding coordinate ``j`` of group ``g``."""
    groups = check_grouping(num_channels, codebook_dim, grouping)
    g = torch.arange(groups).unsqueeze(1)
    j = torch.arange(codebook_dim).unsqueeze(0)
    if grouping == "contiguous":
        return g * codebook_dim + j
    return g + j * groups


def group_channels(x: torch.Tensor, codebook_dim: int, grouping: str = "contiguous") -> torch.Tensor:
    """Split the last (channel) axis ``C`` into ``(G, m)`` following ``grouping``.

    Returns a view when possible: ``(..., C) -> (..., G, m)``.
    """
    channels = x.shape[-1]
    groups = check_grouping(channels, codebook_dim, grouping)
    if grouping == "contiguous":
        return x.unflatten(-1, (groups, codebook_dim))
    return x.unflatten(-1, (codebook_dim, groups)).transpose(-1, -2)


def ungroup_channels(x: torch.Tensor, grouping: str = "contiguous") -> torch.Tensor:
    """Inverse of :func:`group_channels`: ``(..., G, m) -> (..., C)``."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if grouping == "contiguous":
        return x.flatten(-2)
    return x.transpose(-1, -2).flatten(-2)
