"""CompVis ``ldm`` adapter (latent-diffusion / stable-diffusion ``AutoencoderKL``).

``ldm`` is not pip-installable, so this adapter is written against its published interface
(``ldm/models/autoencoder.py``): a model with ``encoder``, ``quant_conv`` (2*z_channels ->
2*embed_dim), ``post_quant_conv``, ``decoder``, ``encode(x) -> DiagonalGaussianDistribution``
and ``decode(z)``. It is tested against a minimal stand-in written to that interface.

After :func:`patch_ldm_autoencoder` the model's ``encode`` returns a
:class:`~gq_plugin.adapters._posterior.GQDiagonalGaussian` (same attributes and methods as ldm's
``DiagonalGaussianDistribution``: ``mean, logvar, std, var, parameters, sample(), mode(), kl(),
nll()``), so ``forward(input, sample_posterior=True) -> (dec, posterior)`` and
``LPIPSWithDiscriminator``, which adds ``kl_weight * sum(posteriors.kl()) / B``, pick up the TDC
loss unchanged. In eval ``sample()``/``mode()`` return the GQ latent.
"""

from __future__ import annotations

import torch

from ..quantizer import GaussianQuantizer
from . import _patch
from ._posterior import GQDiagonalGaussian, from_host_layout, to_host_layout

_REQUIRED = ("encoder", "quant_conv", "post_quant_conv", "decoder", "encode", "decode")


def _moments_of(encoded) -> torch.Tensor:
    if isinstance(encoded, torch.Tensor):
        return encoded
    params = getattr(encoded, "parameters", None)
    if isinstance(params, torch.Tensor):
        return params
    raise ValueError(
        f"ldm encode() returned {type(encoded).__name__}; expected a DiagonalGaussianDistribution "
        "(with .parameters = the 2C moments) or the moments tensor"
    )


def encode(self, x: torch.Tensor):
    moments = _moments_of(_patch.original(self, "encode")(x))
    return GQDiagonalGaussian(moments, self.gq_quantizer)


@torch.no_grad()
def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
    """GQ indices ``(B, embed_dim / m, h, w)`` (int64)."""
    moments = _moments_of(_patch.original(self, "encode")(x))
    return to_host_layout(self.gq_quantizer.encode_indices(moments))


def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
    """``decode(codebook[indices])``."""
    z = self.gq_quantizer.dequant(from_host_layout(indices))
    ref = next(iter(self.post_quant_conv.parameters()), None) if hasattr(self.post_quant_conv, "parameters") else None
    if ref is not None:
        z = z.to(ref.dtype)
    return self.decode(z)


_METHODS = {"encode": encode, "encode_indices": encode_indices, "decode_indices": decode_indices}


def _embed_dim(model) -> int:
    qc = model.quant_conv
    out = getattr(qc, "out_channels", None)
    if isinstance(out, int):
        if out % 2:
            raise ValueError(f"quant_conv must emit 2*embed_dim channels (mean || logvar), got {out}")
        return out // 2
    if isinstance(getattr(model, "embed_dim", None), int):
        return model.embed_dim
    raise ValueError("cannot infer embed_dim: quant_conv has no out_channels and the model no embed_dim")


def patch_ldm_autoencoder(model, K: int = 2**16, m: int | None = None, **gq_kwargs):
    """Patch an ldm-style ``AutoencoderKL`` in place (``model.gq_quantizer`` + GQ posterior).

    ``m`` must divide ``embed_dim`` (default: ``embed_dim``, one index per latent position).
    ``gq_kwargs`` go to :class:`~gq_plugin.GaussianQuantizer`. Undo with
    :func:`gq_plugin.adapters.unpatch`. Store/restore the settings yourself (ldm checkpoints are
    plain ``state_dict``s: the quantizer's buffers are in it under ``gq_quantizer.*``).
    """
    missing = [a for a in _REQUIRED if not hasattr(model, a)]
    if missing:
        raise ValueError(f"not an ldm-style autoencoder: missing {missing} (needs {list(_REQUIRED)})")
    channels = _embed_dim(model)
    m = channels if m is None else m
    _patch.check_codebook_dim(channels, m)
    quantizer = GaussianQuantizer(channels, K, m, accept_image_fmap=True, **gq_kwargs)
    ref = next(iter(model.quant_conv.parameters()), None) if hasattr(model.quant_conv, "parameters") else None
    if ref is not None:
        quantizer.to(ref.device)
    _patch.install(model, "ldm", methods=_METHODS, attrs={_patch.QUANTIZER_ATTR: quantizer})
    return model


def unpatch_ldm_autoencoder(model):
    """Undo :func:`patch_ldm_autoencoder`; returns the removed quantizer."""
    return _patch.uninstall(model, "ldm")
