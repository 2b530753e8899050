"""Adapters connecting foreign autoencoders / quantizer APIs to :class:`~gq_plugin.GaussianQuantizer`.

Every adapter imports its foreign library lazily: ``import gq_plugin.adapters`` needs none of
them, and ``adapters.patch_sd3_vae`` imports diffusers on first use.

>>> from gq_plugin import adapters
>>> adapters.patch_sd3_vae(vae, K=2**16, m=16)      # doctest: +SKIP

=============================  ======================================================
name                           module
=============================  ======================================================
patch_sd3_vae,                 :mod:`.diffusers_vae` (every diffusers Gaussian VAE: image,
patch_autoencoder_kl,          video and audio; layouts in :mod:`._layout`)
load_pretrained_gq_vae,
patch_from_config,
suggest_gq_settings,
GQDiagonalGaussianDistribution
patch_ldm_autoencoder,         :mod:`.ldm` (ldm ``AutoencoderKL``; ``GQAutoencoderKL`` is a
GQAutoencoderKL,               config target that patches itself before loading a checkpoint)
GQDiagonalGaussian
GaussianQuantRegularizer,      :mod:`.sgm` (generative-models ``AbstractRegularizer``;
patch_sgm_autoencoder          ``patch_sgm_autoencoder`` swaps an engine's regularizer)
GaussianVectorQuantizer,       :mod:`.taming` (taming ``VectorQuantizer2`` / ``VQModel``)
patch_taming_vqmodel,
unpatch_taming_vqmodel
GaussianQuantize,              :mod:`.vq_pytorch` (vector-quantize-pytorch API)
register_with_vector_quantize_pytorch
swap_tokenbridge_quantizer,    :mod:`.tokenbridge` (TokenBridge; its AR head: :mod:`._ar_head`)
tokenbridge_gq_inputs,
load_tokenbridge_checkpoint,
gq_post_training_quantize
GQAutoencoderWrapper           :mod:`.wrapper` (DDP-safe encode -> GQ -> decode)
load_authors_checkpoint,       :mod:`.authors` (the paper authors' released UNet tokenizers
authors_vae_config             -> a GQ-patched diffusers ``AutoencoderKL``)
patch, unpatch, is_patched,    here (``HOSTS``: the host table, one row per host)
gq_settings_from_state_dict
=============================  ======================================================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ._patch import gq_settings_from_state_dict, is_patched  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Host:
    """One host library: the adapter module, its patch / unpatch functions (None for hosts
    that take a drop-in class instead of an instance patch) and the names it exports."""

    module: str
    patch: str | None
    unpatch: str | None
    exports: tuple[str, ...]


#: The host table. A patch writes its host's key into the model's undo record
#: (:mod:`._patch`); :func:`unpatch` looks the host up here. Add a host by adding a row.
HOSTS: dict[str, Host] = {
    "diffusers": Host(
        "diffusers_vae", "patch_autoencoder_kl", "unpatch",
        ("patch_sd3_vae", "patch_autoencoder_kl", "load_pretrained_gq_vae", "patch_from_config", "suggest_gq_settings",
         "GQDiagonalGaussianDistribution"),
    ),
    "ldm": Host("ldm", "patch_ldm_autoencoder", "unpatch_ldm_autoencoder", ("patch_ldm_autoencoder", "GQAutoencoderKL")),
    "taming": Host(
        "taming", "patch_taming_vqmodel", "unpatch_taming_vqmodel",
        ("GaussianVectorQuantizer", "patch_taming_vqmodel", "unpatch_taming_vqmodel"),
    ),
    "tokenbridge": Host(
        "tokenbridge", "swap_tokenbridge_quantizer", "unswap_tokenbridge_quantizer",
        ("swap_tokenbridge_quantizer", "tokenbridge_gq_inputs", "load_tokenbridge_checkpoint", "gq_post_training_quantize"),
    ),
    "sgm": Host("sgm", "patch_sgm_autoencoder", "unpatch_sgm_autoencoder", ("GaussianQuantRegularizer", "patch_sgm_autoencoder")),
    "vq_pytorch": Host("vq_pytorch", None, None, ("GaussianQuantize", "register_with_vector_quantize_pytorch")),
}

_LAZY = {name: host.module for host in HOSTS.values() for name in host.exports}
_LAZY.update({"GQDiagonalGaussian": "_posterior", "GQAutoencoderWrapper": "wrapper", "GQAutoencoderOutput": "wrapper",
              "load_authors_checkpoint": "authors", "authors_vae_config": "authors"})

__all__ = sorted([*_LAZY, "HOSTS", "Host", "patch", "unpatch", "is_patched", "gq_settings_from_state_dict"])


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


def _host_function(host: str, which: str):
    if host not in HOSTS:
        raise ValueError(f"host must be one of {sorted(HOSTS)}, got {host!r}")
    name = getattr(HOSTS[host], which)
    if name is None:
        raise ValueError(f"host {host!r} has no instance {which}: use its drop-in class {HOSTS[host].exports[0]}")
    return getattr(importlib.import_module(f".{HOSTS[host].module}", __name__), name)


def patch(model, host: str, **kwargs):
    """Patch ``model`` in place with the adapter of ``host`` (a key of :data:`HOSTS`); ``kwargs``
    go to that host's patch function (e.g. ``K=2**16, m=16``). Returns the model."""
    return _host_function(host, "patch")(model, **kwargs)


def unpatch(model):
    """Undo any model patch from this package (diffusers, ldm, taming, TokenBridge); returns the
    removed quantizer. The host comes from the model's undo record."""
    from ._patch import record

    rec = record(model)
    if rec is None:
        raise ValueError("model is not patched with GQ")
    return _host_function(rec["host"], "unpatch")(model)
