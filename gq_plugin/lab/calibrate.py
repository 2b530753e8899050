"""Decoder calibration: fine-tune the decoder alone on the GQ codewords of a trained run.

A TDC fine-tune trains the decoder on continuous posterior samples; after the conversion it decodes
GQ codewords it has never seen. Calibration closes that gap: the encoder, the quantizer (codebook,
TDC state) and therefore every token stay exactly as they are; only the decoder (and
``post_quant_conv``) is trained, on ``decode(z_hat)`` of the eval-mode GQ latents of the training
crops, with the run's own reconstruction loss (its L1 and LPIPS weights; a GAN term of the run is
not used).

    gq calibrate RUN --out RUN2 [steps=200 lr=... lr_scale=0.3 batch_size=... ckpt_every=50 log_every=10 seed=...]

The LR defaults to 0.3 times the run's own ``optim.lr``: on the from-pretrained protocol (issue #26,
campaign h26: two pretrained VAEs x 3 seeds x both TDC rules) 0.3 x gave a higher GQ PSNR than 1 x on
all 12 pairs (+0.01 to +0.25 dB) and 3 x lost 0.9 dB; a fresh Adam at the fine-tune's full LR moves a
decoder that is already close to its optimum too far.

``RUN`` is a ``gq train`` output folder (``config.yaml`` + ``final/`` or ``checkpoint-<step>/``) or
one of its checkpoint folders. ``RUN2`` is written like a training run (``config.yaml``,
``checkpoint-<step>/``, ``final``, ``metrics.jsonl``) plus ``calibrate.json``, so ``gq eval
RUN2/config.yaml RUN2/final``, ``gq encode --model RUN2/final`` and ``gq tokenize RUN2/final ...``
accept it. Checkpoints every ``ckpt_every`` steps; ``--resume latest`` continues an interrupted
calibration exactly (same weights as an uninterrupted run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import ClassVar

import torch
from omegaconf import OmegaConf

CALIBRATION_FILE = "calibrate.json"


@dataclasses.dataclass
class CalibrationSettings:
    """``steps`` decoder updates of ``batch_size`` crops at a constant ``lr`` (``None``: ``lr_scale``
    times the run's ``optim.lr``; ``batch_size`` / ``seed`` ``None``: the run's ``train.batch_size`` /
    ``seed``); a checkpoint every ``ckpt_every`` steps (0: only the final one); a ``metrics.jsonl`` line
    every ``log_every`` steps."""

    steps: int = 200
    lr: float | None = None
    lr_scale: float = 0.3
    batch_size: int | None = None
    seed: int | None = None
    ckpt_every: int = 50
    log_every: int = 10

    FLOAT_KEYS: ClassVar[tuple[str, ...]] = ("lr", "lr_scale")  # parsed as numbers; the other settings as whole numbers

    @classmethod
    def from_overrides(cls, overrides: list[str] | None) -> CalibrationSettings:
        """Parse ``key=value`` strings; ``ValueError`` naming a malformed or unknown key or a bad value."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict = {}
        for item in overrides or []:
            key, sep, val = str(item).partition("=")
            if not sep or not key:
                raise ValueError(f"calibration setting {item!r} is not key=value; keys: {', '.join(sorted(names))}")
            if key not in names:
                raise ValueError(f"unknown calibration setting {key!r}; keys: {', '.join(sorted(names))}")
            try:
                kw[key] = float(val) if key in cls.FLOAT_KEYS else int(val)
            except ValueError:
                raise ValueError(f"calibration setting {key}={val!r} is not a {'number' if key in cls.FLOAT_KEYS else 'whole number'}") from None
        return cls(**kw).checked()

    def checked(self) -> CalibrationSettings:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise ValueError(f"lr_scale must be finite and > 0, got {self.lr_scale}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.ckpt_every < 0 or self.log_every < 1:
            raise ValueError(f"ckpt_every must be >= 0 and log_every >= 1, got {self.ckpt_every} and {self.log_every}")
        return self


def source_of(run: str | os.PathLike) -> tuple[Path, Path]:
    """``(config.yaml, checkpoint dir)`` of a training run folder or of one of its checkpoints
    (the run's ``final``, else its newest loadable ``checkpoint-<step>``); ``ValueError`` otherwise."""
    from .train import latest_checkpoint

    p = Path(run)
    if not p.is_dir():
        raise ValueError(f"RUN {str(run)!r} is not a directory (a `gq train` output folder)")
    if (p / "vae").is_dir() and (p.parent / "config.yaml").is_file():  # a checkpoint of a run
        return p.parent / "config.yaml", p
    if not (p / "config.yaml").is_file():
        raise ValueError(f"RUN {str(run)!r} holds no config.yaml: pass a `gq train` output folder or one of its checkpoint-<step> folders")
    ckpt = p / "final" if (p / "final" / "vae").is_dir() else latest_checkpoint(p)
    if ckpt is None:
        raise ValueError(f"RUN {str(run)!r} holds no checkpoint (final/ or checkpoint-<step>/)")
    return p / "config.yaml", ckpt


def calibrate(run: str | os.PathLike, out: str | os.PathLike, overrides: list[str] | None = None, resume: str | None = None,
              progress: bool = True) -> dict:
    """Calibrate the decoder of the GQ model in ``run`` and write the run folder ``out``.

    Args:
        run: a ``gq train`` output folder (or one of its checkpoint folders) holding a GQ model.
        out: the new run folder (must differ from ``run``).
        overrides: ``key=value`` :class:`CalibrationSettings`.
        resume: ``"latest"`` (or a checkpoint folder of ``out``) continues an interrupted
            calibration; without it an ``out`` that already holds checkpoints is refused.
        progress: show a tqdm bar.

    Returns the last logged values plus ``checkpoint`` (``out/checkpoint-<steps>``), ``output_dir``,
    ``train_time_s`` (this call) and ``source``.
    """
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..adapters import GQAutoencoderWrapper
    from .config import load_config
    from .data import ResumableSampler
    from .models import build_autoencoder_kl
    from .train import build_datasets, latest_checkpoint, load_training_state, point_final, save_checkpoint

    st = CalibrationSettings.from_overrides(overrides)
    cfg_file, src_ckpt = source_of(run)
    out = Path(out)
    if out.resolve() == Path(run).resolve() or out.resolve() == cfg_file.parent.resolve():
        raise ValueError(f"--out {str(out)!r} must differ from RUN (calibration writes a new run folder)")
    cfg = load_config(cfg_file)
    if cfg.quantizer.name != "gq":
        raise ValueError(f"RUN {str(run)!r} was trained with quantizer {cfg.quantizer.name!r}: calibration needs a GQ model (quantizer.name=gq)")
    lr = float(st.lr if st.lr is not None else st.lr_scale * float(cfg.optim.lr))
    bs = int(st.batch_size if st.batch_size is not None else cfg.train.batch_size)
    seed = int(st.seed if st.seed is not None else cfg.seed)
    meta = {"source": str(src_ckpt), "steps": st.steps, "lr": lr, "batch_size": bs, "seed": seed,
            "loss": {"l1": float(cfg.loss.l1), "lpips": float(cfg.loss.lpips), "lpips_net": str(cfg.loss.lpips_net)}}

    state, model_dir = None, src_ckpt / "vae"
    existing = latest_checkpoint(out, quiet=True)
    if resume is None and existing is not None:
        raise ValueError(f"--out {str(out)!r} already holds {existing.name}: pass --resume latest to continue it, or choose another --out")
    if resume is not None:
        ck = existing if resume == "latest" else Path(resume)
        if ck is not None:
            try:
                state = load_training_state(ck)
            except ValueError as e:
                raise ValueError(f"resume: {e}") from None
            old = json.loads((out / CALIBRATION_FILE).read_text()) if (out / CALIBRATION_FILE).is_file() else None
            diff = sorted(k for k in meta if k != "steps" and old is not None and old.get(k) != meta[k])  # more steps: fine
            if diff:
                raise ValueError(f"resume: {out} was calibrated with other settings ({', '.join(diff)} differ); choose another --out")
            model_dir = ck / "vae"

    acc = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(seed)
    vae = build_autoencoder_kl({"pretrained": str(model_dir)})
    quantizer = getattr(vae, "gq_quantizer", None)
    if quantizer is None:
        raise ValueError(f"RUN {str(run)!r}: {model_dir} is not a GQ model")
    vae.requires_grad_(False)
    trainable = [m for m in (vae.decoder, getattr(vae, "post_quant_conv", None)) if m is not None]
    for m in trainable:
        m.requires_grad_(True)
    params = [p for m in trainable for p in m.parameters()]
    wrapper = GQAutoencoderWrapper(vae)  # save_checkpoint saves wrapper.model
    vae.to(acc.device)
    ocfg = cfg.optim
    opt = torch.optim.Adam(params, lr=lr, betas=tuple(ocfg.get("betas", (0.5, 0.9))), weight_decay=float(ocfg.get("weight_decay", 0.0)))
    from .losses import ReconstructionLoss

    loss_fn = ReconstructionLoss(l1=meta["loss"]["l1"], lpips=meta["loss"]["lpips"], lpips_net=meta["loss"]["lpips_net"]).to(acc.device)
    dataset = build_datasets(cfg.data, "train")
    step = start_step = int(state["step"]) if state is not None else 0
    start_samples = int(state.get("samples_seen") or step * bs) if state is not None else 0
    sampler = ResumableSampler(len(dataset), seed=seed, start=start_samples)
    loader = DataLoader(dataset, batch_size=bs, sampler=sampler, drop_last=True, generator=torch.Generator().manual_seed(seed))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])

    out.mkdir(parents=True, exist_ok=True)
    cfg.train.output_dir = str(out)
    OmegaConf.save(cfg, out / "config.yaml")
    (out / CALIBRATION_FILE).write_text(json.dumps(meta, indent=2))
    for leftover in out.glob("checkpoint-*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    vae.eval()  # encoder and quantizer in eval mode: GQ codewords, not samples
    vae.decoder.train()
    grad_clip = ocfg.get("grad_clip")
    batches = iter(loader)
    pbar = tqdm(total=st.steps, initial=step, disable=not progress, desc="calibrate", dynamic_ncols=True)
    t0, last = time.time(), {}
    while step < st.steps:
        x = next(batches)
        x = (x[0] if isinstance(x, (list, tuple)) else x).to(acc.device)
        with torch.no_grad():
            z_hat, _ = vae.encode(x).latent_dist.quantize()
        rec = vae.decode(z_hat).sample
        loss, logs = loss_fn.nll(x, rec)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, float(grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        pbar.update(1)
        if step % st.log_every == 0 or step == st.steps:
            last = {"step": step, "rec": float(loss.detach()), **{k: float(v) for k, v in logs.items()}, "lr": lr, "elapsed_s": time.time() - t0}
            pbar.set_postfix({k: f"{last[k]:.3g}" for k in ("l1", "lpips") if k in last})
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(last) + "\n")
        if st.ckpt_every and step % st.ckpt_every == 0 and step < st.steps:
            save_checkpoint(acc, wrapper, opt, None, None, step, out / f"checkpoint-{step}", samples_seen=start_samples + (step - start_step) * bs)
    pbar.close()
    final = save_checkpoint(acc, wrapper, opt, None, None, step, out / f"checkpoint-{step}",
                            samples_seen=start_samples + (step - start_step) * bs)
    point_final(out, final)
    return {**last, "output_dir": str(out), "checkpoint": str(final), "train_time_s": time.time() - t0, "source": str(src_ckpt)}


__all__ = ["CalibrationSettings", "calibrate", "source_of"]
