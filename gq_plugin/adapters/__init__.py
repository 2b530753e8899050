"""Adapters connecting foreign autoencoders / quantizer APIs to :class:`~gq_plugin.GaussianQuantizer`.

Every adapter imports its foreign library lazily: ``import gq_plugin.adapters`` needs none of
them, and ``adapters.patch_sd3_vae`` imports diffusers on first use.

>>> from gq_plugin import adapters
>>> adapters.patch_sd3_vae(vae, K=2**16, m=16)      # doctest: +SKIP

=============================  ======================================================
name                           module
=============================  ======================================================
patch_sd3_vae,                 :mod:`.diffusers_vae` (diffusers ``AutoencoderKL``)
patch_autoencoder_kl,
load_pretrained_gq_vae,
patch_from_config,
suggest_gq_settings,
GQDiagonalGaussianDistribution
patch_ldm_autoencoder,         :mod:`.ldm` (CompVis ldm ``AutoencoderKL`` interface)
GQDiagonalGaussian
GaussianQuantRegularizer       :mod:`.sgm` (generative-models ``AbstractRegularizer``)
GaussianVectorQuantizer,       :mod:`.taming` (taming ``VectorQuantizer2`` / ``VQModel``)
patch_taming_vqmodel,
unpatch_taming_vqmodel
GaussianQuantize,              :mod:`.vq_pytorch` (vector-quantize-pytorch API)
register_with_vector_quantize_pytorch
swap_tokenbridge_quantizer     :mod:`.tokenbridge`
GQAutoencoderWrapper           :mod:`.wrapper` (DDP-safe encode -> GQ -> decode)
unpatch, is_patched,           here
gq_settings_from_state_dict
=============================  ======================================================
"""

from __future__ import annotations

import importlib

from ._patch import gq_settings_from_state_dict, is_patched  # noqa: F401  (re-exported)

_LAZY = {
    # diffusers
    "patch_sd3_vae": "diffusers_vae",
    "patch_autoencoder_kl": "diffusers_vae",
    "load_pretrained_gq_vae": "diffusers_vae",
    "patch_from_config": "diffusers_vae",
    "suggest_gq_settings": "diffusers_vae",
    "GQDiagonalGaussianDistribution": "diffusers_vae",
    "GQSetting": "diffusers_vae",
    # ldm
    "patch_ldm_autoencoder": "ldm",
    "GQAutoencoderKL": "ldm",
    "GQDiagonalGaussian": "_posterior",
    # sgm
    "GaussianQuantRegularizer": "sgm",
    # taming
    "GaussianVectorQuantizer": "taming",
    "patch_taming_vqmodel": "taming",
    "unpatch_taming_vqmodel": "taming",
    # vector-quantize-pytorch
    "GaussianQuantize": "vq_pytorch",
    "register_with_vector_quantize_pytorch": "vq_pytorch",
    # TokenBridge
    "swap_tokenbridge_quantizer": "tokenbridge",
    "tokenbridge_gq_inputs": "tokenbridge",
    # generic
    "GQAutoencoderWrapper": "wrapper",
    "GQAutoencoderOutput": "wrapper",
}

__all__ = sorted([*_LAZY, "unpatch", "is_patched", "gq_settings_from_state_dict"])


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


def unpatch(model):
    """Undo any model patch from this package (diffusers, ldm, taming, TokenBridge); returns the quantizer."""
    if "_gq_old_quantize" in getattr(model, "__dict__", {}):  # taming VQModel
        from .taming import unpatch_taming_vqmodel

        return unpatch_taming_vqmodel(model)
    if not is_patched(model):
        raise ValueError("model is not patched with GQ")
    if hasattr(model, "register_to_config"):  # a diffusers ConfigMixin model
        from .diffusers_vae import unpatch as _unpatch

        return _unpatch(model)
    if getattr(model, "_gq_tokenbridge_saved", None) is not None:
        from .tokenbridge import unswap_tokenbridge_quantizer

        return unswap_tokenbridge_quantizer(model)
    from ._patch import uninstall

    return uninstall(model)
