"""Quantizers by name, one calling convention, so recipes choose them from config.

>>> q = build_quantizer("fsq", latent_channels=16, bits_per_token=16)
>>> z_q, indices, aux = q(torch.randn(2, 16, 8, 8))      # doctest: +SKIP

``build_quantizer(name, latent_channels, bits_per_token=None, *, codebook_size=None,
codebook_dim=None, **kwargs)`` returns an ``nn.Module`` with

* ``q(z) -> (z_q, indices, aux_loss)`` on image latents;
* ``needs_posterior``: ``True`` for ``"gq"`` -- its input is the posterior, ``(B, 2C, H, W)``
  (mean || logvar) -- ``False`` for the baselines, which quantize a deterministic ``(B, C, H, W)``;
* ``codebook_size`` (entries per index) and ``bits_per_token`` (bits per latent position).

=============  ===========================  =================================  ==================
name           input                        indices                            aux_loss
=============  ===========================  =================================  ==================
gq             (B, 2C, H, W) posterior       (B, H, W, C/m) [#]_                TDC (train), 0 (eval)
vq / simvq     (B, C, H, W)                  (B, H, W)                          commitment
fsq            (B, C, H, W)                  (B, H, W)                          0
lfq / bsq      (B, C, H, W)                  (B, H, W)                          entropy (train)
tokenbridge    (B, C, H, W)                  (B, C, H, W) (per channel)         0
=============  ===========================  =================================  ==================

``z_q`` is always ``(B, C, H, W)``. .. [#] ``None`` in training unless ``search_in_train=True``.

Rate arguments: ``bits_per_token`` (default 16) or ``codebook_size``; for ``gq`` also
``codebook_dim`` (m, default C): ``K = 2 ** (bits_per_token * m / C)``; ``fsq`` takes ``levels=``
or picks the FSQ paper's levels for 8/10/12/14/16 bits; ``tokenbridge`` uses
``bits_per_token / C`` bits per channel (or ``bits=``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..quantizer import GaussianQuantizer

DEFAULT_BITS_PER_TOKEN = 16

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_quantizer(name: str, builder: Builder, overwrite: bool = False) -> None:
    """Register ``builder(latent_channels, bits_per_token, codebook_size, codebook_dim, **kwargs)``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"quantizer {name!r} is already registered")
    _REGISTRY[name] = builder


def available_quantizers() -> list[str]:
    return sorted(_REGISTRY)


