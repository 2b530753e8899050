"""TokenBridge adapter: put GQ where TokenBridge's per-channel post-training quantizer was.

TokenBridge (YuqingWang1029/TokenBridge, ``models/tokenbridge.py``) quantizes the normalised VAE
latents (``posterior.sample() * 0.2325``, patchified to ``(B, L, C)``) with
``TokenBridge.quantize(x) -> (indices (B, L, C), dequant (B, L, C))`` and, when sampling, maps
tokens back with ``reconstruction_values[tokens]`` followed by the linear ``[-std, std] ->
[quant_min, quant_max]`` rescale (two sites in ``sample_tokens``).
:func:`swap_tokenbridge_quantizer` replaces both:

* ``model.quantize(x, logvar=None)`` becomes GQ. GQ needs the posterior, so ``x`` must carry
  ``2 * C`` channels: the normalised mean (``mean * scale``) then the raw log-variance -- build the
  model input with :func:`tokenbridge_gq_inputs` (``(B, 2C, h, w)``; TokenBridge's ``patchify``
  keeps the two halves apart) -- or pass ``logvar`` explicitly. The GQ search runs on the raw
  posterior (``mean = x / scale``), where the codebook N(0, I) lives; the dequantised values are
  returned in TokenBridge's normalised units (``z_hat * scale``).
* ``m = 1`` (like-for-like, default ``K = model.quant_levels``): indices keep TokenBridge's
  ``(B, L, C)`` layout and the AR head is unchanged. ``model.reconstruction_values`` is overwritten
  so that the unchanged ``reconstruction_values[tokens]`` + rescale lookups in ``sample_tokens``
  return the GQ codewords (``boundaries`` is left as is; TokenBridge only uses it at init).
* ``m > 1``: indices are ``(B, L, C/m)`` over a ``K``-entry codebook; TokenBridge's channel AR
  head (``vae_embed_dim`` steps of ``quant_levels`` classes, ``channel_order``) must be rebuilt for
  ``C/m`` steps of ``K`` classes -- a model change this adapter does not make. Decode tokens with
  ``model.dequantize_tokens(indices)`` instead of the ``reconstruction_values`` lookups.

Note: GQ is nearly lossless only when each group's rate is <= log2 K bits; MAR's KL-16 VAE has
raw latents with std ~ 1/0.2325, far above 6 bits per channel, so fine-tune the VAE with TDC first.
"""

from __future__ import annotations

import warnings

import torch

from ..quantizer import GaussianQuantizer
from . import _patch

TOKENBRIDGE_SCALE = 0.2325


def tokenbridge_gq_inputs(posterior=None, *, mean: torch.Tensor | None = None, logvar: torch.Tensor | None = None,
                          scale: float = TOKENBRIDGE_SCALE) -> torch.Tensor:
    """``cat([mean * scale, logvar], dim=1)``: the ``(B, 2C, h, w)`` input of a swapped TokenBridge
    (instead of ``posterior.sample() * scale``)."""
    if posterior is not None:
        mean, logvar = posterior.mean, posterior.logvar
    if mean is None or logvar is None:
        raise ValueError("pass a posterior (with .mean/.logvar) or mean= and logvar=")
    return torch.cat([mean * scale, logvar], dim=1)


def _token_dim(model) -> int:
    for attr in ("token_embed_dim", "vae_embed_dim"):
        v = getattr(model, attr, None)
        if isinstance(v, int):
            return v
    raise ValueError("not a TokenBridge-like model: needs token_embed_dim or vae_embed_dim")


def quantize(self, x: torch.Tensor, logvar: torch.Tensor | None = None):
    """GQ replacement of ``TokenBridge.quantize``: ``(indices, dequant)``."""
    st = _patch.data(self)
    scale = st["scale"]
    c = st["token_dim"]
    if logvar is None:
        if x.shape[-1] != 2 * c:
            raise ValueError(
                f"GQ-swapped TokenBridge.quantize needs the posterior: x with 2*C={2 * c} channels "
                f"(normalised mean || logvar, see tokenbridge_gq_inputs) or logvar=, got {tuple(x.shape)}"
            )
        mean_n, logvar = x.chunk(2, dim=-1)
    else:
        mean_n = x
    z_hat, idx = self.gq_quantizer.quantize(mean_n / scale, logvar)
    return idx, z_hat * scale


