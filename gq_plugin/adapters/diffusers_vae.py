"""diffusers adapter: turn an ``AutoencoderKL`` (SD1.x / SDXL / SD3 / FLUX-style) into a GQ VQ-VAE.

The model is patched **in place**; nothing about its weights or architecture changes:

* ``vae.gq_quantizer`` -- a :class:`~gq_plugin.GaussianQuantizer` submodule (its buffers -- codebook
  fingerprint, config, TDC multipliers -- go into ``state_dict`` and the safetensors file);
* ``vae.encode(x)`` still returns ``AutoencoderKLOutput(latent_dist=posterior)``; the posterior is a
  subclass of diffusers' ``DiagonalGaussianDistribution`` whose ``kl()`` is the per-sample TDC loss
  in training and whose ``sample()``/``mode()`` are the GQ latent in eval (see
  :mod:`gq_plugin.adapters._posterior`), so ``vae(x)``, pipelines and training loops work unchanged;
* ``vae.encode_indices(x)`` -> ``(B, C/m, h, w)`` int64, ``vae.decode_indices(indices)`` ->
  ``DecoderOutput``;
* ``vae.config["gq"]`` -- the GQ settings, written to ``config.json`` by ``save_pretrained``.

GQ lives in the raw posterior space (before SD3's ``shift_factor``/``scaling_factor``), where the
KL/TDC is defined; pipelines apply their latent normalisation on top as before.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from contextlib import contextmanager

import torch

try:
    from diffusers import AutoencoderKL
    from diffusers.configuration_utils import FrozenDict
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError("gq_plugin.adapters.diffusers_vae needs diffusers: pip install 'gq-plugin[diffusers]'") from e

from ..quantizer import GaussianQuantizer, GQConfig
from ..rate import CodebookOptions, codebook_options
from . import _patch
from ._posterior import GQPosteriorMixin, from_host_layout, to_host_layout

CONFIG_KEY = "gq"
# First entry of config["gq"] (diffusers sorts config keys; upper case sorts first). A plain
# AutoencoderKL.from_pretrained prints the whole entry in its "config attributes ... will be
# ignored" warning, so this sentence is what a user who did not load through gq-plugin sees.
LOAD_NOTE_KEY = "NOTE"
LOAD_NOTE = (
    "GQ (Gaussian Quant) VQ-VAE saved by gq-plugin: a plain AutoencoderKL.from_pretrained loads it as a continuous "
    "VAE WITHOUT GQ (no tokens, no TDC). Load it with gq_plugin.adapters.load_pretrained_gq_vae(path)."
)
_RESERVED = ("dim", "accept_image_fmap", "channel_last")


class GQDiagonalGaussianDistribution(GQPosteriorMixin, DiagonalGaussianDistribution):
    """diffusers ``DiagonalGaussianDistribution`` whose sample/mode/kl follow GQ + TDC."""

    def __init__(self, parameters: torch.Tensor, quantizer: GaussianQuantizer, deterministic: bool = False,
                 kl_scale=None) -> None:
        DiagonalGaussianDistribution.__init__(self, parameters, deterministic)
        self._gq_init(quantizer, kl_scale)

    def _gaussian_sample(self, generator=None):
        return DiagonalGaussianDistribution.sample(self, generator)

    def _gaussian_kl(self, other):
        return DiagonalGaussianDistribution.kl(self, other)


# --------------------------------------------------------------------------- patched methods
# (module-level functions bound to the instance; names equal the attribute names)


def encode(self, x: torch.Tensor, return_dict: bool = True):
    out = _patch.original(self, "encode")(x, return_dict=True)
    w = _patch.data(self)
    scale = None if w.get("host_kl_weight") is None else functools.partial(float, w["tdc_weight"] / w["host_kl_weight"])
    posterior = GQDiagonalGaussianDistribution(out.latent_dist.parameters, self.gq_quantizer, kl_scale=scale)
    if not return_dict:
        return (posterior,)
    return AutoencoderKLOutput(latent_dist=posterior)


@contextmanager
def _untiled(vae):
    tiled = bool(getattr(vae, "use_tiling", False))
    vae.use_tiling = False
    try:
        yield tiled
    finally:
        vae.use_tiling = tiled


@torch.no_grad()
def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
    """GQ indices ``(B, latent_channels / m, h, w)`` (int64) of images ``x``.

    Always the untiled encoding: diffusers' ``enable_tiling()`` blends the encoder's moments
    across overlapping tiles, which changes the tokens at most positions, so tiling is switched
    off for this call (and back on after it; a ``UserWarning`` says so). Encode smaller images
    if the untiled encoder does not fit in memory.
    """
    with _untiled(self) as tiled:
        if tiled:
            warnings.warn(
                "encode_indices ignores enable_tiling(): tiled encoding blends the moments of overlapping tiles and "
                "changes the GQ tokens, so the indices come from the untiled encoder",
                UserWarning,
                stacklevel=3,
            )
        moments = _patch.original(self, "encode")(x, return_dict=True).latent_dist.parameters
    return to_host_layout(self.gq_quantizer.encode_indices(moments))


def decode_indices(self, indices: torch.Tensor, return_dict: bool = True):
    """Decode GQ indices: ``decode(codebook[indices])``."""
    z = self.gq_quantizer.dequant(from_host_layout(indices)).to(self.dtype)
    return self.decode(z, return_dict=return_dict)


_METHODS = {"encode": encode, "encode_indices": encode_indices, "decode_indices": decode_indices}


# --------------------------------------------------------------------------- patch / unpatch


def _latent_channels(vae) -> int:
    try:
        return int(vae.config.latent_channels)
    except AttributeError as e:
        raise ValueError("expected a diffusers AutoencoderKL (config.latent_channels missing)") from e


def patch_autoencoder_kl(vae, K: int = 2**16, m: int | None = None, *, host_kl_weight: float | None = None,
                         tdc_weight: float = 1.0, **gq_kwargs):
    """Patch any diffusers ``AutoencoderKL`` in place with Gaussian Quant + TDC.

    Args:
        vae: the ``AutoencoderKL`` (with or without ``quant_conv``).
        K: codebook size (``log2 K`` bits per sub-codebook; a power of two recommended).
        m: channels per sub-codebook; must divide ``latent_channels`` (default: all of them,
            one codebook index per latent position).
        **gq_kwargs: forwarded to :class:`~gq_plugin.GaussianQuantizer` (``grouping``,
            ``codebook``, ``seed``, ``beta``, ``tolerance``, ``lam_factor``, ``tdc_auto_step``, ...).
        host_kl_weight: the weight your training loop multiplies ``posterior.kl()`` by (the
            diffusers ``train_autoencoderkl.py`` example's ``--kl_scale``, 1e-6 by default). ``kl()``
            is divided by it so the loop's KL term is ``tdc_weight * TDC``; ``None``: ``kl()`` is the
            TDC loss itself. diffusers models carry no loss module to read it from.
        tdc_weight: the weight the TDC loss should have in that term (with ``host_kl_weight``).

    Returns the same ``vae`` (patched).
    """
    channels = _latent_channels(vae)
    m = channels if m is None else m
    _patch.check_codebook_dim(channels, m)
    bad = [k for k in _RESERVED if k in gq_kwargs]
    if bad:
        raise ValueError(f"{bad} are set by the adapter from the model; do not pass them")
    quantizer = GaussianQuantizer(channels, K, m, accept_image_fmap=True, **gq_kwargs)
    try:
        quantizer.to(vae.device)
    except AttributeError:
        pass
    weights = {"tdc_weight": _patch.check_weight("tdc_weight", tdc_weight), "host_kl_weight": None}
    saved = {LOAD_NOTE_KEY: LOAD_NOTE, **quantizer.settings.to_dict()}  # the one serialisation (GQConfig)
    if host_kl_weight is not None:
        weights["host_kl_weight"] = _patch.check_weight("host_kl_weight", host_kl_weight)
        saved.update(weights)  # saved with the model, re-applied by patch_from_config
    _patch.install(vae, "diffusers", methods=_METHODS, attrs={_patch.QUANTIZER_ATTR: quantizer}, data=weights)
    vae.register_to_config(**{CONFIG_KEY: saved})
    return vae


def patch_sd3_vae(vae, K: int = 2**16, m: int = 16, **gq_kwargs):
    """Patch a Stable Diffusion 3 / 3.5 VAE (16 latent channels, f8) in place.

    ``m=16, K=2**16`` gives 16 bits per latent position = 0.25 bpp; ``m=8`` -> 0.5 bpp;
    ``m=4`` -> 1.0 bpp. See :func:`suggest_gq_settings`.

    This patches Stability's SD3 VAE (fine-tune it with TDC before using its tokens); it is not the
    paper's released tokenizer, whose weights and architecture differ: load those with
    :func:`gq_plugin.adapters.load_authors_checkpoint` (docs/authors_checkpoints.md).
    """
    channels = _latent_channels(vae)
    if channels != 16:
        warnings.warn(f"patch_sd3_vae expects the SD3 VAE's 16 latent channels, this model has {channels}", stacklevel=2)
    return patch_autoencoder_kl(vae, K=K, m=m, **gq_kwargs)


def unpatch(vae):
    """Restore the original ``AutoencoderKL`` behaviour; returns the removed quantizer."""
    quantizer = _patch.uninstall(vae, "diffusers")
    internal = getattr(vae, "_internal_dict", None)
    if internal is not None and CONFIG_KEY in internal:
        vae._internal_dict = FrozenDict({k: v for k, v in internal.items() if k != CONFIG_KEY})
    return quantizer


def gq_config(vae) -> dict | None:
    """The GQ settings stored in ``vae.config`` (None if absent)."""
    cfg = getattr(vae, "config", {}).get(CONFIG_KEY) if hasattr(vae, "config") else None
    return dict(cfg) if cfg is not None else None


def patch_from_config(vae, config: dict | None = None):
    """Re-apply the GQ patch described by ``vae.config["gq"]`` (e.g. after ``from_pretrained``).

    ``config`` is :meth:`GQConfig.to_dict` output (or the flat format-1 dict of gq-plugin <= 0.1),
    validated by :meth:`GQConfig.from_dict`. Only the settings are restored here; TDC multipliers
    come from the weights (:func:`load_pretrained_gq_vae` does both).
    """
    cfg = dict(config if config is not None else (gq_config(vae) or {}))
    if not cfg:
        raise ValueError(f"no '{CONFIG_KEY}' entry in the model config: this checkpoint was not saved from a GQ-patched VAE")
    cfg.pop(LOAD_NOTE_KEY, None)
    weights = {k: cfg.pop(k) for k in ("tdc_weight", "host_kl_weight") if k in cfg}
    if cfg.get("check_finite") is False:  # loading never silently turns the NaN/inf checks off
        warnings.warn(f"model config '{CONFIG_KEY}': check_finite=false is ignored on load (NaN/inf inputs keep raising); "
                      "set quantizer.check_finite = False in code to trade the check for a host sync", RuntimeWarning, stacklevel=2)
        cfg["check_finite"] = True
    channels = _latent_channels(vae)
    cfg.setdefault("dim", channels)  # format 1 did not store it
    settings = GQConfig.from_dict(cfg)
    if settings.dim != channels:
        raise ValueError(f"config['{CONFIG_KEY}'] is for {settings.dim} latent channels, this model has {channels}")
    if _patch.is_patched(vae):
        unpatch(vae)
    return patch_autoencoder_kl(vae, **_patch.to_patch_kwargs(settings.flat()), **weights)


@contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _read_prefixed_state(directory: str, prefix: str, variant: str | None) -> dict[str, torch.Tensor]:
    base = "diffusion_pytorch_model"
    stem = f"{base}.{variant}" if variant else base
    st_file = os.path.join(directory, f"{stem}.safetensors")
    st_index = os.path.join(directory, f"{stem}.safetensors.index.json")
    bin_file = os.path.join(directory, f"{stem}.bin")
    out: dict[str, torch.Tensor] = {}
    if os.path.isfile(st_file) or os.path.isfile(st_index):
        from safetensors import safe_open

        if os.path.isfile(st_file):
            files = [st_file]
        else:
            with open(st_index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({os.path.join(directory, v) for k, v in weight_map.items() if k.startswith(prefix)})
        for path in files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        out[key[len(prefix) :]] = f.get_tensor(key)
    elif os.path.isfile(bin_file):
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    else:
        raise FileNotFoundError(f"no {stem}.safetensors / .bin weights in {directory}")
    return out


def _check_bin_weights(directory: str, variant: str | None) -> None:
    """A legacy ``.bin`` weights file (no safetensors next to it) must hold tensors only: it is
    opened with ``torch.load(weights_only=True)`` first, and anything else (a pickle with code, a
    torn file) is refused with one clear ``ValueError``."""
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    bin_file = os.path.join(directory, f"{stem}.bin")
    if os.path.isfile(os.path.join(directory, f"{stem}.safetensors")) or not os.path.isfile(bin_file):
        return
    try:
        torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError (code refused), EOFError, RuntimeError (torn zip)
        msg = " ".join(str(exc).split())[:160]
        raise ValueError(f"{bin_file} is not a plain weights file, refusing to load it ({type(exc).__name__}: {msg})") from None


def load_pretrained_gq_vae(path: str, subfolder: str | None = None, variant: str | None = None, cls=None, **kwargs):
    """``AutoencoderKL.from_pretrained`` + re-patch from ``config["gq"]`` + restore the GQ buffers.

    ``path`` is a local directory written by ``save_pretrained`` of a patched VAE (download Hub
    repos first, e.g. with ``huggingface_hub.snapshot_download``). The TDC multipliers, the codebook
    fingerprint and the GQ config buffer are read from the same safetensors file; a checkpoint
    made with a different codebook is refused (``ValueError``).
    """
    cls = cls or AutoencoderKL
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a local directory (download Hub checkpoints first)")
    directory = os.path.join(path, subfolder) if subfolder else path
    _check_bin_weights(directory, variant)
    with _quiet_diffusers():  # the 'gq' config key and gq_quantizer.* weights are expected extras
        vae = cls.from_pretrained(path, subfolder=subfolder, variant=variant, **kwargs)
    patch_from_config(vae)
    prefix = _patch.QUANTIZER_ATTR + "."
    state = _read_prefixed_state(directory, prefix, variant)
    if not state:
        raise ValueError(f"no '{prefix}*' tensors in the weights under {directory}")
    vae.gq_quantizer.load_state_dict(state, strict=True)
    return vae


# --------------------------------------------------------------------------- settings helper


def suggest_gq_settings(vae, image_size: int = 256, log2_codebook_sizes=(8, 10, 12, 14, 16, 18)) -> CodebookOptions:
    """:func:`gq_plugin.rate.codebook_options` for a diffusers ``AutoencoderKL`` (or its config):
    its ``latent_channels``, downsampling factor ``f = 2**(len(block_out_channels) - 1)`` and an
    ``image_size`` x ``image_size`` image. For a choice from measured channel rates use
    :func:`gq_plugin.recommend_codebook` (``gq diagnose``).

    >>> # SD3 (f8, 16 ch): m=16, K=2^16 -> 0.25 bpp; m=8 -> 0.5 bpp; m=4 -> 1.0 bpp
    """
    config = vae.config if hasattr(vae, "config") else vae
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    side = image_size // factor
    return codebook_options(int(config["latent_channels"]), log2_codebook_sizes, pixels_per_token=factor * factor,
                            tokens_per_image=side * side)
