"""Prior configs (OmegaConf): :data:`PRIOR_DEFAULTS` <- an optional YAML file <- ``key=value`` overrides.

Sections: ``model`` (the x-transformers decoder: ``dim``, ``depth``, ``heads``, ``dim_head``,
``dropout``), ``optim`` (AdamW; ``warmup_steps`` then the ``lr_schedule`` of ``gq train``), ``train``
(``steps``, ``batch_size``, ``log_every``, ``ckpt_every``, ``eval_every``, ``cpu``,
``mixed_precision``), ``data`` (``eval_tokens``: a held-out ``gq tokenize`` folder, measured in bits
per image during and after training; ``eval_max_images``). The defaults are a small prior that
trains in minutes on a CPU.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from ..schedule import check_schedule

PRIOR_DEFAULTS = {
    "name": "prior",
    "seed": 0,
    "model": {"dim": 128, "depth": 4, "heads": 4, "dim_head": 32, "dropout": 0.0},
    "optim": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.01, "grad_clip": 1.0, "warmup_steps": 50,
              "lr_schedule": "cosine", "lr_final_frac": 0.1},
    "train": {"steps": 1000, "batch_size": 32, "log_every": 25, "ckpt_every": 250, "eval_every": 0, "cpu": False,
              "mixed_precision": "no"},
    "data": {"eval_tokens": None, "eval_max_images": 1024},
}

_POSITIVE = ("model.dim", "model.depth", "model.heads", "model.dim_head", "train.steps", "train.batch_size")
_NON_NEGATIVE = ("optim.warmup_steps", "train.log_every", "train.ckpt_every", "train.eval_every", "data.eval_max_images")


def load_prior_config(cfg: DictConfig | dict | str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge :data:`PRIOR_DEFAULTS` <- ``cfg`` (a YAML path, a dict or None) <- dotlist ``overrides``
    (``train.steps=100``); unknown keys and out-of-range values raise ``ValueError`` naming them."""
    base = OmegaConf.create(PRIOR_DEFAULTS)
    if cfg is None:
        user = OmegaConf.create({})
    elif isinstance(cfg, (str, os.PathLike)):
        if not os.path.isfile(cfg):
            raise ValueError(f"--config {str(cfg)!r} is not a file")
        user = OmegaConf.load(cfg)
    else:
        user = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    for bad in overrides or []:
        if "=" not in bad:
            raise ValueError(f"override {bad!r} is not key=value (e.g. train.steps=100)")
    merged = OmegaConf.merge(base, user, OmegaConf.from_dotlist(list(overrides or [])))
    _validate(merged)
    return merged


def _validate(cfg: DictConfig) -> None:
    unknown = set(cfg.keys()) - set(PRIOR_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown prior config section(s) {sorted(unknown)}; valid: {sorted(PRIOR_DEFAULTS)}")
    for section, keys in PRIOR_DEFAULTS.items():
        if isinstance(keys, dict):
            extra = set(cfg[section].keys()) - set(keys)
            if extra:
                raise ValueError(f"unknown key(s) in {section}: {sorted(extra)}; valid: {sorted(keys)}")
    for names, lo in ((_POSITIVE, 1), (_NON_NEGATIVE, 0)):
        for name in names:
            v = OmegaConf.select(cfg, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not float(cfg.optim.lr) > 0:
        raise ValueError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if not 0.0 <= float(cfg.model.dropout) < 1.0:
        raise ValueError(f"model.dropout must lie in [0, 1), got {cfg.model.dropout}")
    check_schedule(cfg.optim.lr_schedule, cfg.optim.lr_final_frac)
