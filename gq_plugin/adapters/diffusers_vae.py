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

import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

try:
    from diffusers import AutoencoderKL
    from diffusers.configuration_utils import FrozenDict
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError("gq_plugin.adapters.diffusers_vae needs diffusers: pip install 'gq-plugin[diffusers]'") from e

from ..codebook import divisors
from ..quantizer import GaussianQuantizer
from . import _patch
from ._posterior import GQPosteriorMixin, from_host_layout, to_host_layout

CONFIG_KEY = "gq"
CONFIG_FORMAT = 1
_RESERVED = ("dim", "accept_image_fmap", "channel_last")


class GQDiagonalGaussianDistribution(GQPosteriorMixin, DiagonalGaussianDistribution):
    """diffusers ``DiagonalGaussianDistribution`` whose sample/mode/kl follow GQ + TDC."""

    def __init__(self, parameters: torch.Tensor, quantizer: GaussianQuantizer, deterministic: bool = False) -> None:
        DiagonalGaussianDistribution.__init__(self, parameters, deterministic)
        self._gq_init(quantizer)

    def _gaussian_sample(self, generator=None):
        return DiagonalGaussianDistribution.sample(self, generator)

    def _gaussian_kl(self, other):
        return DiagonalGaussianDistribution.kl(self, other)


# --------------------------------------------------------------------------- patched methods
# (module-level functions bound to the instance; names equal the attribute names)


def encode(self, x: torch.Tensor, return_dict: bool = True):
    out = _patch.original(self, "encode")(x, return_dict=True)
    posterior = GQDiagonalGaussianDistribution(out.latent_dist.parameters, self.gq_quantizer)
    if not return_dict:
        return (posterior,)
    return AutoencoderKLOutput(latent_dist=posterior)


@torch.no_grad()
def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
    """GQ indices ``(B, latent_channels / m, h, w)`` (int64) of images ``x``."""
    moments = _patch.original(self, "encode")(x, return_dict=True).latent_dist.parameters
    return to_host_layout(self.gq_quantizer.encode_indices(moments))


def decode_indices(self, indices: torch.Tensor, return_dict: bool = True):
    """Decode GQ indices: ``decode(codebook[indices])``."""
    z = self.gq_quantizer.dequant(from_host_layout(indices)).to(self.dtype)
    return self.decode(z, return_dict=return_dict)


_METHODS = {"encode": encode, "encode_indices": encode_indices, "decode_indices": decode_indices}


# --------------------------------------------------------------------------- patch / unpatch


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _latent_channels(vae) -> int:
    try:
        return int(vae.config.latent_channels)
    except AttributeError as e:
        raise ValueError("expected a diffusers AutoencoderKL (config.latent_channels missing)") from e