def dequantize_tokens(self, indices: torch.Tensor) -> torch.Tensor:
    """Tokens ``(B, L, C/m)`` -> values in TokenBridge's normalised units ``(B, L, C)``."""
    return self.gq_quantizer.dequant(indices) * _patch.data(self)["scale"]


def swap_tokenbridge_quantizer(model, gq: GaussianQuantizer | None = None, *, K: int | None = None, m: int = 1,
                               scale: float = TOKENBRIDGE_SCALE, **gq_kwargs):
    """Replace TokenBridge's quantizer by GQ in place (see the module docstring).

    Args:
        model: a ``TokenBridge`` (or an object with its attributes: ``quantize``,
            ``reconstruction_values``, ``quant_levels``, ``quant_min``, ``quant_max``,
            ``std_range``, ``vae_embed_dim``/``token_embed_dim``).
        gq: a ready :class:`~gq_plugin.GaussianQuantizer` over ``C`` channels (sequence layout);
            otherwise one is built from ``K`` (default ``model.quant_levels``), ``m`` and ``gq_kwargs``.
        scale: TokenBridge's latent normaliser (0.2325 for MAR's KL-16 VAE).
    """
    if not hasattr(model, "quantize"):
        raise ValueError("not a TokenBridge-like model: no quantize method")
    c = _token_dim(model)
    if gq is None:
        K = K if K is not None else int(model.quant_levels)
        _patch.check_codebook_dim(c, m)
        gq = GaussianQuantizer(c, K, m, channel_last=True, **gq_kwargs)
    else:
        if gq_kwargs or K is not None:
            raise ValueError("pass either gq= or K/m/gq_kwargs, not both")
        if gq.dim != c or gq.accept_image_fmap or not gq.channel_last:
            raise ValueError(f"gq must be a sequence-layout GaussianQuantizer(dim={c}, channel_last=True)")
    ref = getattr(model, "reconstruction_values", None)
    if isinstance(ref, torch.Tensor):
        gq = gq.to(ref.device)
    attrs = {_patch.QUANTIZER_ATTR: gq}
    if gq.codebook_dim == 1:
        if gq.codebook_size != getattr(model, "quant_levels", gq.codebook_size):
            warnings.warn(
                f"K={gq.codebook_size} differs from the model's quant_levels={model.quant_levels}: rebuild the AR head's classes",
                stacklevel=2,
            )
        table = gq.codebook[:, 0] * scale  # values in normalised units
        std = float(model.std_range)
        lo, hi = float(model.quant_min), float(model.quant_max)
        # inverse of TokenBridge's lookup rescale, so reconstruction_values[tokens] -> rescale == table[tokens]
        attrs["reconstruction_values"] = ((table - lo) / (hi - lo) * (2 * std) - std).to(
            ref.dtype if isinstance(ref, torch.Tensor) else torch.float32
        )
    else:
        warnings.warn(
            f"m={gq.codebook_dim} > 1: tokens are (B, L, {gq.num_codebooks}) over {gq.codebook_size} codes; rebuild the "
            "channel-AR head for that and use model.dequantize_tokens instead of reconstruction_values lookups",
            stacklevel=2,
        )
    _patch.install(model, "tokenbridge", methods={"quantize": quantize, "dequantize_tokens": dequantize_tokens}, attrs=attrs,
                   data={"scale": float(scale), "token_dim": c})
    return model


def unswap_tokenbridge_quantizer(model):
    """Undo :func:`swap_tokenbridge_quantizer` (``quantize`` and ``reconstruction_values`` come
    back); returns the removed quantizer."""
    return _patch.uninstall(model, "tokenbridge")