def _int_log2(k: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2 or k & (k - 1):
        raise ValueError(f"{what} must be a power of two >= 2, got {k!r}")
    return k.bit_length() - 1


def _codebook_size(bits_per_token, codebook_size, per_token_indices: int = 1) -> int:
    if codebook_size is not None:
        return int(codebook_size)
    bits = DEFAULT_BITS_PER_TOKEN if bits_per_token is None else bits_per_token
    per = bits / per_token_indices
    if per != int(per) or per < 1:
        raise ValueError(f"bits_per_token={bits} must split into a whole number of bits over {per_token_indices} indices")
    return 2 ** int(per)


def _build_gq(latent_channels, bits_per_token=None, codebook_size=None, codebook_dim=None, **kwargs):
    m = latent_channels if codebook_dim is None else codebook_dim
    if latent_channels % m:
        raise ValueError(f"codebook_dim={m} must divide latent_channels={latent_channels}")
    K = _codebook_size(bits_per_token, codebook_size, latent_channels // m)
    kwargs.setdefault("accept_image_fmap", True)
    q = GaussianQuantizer(latent_channels, K, m, **kwargs)
    q.needs_posterior = True
    return q


def _build_vq(latent_channels, bits_per_token=None, codebook_size=None, codebook_dim=None, lookup_dim=None, **kwargs):
    """``lookup_dim``: VQ's low-dimensional lookup (vector-quantize-pytorch's ``codebook_dim``; a recipe's
    ``codebook_dim`` is GQ's m)."""
    from .baselines.vqp import VQBaseline

    dim = codebook_dim if lookup_dim is None else int(lookup_dim)
    return VQBaseline(latent_channels, _codebook_size(bits_per_token, codebook_size), codebook_dim=dim, **kwargs)


def _build_simvq(latent_channels, bits_per_token=None, codebook_size=None, codebook_dim=None, **kwargs):
    from .baselines.vqp import SimVQBaseline

    return SimVQBaseline(latent_channels, _codebook_size(bits_per_token, codebook_size), **kwargs)


def _build_fsq(latent_channels, bits_per_token=None, codebook_size=None, codebook_dim=None, levels=None, **kwargs):
    from .baselines.vqp import FSQ_LEVELS, FSQBaseline

    if levels is None:
        bits = bits_per_token if bits_per_token is not None else (
            _int_log2(codebook_size, "codebook_size") if codebook_size is not None else DEFAULT_BITS_PER_TOKEN)
        if bits not in FSQ_LEVELS:
            raise ValueError(f"no default FSQ levels for {bits} bits (have {sorted(FSQ_LEVELS)}); pass levels=[...]")
        levels = FSQ_LEVELS[bits]
    return FSQBaseline(latent_channels, levels, **kwargs)


def _build_lfq(latent_channels, bits_per_token=None, codebook_size=None, codebook_dim=None, spherical=False, **kwargs):
    from .baselines.vqp import LFQBaseline

    K = _codebook_size(bits_per_token, codebook_size)
    _int_log2(K, "codebook_size")
    return LFQBaseline(latent_channels, K, spherical=spherical, **kwargs)


def _build_bsq(latent_channels, bits_per_token=None, codebook_size=None, codebook_dim=None, **kwargs):
    kwargs.pop("spherical", None)
    return _build_lfq(latent_channels, bits_per_token, codebook_size, codebook_dim, spherical=True, **kwargs)


def _build_tokenbridge(latent_channels, bits_per_token=None, codebook_size=None, codebook_dim=None, bits=None, **kwargs):
    from .baselines.vqp import TokenBridgeBaseline

    if bits is None:
        if codebook_size is not None:
            bits = _int_log2(codebook_size, "codebook_size")
        elif bits_per_token is not None:
            per = bits_per_token / latent_channels
            if per != int(per):
                raise ValueError(f"tokenbridge: bits_per_token={bits_per_token} is not a multiple of latent_channels={latent_channels}")
            bits = int(per)
        else:
            bits = 6  # TokenBridge's default
    return TokenBridgeBaseline(latent_channels, bits=bits, **kwargs)


for _name, _builder in (("gq", _build_gq), ("vq", _build_vq), ("simvq", _build_simvq), ("fsq", _build_fsq), ("lfq", _build_lfq),
                        ("bsq", _build_bsq), ("tokenbridge", _build_tokenbridge)):
    register_quantizer(_name, _builder)


def build_quantizer(name: str, latent_channels: int, bits_per_token: float | None = None, *, codebook_size: int | None = None,
                    codebook_dim: int | None = None, **kwargs) -> nn.Module:
    """Build a quantizer by name (see the module docstring for the contract)."""
    builder = _REGISTRY.get(name)
    if builder is None:
        raise ValueError(f"unknown quantizer {name!r}; valid names: {available_quantizers()}")
    if isinstance(latent_channels, bool) or not isinstance(latent_channels, int) or latent_channels < 1:
        raise ValueError(f"latent_channels must be a positive int, got {latent_channels!r}")
    q = builder(latent_channels, bits_per_token=bits_per_token, codebook_size=codebook_size, codebook_dim=codebook_dim, **kwargs)
    if not hasattr(q, "needs_posterior"):
        q.needs_posterior = False
    return q


def needs_posterior(name: str) -> bool:
    """Whether quantizer ``name`` takes the ``2C``-channel posterior (only ``"gq"`` built in)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown quantizer {name!r}; valid names: {available_quantizers()}")
    return name == "gq"


__all__ = ["build_quantizer", "register_quantizer", "available_quantizers", "needs_posterior", "DEFAULT_BITS_PER_TOKEN"]

