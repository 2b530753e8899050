"""CompVis / Stability ``ldm`` adapter (latent-diffusion / stable-diffusion ``AutoencoderKL``).

Tested against the real ``ldm`` package (``pip install --no-deps stable-diffusion-sdkit==2.1.5``):
``AutoencoderKL``, ``DiagonalGaussianDistribution``, ``LatentDiffusion`` and ldm's own
``training_step`` under Lightning. The adapter only needs the model's interface: ``encoder``,
``quant_conv`` (2*z_channels -> 2*embed_dim), ``post_quant_conv``, ``decoder``,
``encode(x) -> DiagonalGaussianDistribution`` and ``decode(z)``.

After :func:`patch_ldm_autoencoder` the model's ``encode`` returns a :class:`GQLdmPosterior`,
an instance of ldm's ``DiagonalGaussianDistribution`` when ``ldm`` imports (so
``LatentDiffusion.get_first_stage_encoding`` accepts it), with the GQ behaviour of
:class:`~gq_plugin.adapters._posterior.GQPosteriorMixin`: in eval ``sample()``/``mode()`` return
the GQ latent (LatentDiffusion keeps its first stage in eval), in training the reparameterised
sample, and ``kl()`` carries the TDC loss.

* **Host KL weight.** ldm's ``LPIPSWithDiscriminator`` adds ``kl_weight * sum(kl()) / B``
  (``kl_weight = 1e-6`` in ldm's configs). ``kl()`` is divided by the host weight -- read from
  ``model.loss.kl_weight`` each time, or fixed with ``host_kl_weight`` -- so the loss holds
  ``tdc_weight * TDC`` whatever the host's KL weight.
* **Stepping.** The multipliers move once per autoencoder optimizer step inside ldm's
  ``training_step`` (:mod:`._stepping`); the discriminator pass, which also evaluates
  ``kl()``, never moves them.
* **Checkpoints.** ldm's ``init_from_ckpt`` loads with ``strict=False``: a patched model loads the
  ``gq_quantizer.*`` keys (and refuses a checkpoint of other GQ settings); a plain ldm
  ``AutoencoderKL`` would drop them silently, so build GQ first stages with
  :class:`GQAutoencoderKL` (a config ``target`` that patches itself before loading).
"""

from __future__ import annotations

import functools

import torch

from ..quantizer import GaussianQuantizer
from . import _patch, _stepping
from ._posterior import GQDiagonalGaussian, from_host_layout, to_host_layout

try:  # light: torch + numpy only
    from ldm.modules.distributions.distributions import (
        DiagonalGaussianDistribution as _LdmDistribution,
    )
except Exception:  # ldm not installed, or another package named ldm
    _LdmDistribution = None

HAS_LDM = _LdmDistribution is not None
_REQUIRED = ("encoder", "quant_conv", "post_quant_conv", "decoder", "encode", "decode")

if HAS_LDM:

    class GQLdmPosterior(GQDiagonalGaussian, _LdmDistribution):
        """:class:`~gq_plugin.adapters._posterior.GQDiagonalGaussian` that is also an ldm
        ``DiagonalGaussianDistribution`` (the GQ methods come first in the MRO)."""

else:
    GQLdmPosterior = GQDiagonalGaussian


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


def kl_factor(model) -> float:
    """``tdc_weight / host KL weight``: the factor ``kl()`` carries so the host's KL term equals
    ``tdc_weight * TDC``."""
    w = _patch.data(model)
    host = w["host_kl_weight"]
    if host is None:
        loss = getattr(model, "loss", None)
        host = getattr(loss, "kl_weight", 1.0)
        return w["tdc_weight"] / _patch.check_weight("the host's KL weight model.loss.kl_weight", host)
    return w["tdc_weight"] / host


def encode(self, x: torch.Tensor):
    moments = _moments_of(_patch.original(self, "encode")(x))
    return GQLdmPosterior(moments, self.gq_quantizer, kl_scale=functools.partial(kl_factor, self))


@torch.no_grad()
def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
    """GQ indices ``(B, embed_dim / m, h, w)`` (int64), lined up with the latent."""
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


