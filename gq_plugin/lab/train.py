"""Fine-tune a Gaussian VAE with TDC (or a baseline bottleneck) under Hugging Face accelerate.

One process or many: ``gq train recipe.yaml`` runs on one CPU/GPU; ``accelerate launch
[--multi_gpu|--cpu] --num_processes N -m gq_plugin.lab.cli train recipe.yaml`` runs DDP. The
encode -> bottleneck -> decode path goes through the wrapper's ``forward`` so DDP synchronises
every gradient (the diffusers example's ``unwrap_model(vae).encode`` pitfall is avoided), and the
TDC multipliers are stepped once per autoencoder optimizer step with all-reduced statistics, so
every rank holds identical weights and multipliers.

Outputs under ``train.output_dir``: ``checkpoint-<step>/`` (``vae/`` = ``save_pretrained`` of the
model, GQ settings and TDC buffers included; ``training_state.pt`` = optimizers, step, RNG),
``final/vae``, ``metrics.jsonl`` (losses, rate statistics incl. the band shares ``band-in`` / ``band-over`` /
``band-under`` and quantiles ``bits-qNN``, multipliers), ``rates_hist.png``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..rate import band_statistics
from .config import load_config
from .losses import ReconstructionLoss
from .models import build_model


def _infinite(loader, start_epoch: int = 0):
    epoch = start_epoch
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            yield batch
        epoch += 1


def _images(batch):
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        return batch["image"]
    return batch


def _rates_of(out):
    """Per-group rates of the batch's posterior (GQ posteriors), else None."""
    post = out.posterior
    if callable(getattr(post, "rates", None)):
        return post.rates()
    return None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-<step>`` directory with the largest step under ``output_dir``."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    ckpts = [p for p in out.glob("checkpoint-*") if (p / "training_state.pt").is_file() and p.name.split("-")[-1].isdigit()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def build_datasets(data_cfg, split: str):
    """Train / eval dataset of real photos from the recipe's ``data`` section."""
    from .data import PhotoDataset, default_data_dir

    root = data_cfg.get("root") or default_data_dir()
    scale = data_cfg.get("scale_range")
    return PhotoDataset(
        root,
        split=split,
        size=int(data_cfg.get("size", 64)),
        eval_fraction=float(data_cfg.get("eval_fraction", 0.15)),
        seed=int(data_cfg.get("split_seed", 0)),
        resize=data_cfg.get("resize"),
        scale_range=tuple(scale) if scale else None,
        crops_per_image=int(data_cfg.get("crops_per_image" if split == "train" else "eval_crops_per_image", 1)),
        cache=bool(data_cfg.get("cache", True)),
    )


