"""diffusers adapter: turn a Gaussian VAE into a GQ VQ-VAE -- ``AutoencoderKL`` (SD1.x / SDXL / SD3 /
FLUX-style) and every other Gaussian VAE class diffusers ships: image, video (Wan, HunyuanVideo,
LTX, CogVideoX, Mochi, ...) and audio (Oobleck, MiniMax-H3 audio, ...); ``docs/diffusers_coverage.md``
lists them, ``AutoencoderKLCosmos`` (no variance) is refused.

The model is patched **in place**; nothing about its weights or architecture changes:

* ``vae.gq_quantizer`` -- a :class:`~gq_plugin.GaussianQuantizer` submodule (its buffers -- codebook
  fingerprint, config, TDC multipliers -- go into ``state_dict`` and the safetensors file);
* ``vae.encode(x)`` still returns the class's output (``AutoencoderKLOutput(latent_dist=posterior)``);
  the posterior is a subclass of the class's own posterior type (diffusers'
  ``DiagonalGaussianDistribution``, Oobleck's, ...) whose ``kl()`` is the per-sample TDC loss
  in training and whose ``sample()``/``mode()`` are the GQ latent in eval (see
  :mod:`gq_plugin.adapters._posterior`), so ``vae(x)``, pipelines and training loops work unchanged;
* ``vae.encode_indices(x)`` -> int64 ``(B, C/m, h, w)`` (video ``(B, C/m, T, h, w)``, audio
  ``(B, C/m, T)``: the latent's own layout, time axis kept, see :mod:`._layout`),
  ``vae.decode_indices(indices, *decode_args)`` -> the class's ``decode`` output;
* ``vae.config["gq"]`` -- the GQ settings, written to ``config.json`` by ``save_pretrained``.

GQ lives in the raw posterior space (before SD3's ``shift_factor``/``scaling_factor``), where the
KL/TDC is defined; pipelines apply their latent normalisation on top as before.
"""

from __future__ import annotations

import functools
import inspect
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
from . import _layout
from ._posterior import GQPosteriorMixin, posterior_of

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


class _GQHostPosterior(GQPosteriorMixin):
    """GQ + TDC on top of another host posterior class (``_host`` is that class): built by
    :func:`gq_posterior` from an instance, keeping its attributes (and ``isinstance``)."""

    _host: type = object

    def _gaussian_sample(self, generator=None):
        return self._host.sample(self, generator)

    def _gaussian_kl(self, other):
        host_kl = getattr(self._host, "kl", None)
        if host_kl is None:
            raise ValueError(f"{self._host.__name__} has no kl(other); kl() without an argument is the TDC loss")
        return host_kl(self, other)


@functools.lru_cache(maxsize=None)
def _gq_class(host: type) -> type:
    return type(f"GQ{host.__name__}", (_GQHostPosterior, host), {"_host": host, "__module__": __name__})


