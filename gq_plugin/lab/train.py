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
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..rate import band_statistics
from .codebook_init import init_baseline_codebook
from .config import load_config
from .losses import ReconstructionLoss
from .models import build_model
from .schedule import lr_at, set_lr


def _rates_of(out, wrapper=None):
    """Per-group rates of the batch: the GQ posterior's, else the vanilla bottleneck's ``last_rates``."""
    post = out.posterior
    if callable(getattr(post, "rates", None)):
        return post.rates()
    return getattr(getattr(wrapper, "bottleneck", None), "last_rates", None)


STATE_FILE = "training_state.pt"


class TrainingDiverged(FloatingPointError):
    """Training produced non-finite weights; no checkpoint was written for that step."""


def _step_of(p: Path) -> int | None:
    """``<step>`` of a ``checkpoint-<step>`` directory name (None for anything else, e.g. the
    temporary ``checkpoint-<step>.tmp-<pid>`` of an interrupted save)."""
    m = re.fullmatch(r"checkpoint-(\d+)", p.name)
    return int(m.group(1)) if m else None


def load_training_state(ckpt: str | os.PathLike) -> dict:
    """``ckpt/training_state.pt`` loaded with ``weights_only=True`` (tensors and plain containers
    only, never code); ``ValueError`` naming the file and the reason when it does not load."""
    path = Path(ckpt) / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - EOFError, UnpicklingError (code refused), RuntimeError (truncated zip) ...
        msg = " ".join(str(exc).split())
        raise ValueError(f"{path} does not load: {type(exc).__name__}: {msg[:200]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path} does not load: not a training state (no integer 'step')")
    return state


def _checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (None if it can): its training state, its VAE config
    and its weights' headers must all load."""
    try:
        load_training_state(ckpt)
        vae = ckpt / "vae"
        json.loads((vae / "config.json").read_text())
        weights = sorted(vae.glob("*.safetensors"))
        if not weights:
            return "no vae/*.safetensors weights"
        from safetensors import safe_open

        for w in weights:
            with safe_open(str(w), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
    except Exception as exc:  # noqa: BLE001
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:240]
    return None


def latest_checkpoint(output_dir: str | os.PathLike, quiet: bool = False) -> Path | None:
    """The ``checkpoint-<step>`` directory with the largest step under ``output_dir`` that loads.

    A checkpoint whose training state, config or weights do not load (a file torn by a crash, a
    pickle with code in it) is skipped with a one-line message on stderr. Half-written
    checkpoints (``checkpoint-<step>.tmp-<pid>``, see :func:`save_checkpoint`) are never chosen.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    ckpts = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and _step_of(p) is not None), key=_step_of, reverse=True)
    for p in ckpts:
        problem = _checkpoint_problem(p)
        if problem is None:
            return p
        if not quiet:
            print(f"gq train: skipping {p} (does not load: {problem})", file=sys.stderr)
    return None


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


def build_loss(lcfg) -> ReconstructionLoss:
    """The recipe's ``loss`` section as a :class:`ReconstructionLoss` (discriminator only if enabled)."""
    disc_cfg = lcfg.get("disc") or {}
    return ReconstructionLoss(
        l1=float(lcfg.get("l1", 1.0)),
        lpips=float(lcfg.get("lpips", 0.0)),
        lpips_net=lcfg.get("lpips_net", "alex"),
        disc_start=disc_cfg.get("start_step") if disc_cfg.get("enabled", False) else None,
        disc_weight=float(disc_cfg.get("weight", 0.5)),
        disc_channels=int(disc_cfg.get("channels", 64)),
        disc_layers=int(disc_cfg.get("layers", 3)),
    )