def train(cfg: DictConfig | str | os.PathLike, overrides: list[str] | None = None, resume: str | None = None, progress: bool = True) -> dict:
    """Run a recipe's training; returns the final logged values (and the output paths)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    cfg = load_config(cfg, overrides)
    tcfg, qcfg = cfg.train, cfg.quantizer
    acc = Accelerator(
        mixed_precision=tcfg.get("mixed_precision", "no"),
        gradient_accumulation_steps=int(tcfg.get("grad_accum", 1)),
        # without CUDA, cpu=True is what makes accelerate use gloo (MULTI_CPU) under a launcher
        cpu=bool(tcfg.get("cpu", False)) or not torch.cuda.is_available(),
    )
    out_dir = Path(tcfg.output_dir)
    if resume == "latest":
        resume = latest_checkpoint(out_dir)
    if resume is not None:
        resume = Path(resume)
        if not (resume / "training_state.pt").is_file():
            raise ValueError(f"resume: {resume} is not a checkpoint directory (no training_state.pt)")
        cfg.model.pretrained = str(resume / "vae")

    set_seed(int(cfg.seed))  # identical initialisation on every rank
    vae, wrapper = build_model(cfg)
    is_gq = qcfg.name == "gq"
    reg_weight = float(qcfg.get("weight", 0.1)) if is_gq else 1.0
    lcfg = cfg.loss
    disc_cfg = lcfg.get("disc") or {}
    loss_fn = ReconstructionLoss(
        l1=float(lcfg.get("l1", 1.0)),
        lpips=float(lcfg.get("lpips", 0.0)),
        lpips_net=lcfg.get("lpips_net", "alex"),
        disc_start=disc_cfg.get("start_step") if disc_cfg.get("enabled", False) else None,
        disc_weight=float(disc_cfg.get("weight", 0.5)),
        disc_channels=int(disc_cfg.get("channels", 64)),
        disc_layers=int(disc_cfg.get("layers", 3)),
    )
    ocfg = cfg.optim
    params = [p for p in wrapper.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=float(ocfg.lr), betas=tuple(ocfg.get("betas", (0.5, 0.9))), weight_decay=float(ocfg.get("weight_decay", 0.0)))
    disc = loss_fn.discriminator
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(disc_cfg.get("lr", ocfg.lr)), betas=(0.5, 0.9)) if disc is not None else None

    dataset = build_datasets(cfg.data, "train")
    gen = torch.Generator().manual_seed(int(cfg.seed))
    loader = DataLoader(
        dataset, batch_size=int(tcfg.batch_size), shuffle=True, drop_last=True, num_workers=int(tcfg.get("num_workers", 0)), generator=gen
    )
    if disc is not None:
        wrapper, opt, loader, disc, opt_d = acc.prepare(wrapper, opt, loader, disc, opt_d)
        loss_fn.discriminator = disc
    else:
        wrapper, opt, loader = acc.prepare(wrapper, opt, loader)
    loss_fn.to(acc.device)
    quantizer = getattr(vae, "gq_quantizer", None)

    step = 0
    if resume is not None:
        state = torch.load(resume / "training_state.pt", map_location="cpu", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        if opt_d is not None and state.get("optimizer_d") is not None:
            opt_d.load_state_dict(state["optimizer_d"])
            acc.unwrap_model(disc).load_state_dict(state["discriminator"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"])

    steps = int(tcfg.steps)
    log_every, ckpt_every = int(tcfg.get("log_every", 25)), int(tcfg.get("ckpt_every", 0) or 0)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out_dir / "config.yaml")
    metrics_path = out_dir / "metrics.jsonl"
    last_layer = acc.unwrap_model(wrapper).model.decoder.conv_out.weight
    batches = _infinite(loader, start_epoch=step)
    pbar = tqdm(total=steps, initial=step, disable=not (progress and acc.is_local_main_process), desc=f"train {cfg.get('name', '')}", dynamic_ncols=True)
    last_logs: dict = {}
    last_rates = None
    t0 = time.time()
    wrapper.train()
    while step < steps:
        x = _images(next(batches))
        with acc.accumulate(wrapper):
            out = wrapper(x)
            rec, logs = loss_fn.generator_loss(x, out.sample, step, last_layer)
            loss = rec + reg_weight * out.loss
            acc.backward(loss)
            if acc.sync_gradients and ocfg.get("grad_clip"):
                acc.clip_grad_norm_(params, float(ocfg.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
        if not acc.sync_gradients:
            continue
        if quantizer is not None:
            quantizer.tdc_step()  # once per AE optimizer step; all-reduced under DDP
        if loss_fn.gan_active(step):
            d_loss = loss_fn.discriminator_loss(x, out.sample)
            acc.backward(d_loss)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            logs["d_loss"] = d_loss.detach()
        step += 1
        pbar.update(1)
        if step % log_every == 0 or step == steps:
            rates = _rates_of(out)
            last_rates = rates.detach().cpu() if rates is not None else last_rates
            entry = {"step": step, "loss": float(loss.detach()), "rec": float(rec.detach()), "reg": float(out.loss.detach())}
            entry.update({k: float(v) for k, v in logs.items()})
            if quantizer is not None:
                entry.update(quantizer.tdc.log_dict())
                if rates is not None:  # shares in band / over / under budget and quantiles of this batch
                    entry.update(band_statistics(rates, quantizer.tdc.target_bits, quantizer.tdc.tolerance).as_dict())
            elif rates is not None:
                entry.update({"bits-mean": float(rates.mean()), "bits-min": float(rates.min()), "bits-max": float(rates.max())})
            entry["elapsed_s"] = time.time() - t0
            last_logs = entry
            pbar.set_postfix({k: f"{entry[k]:.3g}" for k in ("rec", "bits-mean", "bits-q99", "band-over", "lam") if k in entry})
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
        if ckpt_every and step % ckpt_every == 0 and step < steps:
            save_checkpoint(acc, wrapper, opt, disc, opt_d, step, out_dir / f"checkpoint-{step}")
    pbar.close()
    if tcfg.get("save_rank_states"):  # per-rank weights + TDC buffers, to check DDP consistency
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in acc.unwrap_model(wrapper).model.state_dict().items()}, out_dir / f"rank{acc.process_index}.pt")
    final = save_checkpoint(acc, wrapper, opt, disc, opt_d, step, out_dir / f"checkpoint-{step}")
    if acc.is_main_process:
        final_link = out_dir / "final"
        if final_link.is_symlink() or final_link.exists():
            final_link.unlink()
        final_link.symlink_to(final.name)
        if last_rates is not None:
            from .plots import plot_rate_histogram

            target = math.log2(int(qcfg.codebook_size)) if qcfg.get("codebook_size") else None
            plot_rate_histogram({qcfg.name: last_rates}, out_dir / "rates_hist.png", target=target, tolerance=float(qcfg.get("tolerance", 0.5)))
    acc.wait_for_everyone()
    last_logs.update({"output_dir": str(out_dir), "checkpoint": str(final), "train_time_s": time.time() - t0})
    acc.end_training()
    return last_logs


def save_checkpoint(acc, wrapper, opt, disc, opt_d, step: int, path: Path) -> Path:
    """Write ``path/vae`` (save_pretrained) and ``path/training_state.pt`` on the main process."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        vae = acc.unwrap_model(wrapper).model
        vae.save_pretrained(path / "vae")
        state = {
            "step": step,
            "optimizer": opt.state_dict(),
            "optimizer_d": opt_d.state_dict() if opt_d is not None else None,
            "discriminator": acc.unwrap_model(disc).state_dict() if disc is not None else None,
            "rng": torch.get_rng_state(),
        }
        torch.save(state, path / "training_state.pt")
        from .models import QUANTIZER_STATE, QuantizedAutoencoderWrapper

        unwrapped = acc.unwrap_model(wrapper)
        if isinstance(unwrapped, QuantizedAutoencoderWrapper):  # baseline codebook / projections live outside the VAE
            torch.save(unwrapped.quantizer.state_dict(), path / QUANTIZER_STATE)
    acc.wait_for_everyone()
    return path


__all__ = ["train", "save_checkpoint", "latest_checkpoint", "build_datasets"]
