"""Build the autoencoders that recipes train: a diffusers ``AutoencoderKL`` (from a config dict
or a local ``save_pretrained`` directory) with one of three bottlenecks:

* ``gq``: patched in place by :func:`gq_plugin.adapters.patch_autoencoder_kl` (TDC in training,
  Gaussian Quant in eval) and trained through :class:`~gq_plugin.adapters.GQAutoencoderWrapper`;
* ``kl``: the plain Gaussian VAE (KL term in bits, weight from the recipe) through
  :class:`KLAutoencoderWrapper` -- the "vanilla VAE" that is GQ-converted after training;
* ``vq``, ``fsq``, ``lfq``, ``bsq``, ``tokenbridge``: a deterministic latent (the posterior mean)
  quantized by a registry baseline, through :class:`QuantizedAutoencoderWrapper`.

All wrappers share one output type (:class:`AutoencoderOutput`) and route encode -> bottleneck ->
decode through ``forward`` so DistributedDataParallel synchronises every gradient.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple

import torch
from torch import nn

from ..rate import kl_bits_per_channel

GAUSSIAN_BOTTLENECKS = ("gq", "kl")


class AutoencoderOutput(NamedTuple):
    sample: torch.Tensor  # reconstruction
    loss: torch.Tensor  # regulariser (TDC / KL bits / quantizer aux loss), scalar
    indices: torch.Tensor | None
    latents: torch.Tensor  # what the decoder saw
    posterior: Any


def _diffusers():
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:  # pragma: no cover
        raise ImportError("recipes need diffusers: pip install 'gq-plugin[diffusers]'") from e
    return AutoencoderKL


def build_autoencoder_kl(model_cfg: dict) -> nn.Module:
    """An ``AutoencoderKL`` from ``model_cfg``: ``pretrained`` (local dir) or ``config`` (random init)."""
    AutoencoderKL = _diffusers()
    pretrained = model_cfg.get("pretrained")
    if pretrained:
        if not os.path.isdir(pretrained):
            raise ValueError(f"model.pretrained must be a local directory written by save_pretrained, got {pretrained!r}")
        from ..adapters.diffusers_vae import CONFIG_KEY, load_pretrained_gq_vae

        subfolder = model_cfg.get("subfolder")
        config_file = os.path.join(pretrained, subfolder or "", "config.json")
        is_gq = os.path.isfile(config_file) and CONFIG_KEY in json.loads(open(config_file).read())
        if is_gq:  # a GQ checkpoint: restore quantizer + TDC state
            return load_pretrained_gq_vae(pretrained, subfolder=subfolder)
        return AutoencoderKL.from_pretrained(pretrained, subfolder=subfolder)
    config = dict(model_cfg.get("config") or {})
    if not config:
        raise ValueError("model.config (AutoencoderKL constructor arguments) or model.pretrained is required")
    return AutoencoderKL(**config)


def downsampling_factor(vae) -> int:
    """Pixels per latent step along one side (2^(number of down blocks - 1))."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae) -> int:
    return int(vae.config.latent_channels)


class KLAutoencoderWrapper(nn.Module):
    """Plain Gaussian VAE: train = sample + ``kl_weight`` x KL (bits per image), eval = mean."""

    def __init__(self, vae: nn.Module, kl_weight: float = 1e-6) -> None:
        super().__init__()
        self.model = vae
        self.kl_weight = float(kl_weight)
        self.last_rates: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> AutoencoderOutput:
        posterior = self.model.encode(x).latent_dist
        if self.training:
            z = posterior.sample(generator)
            kl = kl_bits_per_channel(posterior.mean.float(), posterior.logvar.float())
            self.last_rates = kl.detach()
            loss = self.kl_weight * kl.flatten(1).sum(1).mean()
        else:
            z = posterior.mode()
            loss = torch.zeros((), device=x.device)
        return AutoencoderOutput(self.model.decode(z).sample, loss, None, z, posterior)


class QuantizedAutoencoderWrapper(nn.Module):
    """Deterministic latent (posterior mean) -> baseline quantizer -> decoder."""

    def __init__(self, vae: nn.Module, quantizer: nn.Module, aux_weight: float = 1.0) -> None:
        super().__init__()
        self.model = vae
        self.quantizer = quantizer
        self.aux_weight = float(aux_weight)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> AutoencoderOutput:
        posterior = self.model.encode(x).latent_dist
        z = posterior.mean
        zq, indices, aux = self.quantizer(z)
        loss = self.aux_weight * aux if torch.is_tensor(aux) else torch.zeros((), device=x.device)
        return AutoencoderOutput(self.model.decode(zq).sample, loss, indices, zq, posterior)