def train(cfg: DictConfig | str | os.PathLike, overrides: list[str] | None = None, resume: str | None = None, progress: bool = True) -> dict:
    """Run a recipe's training; returns the final logged values (and the output paths)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .data import ResumableSampler, images_of

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
        resume = latest_checkpoint(out_dir, quiet=not acc.is_main_process)
    state = None
    if resume is not None:
        resume = Path(resume)
        if not (resume / STATE_FILE).is_file():
            raise ValueError(f"resume: {resume} is not a checkpoint directory (no {STATE_FILE})")
        try:
            state = load_training_state(resume)
        except ValueError as e:
            raise ValueError(f"resume: {e}") from None
        cfg.model.pretrained = str(resume / "vae")

    set_seed(int(cfg.seed))  # identical initialisation on every rank
    vae, wrapper = build_model(cfg)
    is_gq = qcfg.name == "gq"
    reg_weight = float(qcfg.get("weight", 0.1)) if is_gq else 1.0
    disc_cfg = cfg.loss.get("disc") or {}
    loss_fn = build_loss(cfg.loss)
    ocfg = cfg.optim
    params = [p for p in wrapper.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=float(ocfg.lr), betas=tuple(ocfg.get("betas", (0.5, 0.9))), weight_decay=float(ocfg.get("weight_decay", 0.0)))
    disc = loss_fn.discriminator
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(disc_cfg.get("lr", ocfg.lr)), betas=(0.5, 0.9)) if disc is not None else None

    dataset = build_datasets(cfg.data, "train")
    # The data order is a resumable stream: batch b holds stream positions b*batch_size ...; every
    # optimizer step consumes batch_size * grad_accum * num_processes positions (all ranks).
    per_step = int(tcfg.batch_size) * int(tcfg.get("grad_accum", 1)) * acc.num_processes
    step = start_step = int(state["step"]) if state is not None else 0
    start_samples = int(state.get("samples_seen") or step * per_step) if state is not None else 0
    sampler = ResumableSampler(len(dataset), seed=int(cfg.seed), start=start_samples)
    # the loader's own generator (not the global RNG) seeds its iterator, so a resume draws the
    # global RNG exactly like the uninterrupted run
    gen = torch.Generator().manual_seed(int(cfg.seed))
    loader = DataLoader(
        dataset, batch_size=int(tcfg.batch_size), sampler=sampler, drop_last=True, num_workers=int(tcfg.get("num_workers", 0)), generator=gen
    )
    if disc is not None:
        wrapper, opt, loader, disc, opt_d = acc.prepare(wrapper, opt, loader, disc, opt_d)
        loss_fn.discriminator = disc
    else:
        wrapper, opt, loader = acc.prepare(wrapper, opt, loader)
    loss_fn.to(acc.device)
    quantizer = getattr(vae, "gq_quantizer", None)

    if state is not None:
        _restore_state(acc, state, opt, disc, opt_d)
    else:  # a baseline that asks for k-means on N >= K encoder latents (not the first batch) gets it now
        init_baseline_codebook(acc.unwrap_model(wrapper), dataset, int(tcfg.batch_size), int(cfg.seed), acc.device,
                               progress=progress and acc.is_local_main_process)

    steps = int(tcfg.steps)
    log_every, ckpt_every = int(tcfg.get("log_every", 25)), int(tcfg.get("ckpt_every", 0) or 0)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out_dir / "config.yaml")
        for leftover in out_dir.glob("checkpoint-*.tmp-*"):  # half-written by a process that died
            shutil.rmtree(leftover, ignore_errors=True)
    metrics_path = out_dir / "metrics.jsonl"
    last_layer = acc.unwrap_model(wrapper).model.decoder.conv_out.weight
    batches = iter(loader)  # endless (ResumableSampler)
    pbar = tqdm(total=steps, initial=step, disable=not (progress and acc.is_local_main_process), desc=f"train {cfg.get('name', '')}", dynamic_ncols=True)
    last_logs: dict = {}
    last_rates = None
    t0 = time.time()
    wrapper.train()
    while step < steps:
        x = images_of(next(batches))
        set_lr(opt, lr_at(step, steps, float(ocfg.lr), ocfg.lr_schedule, float(ocfg.lr_final_frac)))
        out, loss, rec, logs = autoencoder_step(acc, wrapper, loss_fn, opt, params, x, step, reg_weight, ocfg.get("grad_clip"), last_layer)
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
            rates = _rates_of(out, acc.unwrap_model(wrapper))
            last_rates = rates.detach().cpu() if rates is not None else last_rates
            entry = {"step": step, "loss": float(loss.detach()), "rec": float(rec.detach()), "reg": float(out.loss.detach())}
            entry.update({k: float(v) for k, v in logs.items()})
            entry["lr"] = opt.param_groups[0]["lr"]
            if quantizer is not None:
                entry.update(quantizer.tdc.log_dict())
                if rates is not None:  # shares in band / over / under budget and quantiles of this batch
                    entry.update(band_statistics(rates, quantizer.tdc.target_bits, quantizer.tdc.tolerance).as_dict())
            elif rates is not None:
                entry.update({"bits-mean": float(rates.mean()), "bits-min": float(rates.min()), "bits-max": float(rates.max())})
            entry["elapsed_s"] = time.time() - t0
            last_logs = entry
            entry["rec_per_elem"] = entry["rec"] / x[0].numel()  # "rec" is a per-image sum over C*H*W elements
            # per-element losses (l1, lpips) beside the rates in bits
            pbar.set_postfix({k: f"{entry[k]:.3g}" for k in ("l1", "lpips", "bits-mean", "bits-q99", "band-over", "lam") if k in entry})
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
        if ckpt_every and step % ckpt_every == 0 and step < steps:
            save_checkpoint(acc, wrapper, opt, disc, opt_d, step, out_dir / f"checkpoint-{step}", samples_seen=start_samples + (step - start_step) * per_step)
    pbar.close()
    if tcfg.get("save_rank_states"):  # per-rank weights + TDC buffers, to check DDP consistency
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in acc.unwrap_model(wrapper).model.state_dict().items()}, out_dir / f"rank{acc.process_index}.pt")
    final = save_checkpoint(acc, wrapper, opt, disc, opt_d, step, out_dir / f"checkpoint-{step}", samples_seen=start_samples + (step - start_step) * per_step)
    if acc.is_main_process:
        point_final(out_dir, final)
        if last_rates is not None:
            from .plots import plot_rate_histogram

            target = math.log2(int(qcfg.codebook_size)) if qcfg.get("codebook_size") else None
            plot_rate_histogram({qcfg.name: last_rates}, out_dir / "rates_hist.png", target=target,
                                tolerance=quantizer.tdc.tolerance if quantizer is not None else None)
    acc.wait_for_everyone()
    last_logs.update({"output_dir": str(out_dir), "checkpoint": str(final), "train_time_s": time.time() - t0})
    acc.end_training()
    return last_logs


def autoencoder_step(acc, wrapper, loss_fn, opt, params, x, step: int, reg_weight: float, grad_clip, last_layer):
    """One autoencoder update under ``acc.accumulate``: forward through the wrapper, reconstruction
    loss + ``reg_weight`` x regulariser (TDC / KL), backward, optional gradient clipping, optimizer
    step. Returns ``(out, loss, rec, logs)``. The caller steps TDC and the discriminator."""
    with acc.accumulate(wrapper):
        out = wrapper(x)
        rec, logs = loss_fn.generator_loss(x, out.sample, step, last_layer)
        loss = rec + reg_weight * out.loss
        acc.backward(loss)
        if acc.sync_gradients and grad_clip:
            acc.clip_grad_norm_(params, float(grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out, loss, rec, logs


def _restore_state(acc, state: dict, opt, disc, opt_d) -> None:
    opt.load_state_dict(state["optimizer"])
    if opt_d is not None and state.get("optimizer_d") is not None:
        opt_d.load_state_dict(state["optimizer_d"])
        acc.unwrap_model(disc).load_state_dict(state["discriminator"])
    if getattr(acc, "scaler", None) is not None and state.get("scaler") is not None:
        acc.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    cuda_rng = state.get("cuda_rng")
    if cuda_rng and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)


def _non_finite(modules: dict) -> list[str]:
    """Names of the floating-point parameters/buffers holding NaN or inf."""
    bad = []
    for prefix, mod in modules.items():
        if mod is None:
            continue
        for name, t in mod.state_dict().items():
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{prefix}{name}")
    return bad


def _fsync_tree(root: Path, recursive: bool = True) -> None:
    """fsync every file and directory under ``root`` (and ``root``), so a rename publishes data
    that is on disk."""
    for p in (sorted(root.rglob("*")) if recursive else []) + [root]:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def point_final(run_dir: Path, checkpoint: Path) -> None:
    """Make ``run_dir/final`` a relative symlink to ``checkpoint`` (a folder inside ``run_dir``),
    replacing an older link: the one "newest finished checkpoint" entry of train, calibrate and prior runs."""
    link = Path(run_dir) / "final"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(checkpoint).name)


def save_checkpoint(acc, wrapper, opt, disc, opt_d, step: int, path: Path, samples_seen: int | None = None) -> Path:
    """Write ``path/vae`` (save_pretrained), ``path/training_state.pt`` (optimizers, step, RNG
    states, data-stream position) and, for baselines, ``path/quantizer.pt``.

    Atomic: everything goes to ``<path>.tmp-<pid>`` first, is fsync'ed, and then renamed to
    ``path`` with ``os.replace``, so a crash leaves either the complete checkpoint or none
    (:func:`latest_checkpoint` never picks the temporary directory). Refuses (raises
    :class:`TrainingDiverged` on every rank, nothing written) when a weight is NaN or inf.
    """
    unwrapped = acc.unwrap_model(wrapper)
    bad = _non_finite({"": unwrapped, "discriminator.": acc.unwrap_model(disc) if disc is not None else None})
    if bad:
        raise TrainingDiverged(
            f"training diverged at step {step}: non-finite weights in {len(bad)} tensor(s) ({', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}); not writing {path.name} (lower optim.lr, or resume from the last checkpoint)"
        )
    acc.wait_for_everyone()
    if acc.is_main_process:
        from .models import QUANTIZER_STATE, QuantizerBottleneck

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        unwrapped.model.save_pretrained(tmp / "vae")
        state = {
            "step": step,
            "samples_seen": samples_seen,
            "optimizer": opt.state_dict(),
            "optimizer_d": opt_d.state_dict() if opt_d is not None else None,
            "discriminator": acc.unwrap_model(disc).state_dict() if disc is not None else None,
            "scaler": acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(state, tmp / STATE_FILE)
        if isinstance(unwrapped.bottleneck, QuantizerBottleneck):  # baseline codebook / projections live outside the VAE
            torch.save(unwrapped.quantizer.state_dict(), tmp / QUANTIZER_STATE)
        _fsync_tree(tmp)
        if path.exists():  # re-saving a step (e.g. the final one after a resume): swap it out
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_tree(path.parent, recursive=False)
    acc.wait_for_everyone()
    return path


__all__ = ["train", "autoencoder_step", "build_loss", "save_checkpoint", "latest_checkpoint", "load_training_state",
           "build_datasets", "TrainingDiverged"]