def posterior_moments(posterior, model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, logvar)`` of a diffusers posterior: its ``logvar``, or ``2 * logs`` (a log-std, as
    MiniMax-H3 audio's), or ``log(var)``; ``ValueError`` for a posterior without a variance
    (Cosmos' ``IdentityDistribution``), for which Gaussian Quant is not defined."""
    mean = getattr(posterior, "mean", None)
    if isinstance(mean, torch.Tensor):
        for name, to_logvar in (("logvar", lambda t: t), ("logs", lambda t: 2 * t), ("var", torch.log)):
            value = getattr(posterior, name, None)
            if isinstance(value, torch.Tensor):
                return mean, to_logvar(value)
    owner = f"{type(model).__name__}.encode returns" if model is not None else "got"
    raise ValueError(
        f"{owner} a {type(posterior).__name__} without a variance: Gaussian Quant needs a Gaussian posterior "
        "(mean and variance), so this VAE cannot be turned into a GQ VQ-VAE"
    )


def gq_posterior(posterior, quantizer: GaussianQuantizer, kl_scale=None, model=None):
    """The GQ version of a diffusers posterior (``DiagonalGaussianDistribution``, Oobleck's,
    MiniMax-H3 audio's, ...): an instance of a subclass of its class whose ``sample()``/``mode()``
    are the GQ latent in eval and whose ``kl()`` is the per-sample TDC loss in training."""
    if type(posterior) is DiagonalGaussianDistribution:
        return GQDiagonalGaussianDistribution(posterior.parameters, quantizer, posterior.deterministic, kl_scale)
    mean, logvar = posterior_moments(posterior, model)
    cls = _gq_class(type(posterior))
    out = cls.__new__(cls)
    out.__dict__.update(vars(posterior))
    out.mean, out.logvar = mean, logvar
    out._gq_init(quantizer, kl_scale)
    return out


# --------------------------------------------------------------------------- patched methods
# (module-level functions bound to the instance; names equal the attribute names)


def _encode_with_dict(vae, x, args, kwargs):
    """Call the class's ``encode`` with ``return_dict=True`` (when it takes one); returns its output
    and the ``return_dict`` the caller asked for, given by keyword or by position."""
    orig = _patch.original(vae, "encode")
    sig = inspect.signature(orig)
    if "return_dict" not in sig.parameters:  # (VidTok) its output has a latent_dist anyway
        return_dict = kwargs.pop("return_dict", True)
        return orig(x, *args, **kwargs), return_dict
    bound = sig.bind(x, *args, **kwargs)
    return_dict = bound.arguments.get("return_dict", True)
    bound.arguments["return_dict"] = True
    return orig(*bound.args, **bound.kwargs), return_dict


def encode(self, x: torch.Tensor, *args, **kwargs):
    """The class's ``encode`` (arguments passed on) with the posterior replaced by its GQ version."""
    out, return_dict = _encode_with_dict(self, x, args, kwargs)
    w = _patch.data(self)
    scale = None if w.get("host_kl_weight") is None else functools.partial(float, w["tdc_weight"] / w["host_kl_weight"])
    posterior = gq_posterior(posterior_of(out), self.gq_quantizer, kl_scale=scale, model=self)
    if not return_dict:
        return (posterior,)
    if hasattr(out, "latent_dist"):  # the class's own output type (AutoencoderKLOutput, Oobleck's, ...)
        out.latent_dist = posterior
        return out
    return AutoencoderKLOutput(latent_dist=posterior)


@contextmanager
def _untiled(vae):
    tiled = bool(getattr(vae, "use_tiling", False))
    vae.use_tiling = False
    try:
        yield tiled
    finally:
        vae.use_tiling = tiled


def _index_posterior(vae, x, *args, **kwargs):
    """The posterior ``encode_indices`` quantizes: the untiled encoder's, or the tiled one's for a
    class that only encodes tiled (Allegro raises ``NotImplementedError`` untiled)."""
    encode_ = _patch.original(vae, "encode")
    tiled = bool(getattr(vae, "use_tiling", False))
    try:
        with _untiled(vae):
            posterior = posterior_of(encode_(x, *args, **kwargs))
    except NotImplementedError:
        if not tiled:
            raise
        return posterior_of(encode_(x, *args, **kwargs))  # tiled encoding is this class's only encoder
    if tiled:
        warnings.warn(
            "encode_indices ignores enable_tiling(): tiled encoding blends the moments of overlapping tiles and "
            "changes the GQ tokens, so the indices come from the untiled encoder",
            UserWarning,
            stacklevel=3,
        )
    return posterior


@torch.no_grad()
def encode_indices(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """GQ indices (int64) of ``x``, channel-first like the latent: ``(B, C/m, h, w)`` for images,
    ``(B, C/m, T, h, w)`` for video, ``(B, C/m, T)`` for audio (see :mod:`._layout`).

    Extra arguments go to the class's ``encode``. Always the untiled encoding: diffusers'
    ``enable_tiling()`` blends the encoder's moments across overlapping tiles, which changes the
    tokens at most positions, so tiling is switched off for this call (and back on after it; a
    ``UserWarning`` says so); a class that cannot encode untiled (Allegro) keeps its tiled
    encoder. Encode smaller inputs if the untiled encoder does not fit in memory.
    """
    mean, logvar = posterior_moments(_index_posterior(self, x, *args, **kwargs), self)
    idx = self.gq_quantizer.encode_indices(_layout.fold(mean), _layout.fold(logvar))
    return _layout.to_host_layout(idx, mean.ndim, mean.shape[0])


def decode_indices(self, indices: torch.Tensor, *args, **decode_kwargs):
    """Decode GQ indices: ``decode(codebook[indices], *args, **decode_kwargs)``.

    ``indices`` in the layout :meth:`encode_indices` returns; extra arguments go to the class's
    ``decode`` (``num_frames`` for ``AutoencoderKLTemporalDecoder``, ``generator`` for
    ``ConsistencyDecoderVAE``, ``return_dict``).
    """
    z = self.gq_quantizer.dequant(_layout.from_host_layout(indices))
    z = _layout.unfold(z, indices.ndim, indices.shape[0]).to(self.dtype)
    return self.decode(z, *args, **decode_kwargs)


_METHODS = {"encode": encode, "encode_indices": encode_indices, "decode_indices": decode_indices}


# --------------------------------------------------------------------------- patch / unpatch

#: config entries that name the latent channels, by class (the first one a config has is used)
CHANNEL_KEYS = ("latent_channels", "z_dim", "z_channels", "codebook_dim", "decoder_input_channels", "vocoder_input_dim")
#: classes whose ``encode`` returns a posterior without a variance (GQ does not apply)
NO_VARIANCE = {"AutoencoderKLCosmos": "IdentityDistribution"}


def _config_channels(vae) -> int | None:
    """The first of :data:`CHANNEL_KEYS` in ``vae.config`` (None if it has none)."""
    config = getattr(vae, "config", None)
    for key in CHANNEL_KEYS:
        value = getattr(config, key, None) if config is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _latent_channels(vae, given: int | None = None) -> int:
    """The latent channels C: ``given``, else the first of :data:`CHANNEL_KEYS` in ``vae.config``."""
    channels = _config_channels(vae)
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise ValueError(f"latent_channels must be a positive int, got {given!r}")
        if channels is not None and channels != given:
            raise ValueError(f"latent_channels={given} disagrees with the {channels} latent channels in the config of {type(vae).__name__}")
        return given
    if channels is not None:
        return channels
    raise ValueError(
        f"cannot tell the latent channels of {type(vae).__name__}: its config has none of {list(CHANNEL_KEYS)}; "
        "pass latent_channels= (the channels of encode(x).latent_dist.mean)"
    )


def _check_gaussian(vae) -> None:
    name = type(vae).__name__
    if name in NO_VARIANCE:
        raise ValueError(
            f"{name}.encode returns a {NO_VARIANCE[name]} without a variance: Gaussian Quant needs a Gaussian "
            "posterior (mean and variance), so this VAE cannot be turned into a GQ VQ-VAE"
        )


def patch_autoencoder_kl(vae, K: int = 2**16, m: int | None = None, *, host_kl_weight: float | None = None,
                         tdc_weight: float = 1.0, latent_channels: int | None = None, **gq_kwargs):
    """Patch any diffusers Gaussian VAE in place with Gaussian Quant + TDC.

    Every class diffusers ships whose ``encode`` returns a Gaussian posterior works: image
    (``AutoencoderKL``, Flux2, ...), video (Wan, HunyuanVideo, LTX, CogVideoX, Mochi, ...; indices
    ``(B, G, T, h, w)``) and audio (Oobleck, MiniMax-H3 audio, KVAE audio, ...; indices
    ``(B, G, T)``), see ``docs/diffusers_coverage.md``. A class whose posterior has no variance
    (Cosmos) is refused with a ``ValueError``.

    Args:
        vae: the diffusers VAE (``AutoencoderKL`` with or without ``quant_conv``, or any other
            Gaussian VAE class).
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
        latent_channels: the latent channels C, for a class whose config names them under none of
            :data:`CHANNEL_KEYS` (default: read from the config).

    Returns the same ``vae`` (patched).
    """
    _check_gaussian(vae)
    channels = _latent_channels(vae, latent_channels)
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
    channels = _config_channels(vae)
    channels = _latent_channels(vae, cfg.get("dim") if channels is None else channels)
    cfg.setdefault("dim", channels)  # format 1 did not store it
    settings = GQConfig.from_dict(cfg)
    if settings.dim != channels:
        raise ValueError(f"config['{CONFIG_KEY}'] is for {settings.dim} latent channels, this model has {channels}")
    if _patch.is_patched(vae):
        unpatch(vae)
    return patch_autoencoder_kl(vae, **_patch.to_patch_kwargs(settings.flat()), latent_channels=channels, **weights)


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


def _saved_class(directory: str):
    """The diffusers class named by ``_class_name`` in ``directory/config.json`` (AutoencoderKL when absent)."""
    config_file = os.path.join(directory, "config.json")
    name = None
    if os.path.isfile(config_file):
        with open(config_file) as f:
            name = json.load(f).get("_class_name")
    if not name:
        return AutoencoderKL
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{config_file} names the class {name!r}, which diffusers {diffusers.__version__} does not have; pass cls=")
    return cls


def load_pretrained_gq_vae(path: str, subfolder: str | None = None, variant: str | None = None, cls=None, **kwargs):
    """``cls.from_pretrained`` + re-patch from ``config["gq"]`` + restore the GQ buffers.

    ``path`` is a local directory written by ``save_pretrained`` of a patched VAE (download Hub
    repos first, e.g. with ``huggingface_hub.snapshot_download``). ``cls`` is the diffusers class
    (default: the one ``config.json`` names, e.g. ``AutoencoderKLWan``). The TDC multipliers, the
    codebook fingerprint and the GQ config buffer are read from the same safetensors file; a
    checkpoint made with a different codebook is refused (``ValueError``). The model comes back in
    eval mode (as ``from_pretrained`` returns it), GQ included.
    """
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a local directory (download Hub checkpoints first)")
    directory = os.path.join(path, subfolder) if subfolder else path
    cls = cls or _saved_class(directory)
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
