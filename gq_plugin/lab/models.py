"""Build the autoencoders that recipes train: a diffusers ``AutoencoderKL`` (from a config dict
or a local ``save_pretrained`` directory) with one of three bottlenecks:

* ``gq``: patched in place by :func:`gq_plugin.adapters.patch_autoencoder_kl` (TDC in training,
  Gaussian Quant in eval), the wrapper's default bottleneck;
* ``kl``: the plain Gaussian VAE (KL term in bits, weight from the recipe), :class:`KLBottleneck`
  -- the "vanilla VAE" that is GQ-converted after training;
* ``vq``, ``fsq``, ``lfq``, ``bsq``, ``tokenbridge``: a deterministic latent (the posterior mean)
  quantized by a registry baseline, :class:`QuantizerBottleneck`.

One wrapper, :class:`~gq_plugin.adapters.GQAutoencoderWrapper`, routes encode -> bottleneck ->
decode through ``forward`` (so DistributedDataParallel synchronises every gradient) and returns
one output type, :class:`~gq_plugin.adapters.wrapper.GQAutoencoderOutput`.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from ..quantizer import GQConfig
from ..rate import group_rates
from .config import gq_recipe_settings

GAUSSIAN_BOTTLENECKS = ("gq", "kl")


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


def resolve_model_dir(path, what: str = "model directory") -> str:
    """The ``save_pretrained`` directory of ``path``: ``path/vae`` for a training checkpoint
    (``runs/<name>/final``), else ``path`` itself. Raises ``ValueError`` naming ``what`` (the
    argument the user typed, e.g. ``MODEL_DIR``) and the path when it is missing or has no
    ``config.json``."""
    d = str(path)
    if not os.path.isdir(d):
        hint = "" if os.path.exists(d) else " (`gq demo` writes runs/demo/final; `gq train RECIPE` writes runs/<recipe name>/final)"
        raise ValueError(f"{what} {d!r} is not a directory{hint}")
    vae_dir = os.path.join(d, "vae")
    vae_dir = vae_dir if os.path.isdir(vae_dir) else d
    if not os.path.isfile(os.path.join(vae_dir, "config.json")):
        raise ValueError(f"{what} {d!r} holds no model: expected config.json (from save_pretrained) in it or in its vae/ folder")
    return vae_dir


def downsampling_factor(vae) -> int:
    """Pixels per latent step along one side (2^(number of down blocks - 1))."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae) -> int:
    return int(vae.config.latent_channels)


class KLBottleneck(nn.Module):
    """Plain Gaussian VAE bottleneck: train = sample + ``kl_weight`` x KL (bits per image), eval = mean.

    ``last_rates``: the group rates ``(B, h, w, C/m)`` in bits of the last training forward
    (``m = codebook_dim``, the recipe's GQ group size, when it divides the latent channels C; else
    ``m = C``, one rate per latent position), which the trainer logs.
    """

    def __init__(self, channels: int, kl_weight: float = 1e-6, codebook_dim: int | None = None) -> None:
        super().__init__()
        self.kl_weight = float(kl_weight)
        m = channels if codebook_dim is None else int(codebook_dim)
        self.codebook_dim = m if m >= 1 and channels % m == 0 else channels
        self.last_rates: torch.Tensor | None = None

    def forward(self, posterior, generator: torch.Generator | None = None):
        if not self.training:
            return posterior.mode(), torch.zeros((), device=posterior.mean.device), None
        rates = group_rates(posterior.mean.float().movedim(1, -1), posterior.logvar.float().movedim(1, -1), self.codebook_dim)
        self.last_rates = rates.detach()
        return posterior.sample(generator), self.kl_weight * rates.flatten(1).sum(1).mean(), None  # the summed KL in bits


class QuantizerBottleneck(nn.Module):
    """Deterministic latent (posterior mean) -> a baseline quantizer ``q(z) -> (z_q, indices, aux)``."""

    def __init__(self, quantizer: nn.Module, aux_weight: float = 1.0) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.aux_weight = float(aux_weight)

    def forward(self, posterior, generator: torch.Generator | None = None):
        zq, indices, aux = self.quantizer(posterior.mean)
        loss = self.aux_weight * aux if torch.is_tensor(aux) else torch.zeros((), device=zq.device)
        return zq, loss, indices


def build_model(cfg) -> tuple[nn.Module, nn.Module]:
    """``(vae, wrapper)`` for a recipe: the diffusers model and the module to train / evaluate."""
    from ..adapters import GQAutoencoderWrapper, is_patched, patch_autoencoder_kl

    model_cfg = _as_dict(cfg["model"])
    qcfg = _as_dict(cfg["quantizer"])
    name = qcfg.get("name", "gq")
    vae = build_autoencoder_kl(model_cfg)
    if name == "gq":
        if not is_patched(vae):
            patch_autoencoder_kl(vae, K=int(qcfg["codebook_size"]), m=int(qcfg["codebook_dim"]), **gq_recipe_settings(qcfg))
        vae.gq_quantizer.tdc.auto_step = False  # the trainer steps TDC once per AE optimizer step
        wrapper = GQAutoencoderWrapper(vae)
    elif name == "kl":
        bottleneck = KLBottleneck(latent_channels(vae), kl_weight=float(qcfg.get("weight", 1e-6)), codebook_dim=qcfg.get("codebook_dim"))
        wrapper = GQAutoencoderWrapper(vae, bottleneck=bottleneck)
    else:
        from .registry import build_quantizer

        # GQ/TDC-only recipe keys (always present through the config defaults) are not baseline
        # arguments; ``codebook_dim`` is GQ's m (VQ's codebook_dim is a projection, not passed)
        gq_only = set(GQConfig.names()) - {"codebook_size"}
        kwargs = {k: v for k, v in qcfg.items() if k not in ("name", "weight", "aux_weight", *gq_only)}
        quantizer = build_quantizer(name, latent_channels(vae), **kwargs)
        qstate = _quantizer_state_path(model_cfg)
        if qstate is not None:  # trained baseline codebook / projections saved next to vae/
            quantizer.load_state_dict(load_quantizer_state(qstate))
        wrapper = GQAutoencoderWrapper(vae, bottleneck=QuantizerBottleneck(quantizer, aux_weight=float(qcfg.get("aux_weight", 1.0))))
    _freeze(vae, train_encoder=model_cfg.get("train_encoder", True), train_decoder=model_cfg.get("train_decoder", True))
    return vae, wrapper


QUANTIZER_STATE = "quantizer.pt"


def load_quantizer_state(path) -> dict:
    """A baseline's ``quantizer.pt`` loaded with ``weights_only=True`` (tensors only, never code,
    also on torch versions whose default was unsafe); ``ValueError`` when it does not load."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError (code refused), EOFError (torn) ...
        raise ValueError(f"{path} does not load: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not load: not a state dict")
    return state


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