def patch_ldm_autoencoder(model, K: int = 2**16, m: int | None = None, *, tdc_weight: float = 1.0,
                          host_kl_weight: float | None = None, **gq_kwargs):
    """Patch an ldm ``AutoencoderKL`` in place (``model.gq_quantizer`` + GQ posterior).

    Args:
        K, m: codebook size and channels per sub-codebook (``m`` divides ``embed_dim``; default
            ``embed_dim``, one index per latent position).
        tdc_weight: the weight the TDC loss should have in the host's autoencoder loss.
        host_kl_weight: the weight the host multiplies ``kl()`` by; default: read
            ``model.loss.kl_weight`` whenever ``kl()`` runs (1 if the model has none).
        **gq_kwargs: :class:`~gq_plugin.GaussianQuantizer` keywords. Without ``tdc_auto_step`` the
            multipliers move once per autoencoder optimizer step (:mod:`._stepping`).

    The quantizer takes the model's train/eval mode. Undo with :func:`gq_plugin.adapters.unpatch`.
    ldm checkpoints are plain ``state_dict``s holding ``gq_quantizer.*``; restore with
    :class:`GQAutoencoderKL` or by patching with
    :func:`~gq_plugin.adapters.gq_settings_from_state_dict` first.
    """
    missing = [a for a in _REQUIRED if not hasattr(model, a)]
    if missing:
        raise ValueError(f"not an ldm-style autoencoder: missing {missing} (needs {list(_REQUIRED)})")
    tdc_weight = _patch.check_weight("tdc_weight", tdc_weight)
    if host_kl_weight is not None:
        host_kl_weight = _patch.check_weight("host_kl_weight", host_kl_weight)
    channels = _embed_dim(model)
    m = channels if m is None else m
    _patch.check_codebook_dim(channels, m)
    quantizer = GaussianQuantizer(channels, K, m, accept_image_fmap=True, **gq_kwargs)
    _stepping.configure(quantizer, gq_kwargs)
    ref = next(iter(model.quant_conv.parameters()), None) if hasattr(model.quant_conv, "parameters") else None
    if ref is not None:
        quantizer.to(ref.device)
    _patch.install(model, "ldm", methods=_METHODS, attrs={_patch.QUANTIZER_ATTR: quantizer},
                   data={"tdc_weight": tdc_weight, "host_kl_weight": host_kl_weight})
    return model


def unpatch_ldm_autoencoder(model):
    """Undo :func:`patch_ldm_autoencoder`; returns the removed quantizer."""
    return _patch.uninstall(model, "ldm")


def _gq_autoencoder_kl():
    from ldm.models.autoencoder import AutoencoderKL

    class GQAutoencoderKL(AutoencoderKL):
        """ldm ``AutoencoderKL`` patched with GQ before its checkpoint loads; name it as
        ``first_stage_config.target`` (``params: {ddconfig, lossconfig, embed_dim, ckpt_path,
        gq: {K: 65536, m: 4, ...}}``). ``gq`` holds :func:`patch_ldm_autoencoder`'s keywords;
        without it the settings come from the GQ checkpoint in ``ckpt_path``."""

        def __init__(self, ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=(), gq=None, **kwargs):
            super().__init__(ddconfig, lossconfig, embed_dim, ckpt_path=None, ignore_keys=list(ignore_keys), **kwargs)
            settings = dict(gq or {})
            if ckpt_path is not None and "K" not in settings:
                state = torch.load(ckpt_path, map_location="cpu")
                try:
                    settings.update(_patch.gq_settings_from_state_dict(state.get("state_dict", state)))
                except ValueError:
                    raise ValueError(
                        f"{ckpt_path} is not a GQ checkpoint (no gq_quantizer.gq_config): pass gq={{'K': ..., 'm': ...}}"
                    ) from None
            elif "K" not in settings:
                raise ValueError("GQAutoencoderKL needs gq={'K': ..., 'm': ...} or a GQ checkpoint in ckpt_path")
            patch_ldm_autoencoder(self, **settings)
            if ckpt_path is not None:
                self.init_from_ckpt(ckpt_path, ignore_keys=list(ignore_keys))

    GQAutoencoderKL.__module__ = __name__
    GQAutoencoderKL.__qualname__ = "GQAutoencoderKL"
    return GQAutoencoderKL


def __getattr__(name: str):
    if name == "GQAutoencoderKL":  # built on first use: importing ldm.models imports Lightning
        cls = _gq_autoencoder_kl()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
