"""Recipe configs (OmegaConf): defaults + a YAML file + ``key=value`` overrides.

Recipes live in ``recipes/*.yaml`` (the repository) and are also shipped inside the package
(``gq_plugin/recipes``), so ``gq train tiny_cpu`` works from a wheel install. Sections:
``model`` (diffusers AutoencoderKL ``config`` or local ``pretrained`` dir), ``quantizer`` (registry
name + GQ/TDC settings), ``loss`` (L1, LPIPS, optional PatchGAN), ``optim``, ``train``, ``data``,
``eval``.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..quantizer import GQConfig
from .schedule import check_schedule

DEFAULTS = {
    "name": "recipe",
    "seed": 0,
    "model": {"pretrained": None, "subfolder": None, "config": {}, "train_encoder": True, "train_decoder": True},
    # the other GQ/TDC settings (grouping, seed, beta, tolerance, lam_factor, search_backend, ...)
    # take their names and defaults from gq_plugin.quantizer.GQConfig
    "quantizer": {"name": "gq", "codebook_size": 4096, "codebook_dim": 16, "weight": 0.1},
    "loss": {"l1": 1.0, "lpips": 0.0, "lpips_net": "alex", "disc": {"enabled": False, "start_step": 0, "weight": 0.5, "channels": 64, "layers": 3}},
    "optim": {"lr": 1e-4, "betas": [0.5, 0.9], "weight_decay": 0.0, "grad_clip": 1.0, "lr_schedule": "constant", "lr_final_frac": 0.1},
    "train": {
        "steps": 1000,
        "batch_size": 16,
        "grad_accum": 1,
        "num_workers": 0,
        "mixed_precision": "no",
        "cpu": False,
        "log_every": 25,
        "ckpt_every": 0,
        "output_dir": "runs/recipe",
        "save_rank_states": False,
    },
    "data": {"root": None, "size": 64, "resize": None, "scale_range": None, "crops_per_image": 1, "eval_crops_per_image": 1,
             "eval_fraction": 0.15, "split_seed": 0, "cache": True},
    "eval": {"batch_size": 16, "max_images": 256, "grid_images": 8, "lpips": True, "distribution": True},
}


def recipes_dir() -> Path:
    """Directory of the bundled recipes."""
    here = Path(__file__).resolve().parent.parent / "recipes"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parent.parent.parent / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """A YAML path, or the name of a bundled recipe (``tiny_cpu`` -> recipes/tiny_cpu.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = recipes_dir() / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if candidate.is_file():
        return candidate
    raise ValueError(f"recipe {str(name_or_path)!r} not found: not a file, and not one of {list_recipes()}")


def load_config(cfg: DictConfig | dict | str | os.PathLike, overrides: list[str] | None = None) -> DictConfig:
    """Merge defaults <- recipe <- dotlist overrides (``train.steps=10``); validates key names."""
    base = OmegaConf.create(DEFAULTS)
    if isinstance(cfg, (str, os.PathLike)):
        user = OmegaConf.load(resolve_recipe(cfg))
    elif isinstance(cfg, dict):
        user = OmegaConf.create(cfg)
    else:
        user = cfg
    merged = OmegaConf.merge(base, user)
    if overrides:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    _validate(merged)
    return merged


#: baseline quantizer arguments a recipe's ``quantizer`` section may carry (registry builders)
BASELINE_KEYS = ("bits_per_token", "levels", "bits", "aux_weight", "kmeans_init", "decay", "commitment_weight",
                 "entropy_loss_weight", "frac_per_sample_entropy", "scale", "quant_min", "quant_max", "std_range",
                 "lookup_dim", "use_cosine_sim", "rotation_trick", "threshold_ema_dead_code", "kmeans_iters",
                 "dead_code_threshold_ratio", "kmeans_init_vectors")


def gq_recipe_settings(qcfg) -> dict:
    """The GQ settings a recipe's ``quantizer`` section sets (GQConfig names, None dropped)."""
    names = set(GQConfig.names()) - {"dim", "codebook_size", "codebook_dim"}
    return {k: qcfg[k] for k in qcfg if k in names and qcfg[k] is not None}


def _validate(cfg: DictConfig) -> None:
    for section in ("model", "quantizer", "loss", "optim", "train", "data", "eval"):
        valid = set(DEFAULTS[section])
        if section == "quantizer":
            valid |= set(GQConfig.names()) | set(BASELINE_KEYS)
        unknown = set(cfg[section].keys()) - valid
        if unknown:
            raise ValueError(f"unknown key(s) in {section}: {sorted(unknown)}; valid: {sorted(valid)}")
    q = cfg.quantizer
    if q.name == "gq":  # the settings are checked by GQConfig, the one place that validates them
        channels = (cfg.model.get("config") or {}).get("latent_channels") or q.codebook_dim
        try:
            GQConfig.from_dict({"dim": int(channels), "codebook_size": q.codebook_size, "codebook_dim": q.codebook_dim,
                                **OmegaConf.to_container(OmegaConf.create(gq_recipe_settings(q)))})
        except ValueError as e:
            raise ValueError(f"quantizer: {e}") from None
    check_schedule(cfg.optim.lr_schedule, cfg.optim.lr_final_frac)
    if int(cfg.train.steps) < 1:
        raise ValueError(f"train.steps must be >= 1, got {cfg.train.steps}")
    if int(cfg.train.batch_size) < 1:
        raise ValueError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    if int(cfg.data.size) < 1:  # an H = W = 0 crop would only fail deep inside the model
        raise ValueError(f"data.size must be >= 1, got {cfg.data.size}")