def patch_autoencoder_kl(vae, K: int = 2**16, m: int | None = None, **gq_kwargs):
    """Patch any diffusers ``AutoencoderKL`` in place with Gaussian Quant + TDC.

    Args:
        vae: the ``AutoencoderKL`` (with or without ``quant_conv``).
        K: codebook size (``log2 K`` bits per sub-codebook; a power of two recommended).
        m: channels per sub-codebook; must divide ``latent_channels`` (default: all of them,
            one codebook index per latent position).
        **gq_kwargs: forwarded to :class:`~gq_plugin.GaussianQuantizer` (``grouping``,
            ``codebook``, ``seed``, ``beta``, ``tolerance``, ``lam_factor``, ``tdc_auto_step``, ...).

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
    cfg = {"format": CONFIG_FORMAT}
    cfg.update({k: v for k, v in quantizer.config().items() if k != "dim"})
    for k, v in gq_kwargs.items():
        if k in cfg:
            continue
        if isinstance(v, tuple):
            v = list(v)
        if _jsonable(v):
            cfg[k] = v
        else:
            warnings.warn(f"GQ option {k}={v!r} is not JSON-serialisable and will not be saved in the model config", stacklevel=2)
    _patch.install(vae, "diffusers", methods=_METHODS, attrs={_patch.QUANTIZER_ATTR: quantizer})
    vae.register_to_config(**{CONFIG_KEY: cfg})
    return vae


def patch_sd3_vae(vae, K: int = 2**16, m: int = 16, **gq_kwargs):
    """Patch a Stable Diffusion 3 / 3.5 VAE (16 latent channels, f8) in place.

    ``m=16, K=2**16`` gives 16 bits per latent position = 0.25 bpp; ``m=8`` -> 0.5 bpp;
    ``m=4`` -> 1.0 bpp. See :func:`suggest_gq_settings`.
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

    Only the settings are restored here; TDC multipliers come from the weights
    (:func:`load_pretrained_gq_vae` does both).
    """
    cfg = dict(config if config is not None else (gq_config(vae) or {}))
    if not cfg:
        raise ValueError(f"no '{CONFIG_KEY}' entry in the model config: this checkpoint was not saved from a GQ-patched VAE")
    fmt = cfg.pop("format", CONFIG_FORMAT)
    if fmt > CONFIG_FORMAT:
        raise ValueError(f"GQ config format {fmt} is newer than this gq-plugin understands ({CONFIG_FORMAT})")
    K = cfg.pop("codebook_size")
    m = cfg.pop("codebook_dim")
    for k in ("lam_max_range", "lam_min_range", "lam_global_range", "logvar_range"):
        if k in cfg and isinstance(cfg[k], list):
            cfg[k] = tuple(cfg[k])
    if _patch.is_patched(vae):
        unpatch(vae)
    return patch_autoencoder_kl(vae, K=K, m=m, **cfg)


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
    with _quiet_diffusers():  # the 'gq' config key and gq_quantizer.* weights are expected extras
        vae = cls.from_pretrained(path, subfolder=subfolder, variant=variant, **kwargs)
    patch_from_config(vae)
    directory = os.path.join(path, subfolder) if subfolder else path
    prefix = _patch.QUANTIZER_ATTR + "."
    state = _read_prefixed_state(directory, prefix, variant)
    if not state:
        raise ValueError(f"no '{prefix}*' tensors in the weights under {directory}")
    vae.gq_quantizer.load_state_dict(state, strict=True)
    return vae


# --------------------------------------------------------------------------- settings helper


@dataclass
class GQSetting:
    """One ``(K, m)`` choice for a model and what it costs."""

    codebook_dim: int  # m
    log2_codebook_size: int
    num_codebooks: int  # per latent position
    bits_per_token: int
    bits_per_channel: float
    bpp: float
    tokens_per_image: int
    bits_per_image: int
    recommended: bool
    note: str

    @property
    def codebook_size(self) -> int:
        return 2**self.log2_codebook_size

    def as_dict(self) -> dict:
        d = asdict(self)
        d["codebook_size"] = self.codebook_size
        return d


class GQSettings(list):
    """A list of :class:`GQSetting` with a Markdown :meth:`table`."""

    def table(self, only_recommended: bool = False) -> str:
        rows = [
            "| m | K | codebooks/token | bits/token | bits/channel | bpp | bits/image | recommended | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for s in self:
            if only_recommended and not s.recommended:
                continue
            rows.append(
                f"| {s.codebook_dim} | 2^{s.log2_codebook_size} | {s.num_codebooks} | {s.bits_per_token} | "
                f"{s.bits_per_channel:g} | {s.bpp:g} | {s.bits_per_image} | {'yes' if s.recommended else 'no'} | {s.note} |"
            )
        return "\n".join(rows)


def suggest_gq_settings(vae, image_size: int = 256, log2_codebook_sizes=(8, 10, 12, 14, 16, 18)) -> GQSettings:
    """List the ``(K, m)`` pairs for a diffusers ``AutoencoderKL`` (or its config) and their rates.

    For every ``m`` dividing ``latent_channels`` and every ``K = 2**k`` in
    ``log2_codebook_sizes``: bits per latent position (``C/m * log2 K``), bits per channel,
    bits per pixel for the model's downsampling factor ``f = 2**(len(block_out_channels) - 1)``
    and bits per ``image_size`` x ``image_size`` image. ``recommended`` marks the paper's operating
    range: 0.5 to 4 bits per channel and ``K <= 2**18`` (search cost grows with ``K * m``). Sorted
    by bpp, then by larger ``m`` (at equal bits the paper's ablation favours larger ``m``).
    This is a static table; for a data-driven choice measure channel rates and use
    :func:`gq_plugin.recommend_codebook`.

    >>> # SD3 (f8, 16 ch): m=16, K=2^16 -> 0.25 bpp; m=8 -> 0.5 bpp; m=4 -> 1.0 bpp
    """
    config = vae.config if hasattr(vae, "config") else vae
    channels = int(config["latent_channels"])
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    side = image_size // factor
    tokens = side * side
    out = GQSettings()
    for m in divisors(channels):
        for k in log2_codebook_sizes:
            g = channels // m
            bits = g * k
            per_channel = k / m
            ok = 0.5 <= per_channel <= 4.0 and k <= 18
            if per_channel > 4.0:
                note = "many bits per channel: a larger m is usually better at this rate"
            elif per_channel < 0.5:
                note = "under 0.5 bit per channel: expect a large TDC fine-tune / quality loss"
            else:
                note = ""
            out.append(
                GQSetting(
                    codebook_dim=m,
                    log2_codebook_size=k,
                    num_codebooks=g,
                    bits_per_token=bits,
                    bits_per_channel=per_channel,
                    bpp=bits / (factor * factor),
                    tokens_per_image=tokens,
                    bits_per_image=bits * tokens,
                    recommended=ok,
                    note=note,
                )
            )
    out.sort(key=lambda s: (s.bpp, -s.codebook_dim))
    return out
