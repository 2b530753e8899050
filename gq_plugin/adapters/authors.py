"""The paper authors' released GQ tokenizers as diffusers models: :func:`load_authors_checkpoint`.

The authors (``tongdaxu/VQ-VAE-from-Gaussian-VAE``) publish Lightning checkpoints of their
sgm-derived ``AutoencodingEngine`` (e.g. ``sd3unet_gq_0.25.ckpt``) with OmegaConf configs
(``configs/sd3unet_gq_{0.25,0.50,1.00}.yaml``). Their UNet tokenizer is an LDM-style conv
``Encoder``/``Decoder`` (``pit.modules.unet``) whose mid-block attention is commented out, with
no ``quant_conv``/``post_quant_conv`` and no latent scaling; its GQ regularizer stores no weights
(the codebook is regenerated from its seed). In diffusers terms that is an ``AutoencoderKL`` with
``AttnDownEncoderBlock2D``/``AttnUpDecoderBlock2D`` at the levels whose resolution is in
``attn_resolutions``, ``mid_block_add_attention=False`` and ``use_quant_conv=False``, patched
with GQ as :func:`~gq_plugin.adapters.patch_autoencoder_kl` does, with the authors' settings:
``K = n_samples``, ``m = group``, ``grouping="strided"``, ``codebook="sobol"``, their seed, beta,
logvar clamp, TDC tolerance and factor, and their TDC rule (``tdc_rule="reference"``).

The weights go through diffusers' own converters (``convert_ldm_vae_checkpoint`` and, for the
attention inside down/up blocks that it leaves unmatched, ``update_vae_attentions_ldm_to_diffusers``)
and are loaded strictly. Files are read with ``torch.load(weights_only=True)`` (a pickle that
needs anything but tensors and plain containers is refused, never executed) or safetensors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

try:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers
except ImportError as e:  # pragma: no cover - exercised only without diffusers
    raise ImportError("gq_plugin.adapters.authors needs diffusers: pip install 'gq-plugin[diffusers]'") from e

from ..quantizer import REPRESENTATION
from .diffusers_vae import patch_autoencoder_kl

AUTHORS_REPO = "tongdaxu/VQ-VAE-from-Gaussian-VAE"
REGULARIZER = "pit.quantization.gaussian.GaussianQuantRegularizer"
UNET_ENCODER, UNET_DECODER = "pit.modules.unet.Encoder", "pit.modules.unet.Decoder"
#: checkpoint prefixes: the weights we convert, and the training loss's (LPIPS, discriminator, logvar), dropped
WEIGHT_PREFIXES, DROPPED_PREFIXES = ("encoder.", "decoder."), ("loss.",)
#: the regularizer's parameters -> GQ settings (format is checked, backend only picks their kernel)
GQ_PARAMS = {"n_samples": "codebook_size", "group": "codebook_dim", "seed": "seed", "beta": "beta",
             "logvar_range": "logvar_range", "tolerance": "tolerance", "lam_factor": "lam_factor"}
_GQ_DEFAULTS = {"group": 1, "seed": 42, "beta": 1.0, "logvar_range": [-30.0, 20.0], "tolerance": 0.5, "lam_factor": 1.01}
_UNET_REQUIRED = ("ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution", "z_channels")
# settings of their Encoder/Decoder that diffusers' AutoencoderKL has only at these values (their defaults)
_UNET_FIXED = {"dropout": 0.0, "resamp_with_conv": True, "double_z": True, "use_linear_attn": False,
               "padding_mode": "zeros", "give_pre_end": False, "tanh_out": False}
_ATTN_TYPES = ("vanilla", "vanilla-xformers")  # the same weights and the same attention


def _fail(message: str):
    raise ValueError(message)


# --------------------------------------------------------------------------- the config


def read_authors_config(config) -> dict:
    """``model.params`` of one of the authors' OmegaConf configs (a YAML path, a mapping or a
    ``DictConfig``), interpolations resolved (their decoder reuses the encoder's params)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        if isinstance(config, (str, os.PathLike)):
            if not os.path.isfile(config):
                _fail(f"config {os.fspath(config)!r} is not a file (the authors' configs/sd3unet_gq_*.yaml)")
            config = OmegaConf.load(config)
        root = OmegaConf.create(config)
        node = OmegaConf.select(root, "model.params") if OmegaConf.is_dict(root) else None
        # only model.params is resolved: the rest (lightning, data) may reference what is not here
        params = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else None
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"config does not read as OmegaConf YAML ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    sections = ("encoder_config", "regularizer_config", "decoder_config")
    if not isinstance(params, dict) or not all(isinstance(params.get(k), dict) for k in sections):
        _fail("config has no model.params.encoder_config / decoder_config / regularizer_config: not one of the authors' "
              f"AutoencodingEngine configs ({AUTHORS_REPO}, configs/*.yaml)")
    return params


def _params_of(params: dict, section: str) -> dict:
    value = params[section].get("params") or {}
    if not isinstance(value, dict):
        _fail(f"config's {section}.params must be a mapping, got {value!r}")
    return dict(value)


def _unet_params(params: dict) -> dict:
    """The UNet settings (encoder params; the decoder must agree), checked against what we convert."""
    enc, dec = params["encoder_config"], params["decoder_config"]
    target = str(enc.get("target", ""))
    if "vit" in target.lower() or _params_of(params, "regularizer_config").get("format") == "blc":
        _fail(f"config is one of the authors' ViT tokenizers (bsqvit_*, encoder {target}): not converted, diffusers has no "
              "BSQ-ViT autoencoder; only their UNet tokenizers (sd3unet_gq_*) are")
    if target != UNET_ENCODER or dec.get("target") != UNET_DECODER:
        _fail(f"config's encoder/decoder are {target} / {dec.get('target')}: only the authors' UNet "
              f"({UNET_ENCODER} / {UNET_DECODER}) is converted")
    unet, theirs = _params_of(params, "encoder_config"), _params_of(params, "decoder_config")
    missing = [k for k in _UNET_REQUIRED if k not in unet]
    if missing:
        _fail(f"config's encoder_config.params lacks {missing}")
    for name in (*_UNET_REQUIRED, "ch_mult", "double_z"):
        if name in theirs and theirs[name] != unet.get(name):
            _fail(f"config: decoder {name}={theirs[name]!r} differs from encoder {name}={unet.get(name)!r}; "
                  "a diffusers AutoencoderKL shares them")
    unet.setdefault("ch_mult", [1, 2, 4, 8])  # their default
    for name, value in _UNET_FIXED.items():
        for part, given in (("encoder", unet.get(name, value)), ("decoder", theirs.get(name, value))):
            if given != value:
                _fail(f"config sets {part} {name}={given!r}: not converted (diffusers' AutoencoderKL has only {name}={value!r})")
    attn_type = unet.get("attn_type", "vanilla")
    if attn_type not in _ATTN_TYPES:
        _fail(f"config sets attn_type={attn_type!r}: only {list(_ATTN_TYPES)} attention is converted")
    return unet


def _gq_params(params: dict, z_channels: int) -> dict:
    reg = params["regularizer_config"]
    target = str(reg.get("target", ""))
    if target != REGULARIZER:
        kind = "GaussianQuantRegularizer2 (contiguous groups, STE; the sd3unet_gq2_* configs)" if target.endswith("2") else target
        _fail(f"config's regularizer is {kind}: only the authors' {REGULARIZER} (sd3unet_gq_* configs) is converted")
    given = _params_of(params, "regularizer_config")
    if given.get("format", "bchw") != "bchw":
        _fail(f"config's regularizer format={given['format']!r}: only the UNet's 'bchw' is converted")
    unknown = sorted(set(given) - set(GQ_PARAMS) - {"format", "backend"})
    if unknown:
        _fail(f"config's regularizer_config.params has settings we do not convert: {unknown}")
    if "n_samples" not in given:
        _fail("config's regularizer_config.params lacks n_samples (the codebook size K)")
    p = {**_GQ_DEFAULTS, **given}
    K, m = p["n_samples"], p["group"]
    if isinstance(K, bool) or not isinstance(K, int) or K < 2 or K & (K - 1):
        _fail(f"config sets n_samples={K!r}: the authors' codebook size must be a power of two (their TDC target is int(log2 K))")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1 or z_channels % m:
        _fail(f"config sets group={m!r}: the codebook dimension m must divide z_channels={z_channels}")
    out = {GQ_PARAMS[k]: p[k] for k in GQ_PARAMS}
    out["logvar_range"] = tuple(float(v) for v in out["logvar_range"])
    return {**out, "grouping": "strided", "codebook": "sobol", "tdc_rule": "reference"}


def authors_vae_config(config) -> tuple[dict, dict]:
    """``(diffusers_config, gq_settings)`` of one of the authors' configs.

    ``diffusers_config``: the ``AutoencoderKL`` constructor arguments of their UNet (attention
    blocks at the levels whose resolution is in ``attn_resolutions``, no mid-block attention, no
    quant convs, ``scaling_factor=1``). ``gq_settings``: the GQ settings of their regularizer
    (``codebook_size`` = ``n_samples``, ``codebook_dim`` = ``group``, strided grouping, Sobol
    codebook, their seed/beta/logvar clamp/TDC, ``tdc_rule="reference"``). ``ValueError`` names
    what is not converted: their ViT tokenizers, the ``_vf`` alignment variant, other
    regularizers, UNet options diffusers does not have.
    """
    params = read_authors_config(config)
    if params.get("use_vf"):
        _fail(f"config trains with visual-foundation alignment (use_vf={params['use_vf']!r}, the *_vf configs): not converted; "
              "its checkpoint carries the alignment model next to the tokenizer. Use the sd3unet_gq_{0.25,0.50,1.00} configs")
    for name in ("latent_stats", "clamp_range"):
        if params.get(name):
            _fail(f"config sets {name}={params[name]!r}: not converted (the authors' UNet GQ configs leave it unset)")
    unet = _unet_params(params)
    ch, mult = int(unet["ch"]), [int(v) for v in unet["ch_mult"]]
    attn = [int(unet["resolution"]) // 2**i in set(unet["attn_resolutions"]) for i in range(len(mult))]
    diffusers_config = {
        "in_channels": int(unet["in_channels"]),
        "out_channels": int(unet["out_ch"]),
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": [ch * v for v in mult],
        "layers_per_block": int(unet["num_res_blocks"]),
        "latent_channels": int(unet["z_channels"]),
        "norm_num_groups": 32,
        "sample_size": int(unet["resolution"]),
        "scaling_factor": 1.0,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": False,
    }
    return diffusers_config, _gq_params(params, int(unet["z_channels"]))


# --------------------------------------------------------------------------- the weights


def read_checkpoint(path) -> dict[str, torch.Tensor]:
    """The flat state dict of a checkpoint file: a Lightning ``.ckpt`` (its ``state_dict``), a bare
    state dict (``torch.save``) or a ``.safetensors`` file. Pickles are read with
    ``weights_only=True``: one that needs any other object is refused (``ValueError``), never run."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        _fail(f"checkpoint {path!r} is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 - SafetensorError (bad header), OSError
            _fail(f"{path} is not a readable safetensors file ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError (code refused), EOFError, RuntimeError (torn zip)
        msg = " ".join(str(exc).split())[:160]
        raise ValueError(f"{path} is not a plain weights file, refusing to load it ({type(exc).__name__}: {msg}); if you trust "
                         "the file, re-save its state_dict yourself as .safetensors") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        _fail(f"{path} holds neither a Lightning checkpoint (a 'state_dict' entry) nor a state dict of tensors")
    return dict(obj)


def _split_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``encoder.*`` / ``decoder.*`` kept, ``loss.*`` dropped, anything else named in an error."""
    other = sorted(k for k in state if not k.startswith(WEIGHT_PREFIXES + DROPPED_PREFIXES))
    if other:
        _fail(f"unexpected key(s) in the checkpoint: {_first(other)} (an authors' UNet GQ checkpoint holds only "
              f"{'*, '.join(WEIGHT_PREFIXES + DROPPED_PREFIXES)}*)")
    return {k: v for k, v in state.items() if k.startswith(WEIGHT_PREFIXES)}


def _first(keys, n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _unet_of_weights(state: Mapping[str, torch.Tensor]) -> dict:
    """The UNet settings the weights imply, each with the tensor that shows it."""

    def shape(key):
        if key not in state:
            _fail(f"checkpoint has no {key}: not the authors' UNet tokenizer layout ({UNET_ENCODER})")
        return tuple(state[key].shape)

    if any(k.startswith(("encoder.mid.attn", "decoder.mid.attn")) for k in state):
        _fail("checkpoint has a mid-block attention (mid.attn_1.*): the authors' UNet has none; this is not one of "
              "their tokenizers (a Stable Diffusion VAE loads with diffusers' AutoencoderKL.from_single_file)")
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {m.group(1) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    conv_in, conv_out = shape("encoder.conv_in.weight"), shape("encoder.conv_out.weight")
    return {
        "in_channels": (conv_in[1], f"encoder.conv_in.weight {conv_in}"),
        "out_ch": (shape("decoder.conv_out.weight")[0], f"decoder.conv_out.weight {shape('decoder.conv_out.weight')}"),
        "ch * ch_mult": ([shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels], "encoder.down.<level>.block.0.conv2.weight"),
        "num_res_blocks": (len(blocks), "encoder.down.0.block.<i>"),
        "z_channels": (conv_out[0] // 2, f"encoder.conv_out.weight {conv_out}: 2 x z_channels"),
        "attention levels": ([i for i in levels if any(k.startswith(f"encoder.down.{i}.attn.") for k in state)],
                             "encoder.down.<level>.attn.*"),
    }


def _check_weights_match(state: Mapping[str, torch.Tensor], diffusers_config: dict) -> None:
    attn = [i for i, t in enumerate(diffusers_config["down_block_types"]) if t.startswith("Attn")]
    config = {"in_channels": diffusers_config["in_channels"], "out_ch": diffusers_config["out_channels"],
              "ch * ch_mult": list(diffusers_config["block_out_channels"]), "num_res_blocks": diffusers_config["layers_per_block"],
              "z_channels": diffusers_config["latent_channels"], "attention levels": attn}
    setting = {"attention levels": "attn_resolutions (with resolution)", "ch * ch_mult": "ch / ch_mult"}
    for name, (theirs, evidence) in _unet_of_weights(state).items():
        if theirs != config[name]:
            _fail(f"config and checkpoint disagree on {setting.get(name, name)}: config gives {name} = {config[name]}, "
                  f"the checkpoint {theirs} ({evidence})")


def _ldm_to_diffusers(state: dict, diffusers_config: dict) -> dict:
    """diffusers' ``convert_ldm_vae_checkpoint``, then ``update_vae_attentions_ldm_to_diffusers`` for
    the attention inside down/up blocks (which the first leaves under its ldm name)."""
    out = convert_ldm_vae_checkpoint(state, diffusers_config)
    levels = len(diffusers_config["down_block_types"])
    for i in range(levels):
        for old, new in ((f"encoder.down.{i}.attn", f"encoder.down_blocks.{i}.attentions"),
                         (f"decoder.up.{i}.attn", f"decoder.up_blocks.{levels - 1 - i}.attentions")):
            keys = [k for k in out if k.startswith(old + ".")]
            update_vae_attentions_ldm_to_diffusers(keys, out, out, {"old": old, "new": new})
            for k in keys:
                del out[k]
    return out


def convert_authors_state_dict(state: Mapping[str, torch.Tensor], diffusers_config: dict) -> dict[str, torch.Tensor]:
    """The authors' UNet weights (``encoder.*``/``decoder.*``; ``loss.*`` dropped) -> the state dict of
    ``AutoencoderKL(**diffusers_config)``, checked key by key and shape by shape against that model.
    ``ValueError`` when the weights disagree with the config (naming the setting) or hold a key the
    conversion does not place (naming the checkpoint's key)."""
    weights = _split_weights(state)
    _check_weights_match(weights, diffusers_config)
    out = _ldm_to_diffusers(weights, diffusers_config)
    # where each converted tensor came from: the same conversion of one numbered probe per key
    names = list(weights)
    probe = {k: torch.full((1,) * weights[k].ndim, float(i), dtype=torch.float64) for i, k in enumerate(names)}
    source = {k: names[int(v.reshape(-1)[0])] for k, v in _ldm_to_diffusers(probe, diffusers_config).items()}
    with torch.device("meta"):  # the target's names and shapes, nothing allocated
        own = AutoencoderKL(**diffusers_config).state_dict()
    placed = set(source.values())
    unplaced = [k for k in names if k not in placed] + [source[k] for k in out if k not in own]
    if unplaced:
        _fail(f"unexpected key(s) in the checkpoint: {_first(unplaced)} (not part of the configured UNet)")
    missing = [k for k in own if k not in out]
    if missing:
        _fail(f"checkpoint lacks weights of the configured UNet: {_first(missing)} (diffusers names)")
    bad = [f"{source[k]} {tuple(out[k].shape)} (expected {tuple(own[k].shape)})" for k in own if out[k].shape != own[k].shape]
    if bad:
        _fail(f"checkpoint shapes disagree with the config: {_first(bad, 3)}")
    return out


def load_authors_checkpoint(ckpt_path, config_path, **patch_kwargs):
    """One of the authors' released GQ tokenizers as a GQ-patched diffusers ``AutoencoderKL``.

    Args:
        ckpt_path: their Lightning ``.ckpt`` (e.g. ``sd3unet_gq_0.25.ckpt``), a bare state dict
            or a ``.safetensors`` file with the same keys (``encoder.*``, ``decoder.*``; the
            training loss's ``loss.*`` are dropped).
        config_path: the matching config of their repository
            (``configs/sd3unet_gq_{0.25,0.50,1.00}.yaml``), or that config as a mapping.
        **patch_kwargs: runtime GQ settings for :func:`~gq_plugin.adapters.patch_autoencoder_kl`
            (e.g. ``search_backend="torch"``, ``tile_k=``); the settings that define the tokens
            (K, m, grouping, codebook, seed, beta) are the config's and cannot be overridden.

    Returns the model in eval mode, float32 on the CPU: ``encode(x).latent_dist`` is their
    posterior (moments), ``encode_indices(x)`` their indices ``(B, z_channels/m, h, w)``,
    ``decode_indices`` / ``decode`` their decoder. ``save_pretrained`` writes a folder that
    :func:`~gq_plugin.adapters.load_pretrained_gq_vae` loads back (``gq import-authors``).

    >>> vae = load_authors_checkpoint("sd3unet_gq_0.25.ckpt", "configs/sd3unet_gq_0.25.yaml")  # doctest: +SKIP
    """
    fixed = sorted(set(patch_kwargs) & {"K", "m", *REPRESENTATION})
    if fixed:
        _fail(f"{fixed} are set by the authors' config (they define the tokens); pass only runtime settings")
    diffusers_config, gq = authors_vae_config(config_path)
    converted = convert_authors_state_dict(read_checkpoint(ckpt_path), diffusers_config)
    vae = AutoencoderKL(**diffusers_config)
    vae.load_state_dict(converted, strict=True)
    settings = {**gq, **patch_kwargs}
    patch_autoencoder_kl(vae, K=settings.pop("codebook_size"), m=settings.pop("codebook_dim"), **settings)
    return vae.eval()