def gq_settings(quantizer_cfg: dict) -> dict:
    """GaussianQuantizer keyword arguments from a recipe's ``quantizer`` section."""
    keys = ("grouping", "codebook", "seed", "beta", "tolerance", "lam_factor", "lam_max_range", "lam_min_range", "lam_global_range",
            "tdc_rule", "tdc_quantile")
    out = {k: quantizer_cfg[k] for k in keys if quantizer_cfg.get(k) is not None}
    for k in ("lam_max_range", "lam_min_range", "lam_global_range"):
        if k in out:
            out[k] = tuple(out[k])
    return out


def build_model(cfg) -> tuple[nn.Module, nn.Module]:
    """``(vae, wrapper)`` for a recipe: the diffusers model and the module to train / evaluate."""
    from ..adapters import GQAutoencoderWrapper, is_patched, patch_autoencoder_kl

    model_cfg = _as_dict(cfg["model"])
    qcfg = _as_dict(cfg["quantizer"])
    name = qcfg.get("name", "gq")
    vae = build_autoencoder_kl(model_cfg)
    if name == "gq":
        if not is_patched(vae):
            patch_autoencoder_kl(vae, K=int(qcfg["codebook_size"]), m=int(qcfg["codebook_dim"]), **gq_settings(qcfg))
        vae.gq_quantizer.tdc.auto_step = False  # the trainer steps TDC once per AE optimizer step
        wrapper = GQAutoencoderWrapper(vae)
    elif name == "kl":
        wrapper = KLAutoencoderWrapper(vae, kl_weight=float(qcfg.get("weight", 1e-6)))
    else:
        from .registry import build_quantizer

        # GQ/TDC-only recipe keys (always present through the config defaults) are not baseline
        # arguments; ``codebook_dim`` is GQ's m (VQ's codebook_dim is a projection, not passed)
        kwargs = {k: v for k, v in qcfg.items() if k not in ("name", "weight", "aux_weight", "codebook_dim", *_GQ_ONLY_KEYS)}
        quantizer = build_quantizer(name, latent_channels(vae), **kwargs)
        qstate = _quantizer_state_path(model_cfg)
        if qstate is not None:  # trained baseline codebook / projections saved next to vae/
            quantizer.load_state_dict(torch.load(qstate, map_location="cpu"))
        wrapper = QuantizedAutoencoderWrapper(vae, quantizer, aux_weight=float(qcfg.get("aux_weight", 1.0)))
    _freeze(vae, train_encoder=model_cfg.get("train_encoder", True), train_decoder=model_cfg.get("train_decoder", True))
    return vae, wrapper


_GQ_ONLY_KEYS = ("grouping", "codebook", "seed", "beta", "tolerance", "lam_factor", "lam_max_range", "lam_min_range",
                 "lam_global_range", "tdc_rule", "tdc_quantile", "search_backend")
QUANTIZER_STATE = "quantizer.pt"


def _quantizer_state_path(model_cfg: dict):
    """``<checkpoint>/quantizer.pt`` for a ``pretrained`` ``<checkpoint>/vae`` dir, if present."""
    pretrained = model_cfg.get("pretrained")
    if not pretrained:
        return None
    from pathlib import Path

    for cand in (Path(pretrained) / QUANTIZER_STATE, Path(pretrained).parent / QUANTIZER_STATE):
        if cand.is_file():
            return cand
    return None


def _freeze(vae, train_encoder: bool, train_decoder: bool) -> None:
    for name in ("encoder", "quant_conv"):
        mod = getattr(vae, name, None)
        if mod is not None:
            mod.requires_grad_(bool(train_encoder))
    for name in ("decoder", "post_quant_conv"):
        mod = getattr(vae, name, None)
        if mod is not None:
            mod.requires_grad_(bool(train_decoder))


def _as_dict(section) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):
            return OmegaConf.to_container(section, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(section)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def pixels_per_token(vae) -> int:
    f = downsampling_factor(vae)
    return f * f


def nominal_bpp(vae, codebook_size: int, codebook_dim: int) -> float:
    return latent_channels(vae) // codebook_dim * math.log2(codebook_size) / pixels_per_token(vae)
