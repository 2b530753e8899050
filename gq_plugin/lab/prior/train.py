"""``gq prior train TOKENS --out RUN [k=v ...]``: fit the autoregressive prior on a ``gq tokenize`` folder.

One process or many (``accelerate launch -m gq_plugin.lab.cli prior train ...``: DDP, each rank a
slice of every batch). Outputs in RUN: ``prior.json`` (the config, the tokens' manifest fields, the
token layout), ``checkpoint-<step>/prior.pt`` (weights, optimizer, step, RNG; written atomically),
``final`` (a link to the last checkpoint), ``metrics.jsonl`` (loss in nats, bits per token, learning
rate; held-out bits per image when ``data.eval_tokens`` is set).

Resumable: rerunning the command on the same RUN continues from its newest checkpoint that loads
(the batches are a function of the stream position, so a resumed run sees the batches the
uninterrupted run would have seen); a finished RUN returns at once. Raising ``train.steps`` on a
finished RUN trains further. Any other config or token change raises ``ValueError``.
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

from ..tokenizer import CODEBOOK_FIELDS
from .config import load_prior_config
from .layout import TokenLayout
from .model import build_prior, sequence_nll

INFO = "prior.json"
WEIGHTS = "prior.pt"
#: manifest fields a prior records about its tokens (and checks held-out tokens against)
TOKEN_FIELDS = ("model_id", *CODEBOOK_FIELDS, "quantizer", "model_dir", "token_shape", "image_size", "num_images")
#: train keys that may change between a run and its resume
_RESUMABLE_KEYS = ("steps", "log_every", "ckpt_every", "eval_every")


def load_token_folder(root, what: str = "TOKENS"):
    """A :class:`~gq_plugin.lab.tokenize_dataset.TokenDataset` of ``root`` (in memory), with one-line
    errors for a missing or empty folder and for corrupt shards."""
    from ..tokenize_dataset import MANIFEST, TokenDataset

    p = Path(root)
    if not p.is_dir():
        raise ValueError(f"{what} {str(root)!r} is not a directory (make one with `gq tokenize MODEL SOURCE --out {root}`)")
    if not (p / MANIFEST).is_file():
        shards = sorted(p.glob("shard-*.gqt"))
        hint = (f"it holds {len(shards)} shard(s) but no {MANIFEST}: rerun `gq tokenize` to finish it" if shards
                else f"it holds no token shards: run `gq tokenize MODEL SOURCE --out {root}` first")
        raise ValueError(f"{what} {str(root)!r} is not a finished token folder ({hint})")
    try:
        ds = TokenDataset(p, in_memory=True)
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {str(root)!r}: unreadable {MANIFEST} ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"{what} {str(root)!r}: {e}") from None
    if len(ds) == 0:
        raise ValueError(f"{what} {str(root)!r} holds no images")
    if len(ds.token_shape) != 3:
        raise ValueError(f"{what} {str(root)!r}: token maps of shape {list(ds.token_shape)} are not (G, h, w) image tokens")
    return ds


def token_fields(ds) -> dict:
    """The manifest fields of a token folder that a prior records (:data:`TOKEN_FIELDS`) plus its path."""
    mf = ds.manifest
    return {"root": str(ds.root.resolve()), **{k: mf.get(k) for k in TOKEN_FIELDS}}


def check_same_tokenizer(a: dict, b: dict, what: str) -> None:
    """``ValueError`` when token folders ``a`` and ``b`` come from different tokenizers or token shapes."""
    keys = ("model_id", *CODEBOOK_FIELDS, "token_shape")
    diffs = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(f"{what} were made by another tokenizer than the training tokens ({'; '.join(diffs)})")


def _sequences(ds, layout: TokenLayout, max_images: int | None = None) -> torch.Tensor:
    n = len(ds) if max_images is None else min(len(ds), max_images)
    data = ds._data[:n] if ds._data is not None else torch.stack([ds[i] for i in range(n)])
    return layout.to_sequence(data.long())


@torch.no_grad()
def evaluate_nll(prior: torch.nn.Module, seqs: torch.Tensor, layout: TokenLayout, batch_size: int = 64) -> dict:
    """Held-out negative log-likelihood of ``seqs`` (from :meth:`TokenLayout.to_sequence`):
    ``bits_per_image`` (mean over images of the summed bits), ``bits_per_token``, ``images``."""
    was = prior.training
    prior.eval()
    dev = next(prior.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, seqs.shape[0], batch_size):
        total += sequence_nll(prior, seqs[s : s + batch_size].to(dev)).double().sum().cpu()
    prior.train(was)
    per_image = float(total) / seqs.shape[0]
    return {"bits_per_image": per_image, "bits_per_token": per_image / layout.num_tokens, "images": int(seqs.shape[0])}


def _step_of(p: Path) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)", p.name)
    return int(m.group(1)) if m else None


def _load_state(ckpt: Path) -> dict:
    path = ckpt / WEIGHTS
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torn zip, refused pickle ...
        raise ValueError(f"{path} does not load: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path} does not load: not a prior checkpoint")
    return state


def latest_checkpoint(run) -> tuple[Path, dict] | None:
    """``(path, state)`` of the newest ``checkpoint-<step>`` in ``run`` that loads (torn ones are
    skipped with a line on stderr), or None."""
    run = Path(run)
    for p in sorted((p for p in run.glob("checkpoint-*") if p.is_dir() and _step_of(p) is not None), key=_step_of, reverse=True):
        try:
            return p, _load_state(p)
        except ValueError as e:
            print(f"gq prior: skipping {p}: {e}", file=sys.stderr)
    return None


def _save_checkpoint(acc, prior, opt, step: int, samples_seen: int, path: Path) -> Path:
    acc.wait_for_everyone()
    if acc.is_main_process:
        bad = [n for n, t in acc.unwrap_model(prior).state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise FloatingPointError(f"prior training diverged at step {step}: non-finite weights ({', '.join(bad[:3])}); "
                                     f"not writing {path.name} (lower optim.lr)")
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save({"step": step, "samples_seen": samples_seen, "model": acc.unwrap_model(prior).state_dict(),
                    "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}, tmp / WEIGHTS)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    acc.wait_for_everyone()
    return path


def _comparable(info: dict) -> dict:
    cfg = json.loads(json.dumps(info["config"]))
    for k in _RESUMABLE_KEYS:
        cfg["train"].pop(k, None)
    tokens = {k: v for k, v in info["tokens"].items() if k != "root"}
    return {"config": cfg, "tokens": tokens, "layout": info["layout"]}


def train_prior(tokens, out, config=None, overrides: list[str] | None = None, progress: bool = True) -> dict:
    """Train (or resume, or find finished) the prior of the ``gq tokenize`` folder ``tokens`` in
    ``out``. ``config``: a YAML path / dict (see :mod:`.config`), ``overrides``: ``key=value``.
    Returns the last logged values plus ``checkpoint``, ``output_dir``, ``train_time_s`` and, with
    ``data.eval_tokens``, the held-out ``eval`` metrics (:func:`evaluate_nll`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from ..data import ResumableSampler
    from ..schedule import lr_at, set_lr
    from ..train import point_final

    cfg = load_prior_config(config, overrides)
    ds = load_token_folder(tokens)
    fields = token_fields(ds)
    layout = TokenLayout(ds.codebook_size, tuple(int(s) for s in ds.token_shape))
    eval_seqs = None
    if cfg.data.eval_tokens:
        eds = load_token_folder(cfg.data.eval_tokens, "data.eval_tokens")
        check_same_tokenizer(fields, token_fields(eds), f"data.eval_tokens {cfg.data.eval_tokens!r}")
        eval_seqs = _sequences(eds, layout, int(cfg.data.eval_max_images) or None)
    seqs = _sequences(ds, layout)
    run = Path(out)
    info = {"config": OmegaConf.to_container(cfg, resolve=True), "tokens": fields,
            "layout": {"codebook_size": layout.codebook_size, "token_shape": list(layout.token_shape), "order": "position-major, code-minor",
                       "bos": layout.bos, "tokens_per_image": layout.num_tokens}}
    if (run / INFO).is_file():
        old = json.loads((run / INFO).read_text())
        a, b = _flat(_comparable(old), ""), _flat(_comparable(info), "")
        diffs = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if diffs:
            raise ValueError(f"--out {str(run)!r} holds a prior trained with other settings or tokens ({', '.join(diffs[:6])}); "
                             "use another --out folder or delete it")

    tcfg, ocfg = cfg.train, cfg.optim
    acc = Accelerator(mixed_precision=tcfg.mixed_precision, cpu=bool(tcfg.cpu) or not torch.cuda.is_available())
    set_seed(int(cfg.seed))
    prior = build_prior(layout, cfg.model)
    opt = torch.optim.AdamW(prior.parameters(), lr=float(ocfg.lr), betas=tuple(ocfg.betas), weight_decay=float(ocfg.weight_decay))
    found = latest_checkpoint(run) if run.is_dir() else None
    step = 0
    samples_seen = 0
    if found is not None:
        ckpt, state = found
        prior.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
    prior, opt = acc.prepare(prior, opt)
    steps, bs = int(tcfg.steps), int(tcfg.batch_size)
    per_step = bs * acc.num_processes
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / INFO).write_text(json.dumps(info, indent=1))
        for leftover in run.glob("checkpoint-*.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    stream = iter(ResumableSampler(seqs.shape[0], seed=int(cfg.seed), start=samples_seen))
    log_every, ckpt_every, eval_every = int(tcfg.log_every), int(tcfg.ckpt_every), int(tcfg.eval_every)
    pbar = tqdm(total=steps, initial=min(step, steps), desc=f"prior {cfg.name}", dynamic_ncols=True,
                disable=not (progress and acc.is_local_main_process))
    last: dict = {}
    t0 = time.time()
    prior.train()
    while step < steps:
        ids = [next(stream)[0] for _ in range(per_step)][acc.process_index * bs : (acc.process_index + 1) * bs]
        x = seqs[ids].to(acc.device)
        warm = int(ocfg.warmup_steps)
        lr = lr_at(max(0, step - warm), max(1, steps - warm), float(ocfg.lr), ocfg.lr_schedule, float(ocfg.lr_final_frac))
        set_lr(opt, lr * min(1.0, (step + 1) / warm) if warm else lr)
        loss = prior(x)
        acc.backward(loss)
        if ocfg.grad_clip:
            acc.clip_grad_norm_(prior.parameters(), float(ocfg.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        samples_seen += per_step
        pbar.update(1)
        if step % max(1, log_every) == 0 or step == steps:
            loss_v = float(acc.reduce(loss.detach(), reduction="mean"))
            last = {"step": step, "loss": loss_v, "bits_per_token": loss_v / math.log(2), "lr": opt.param_groups[0]["lr"],
                    "elapsed_s": time.time() - t0}
            pbar.set_postfix(loss=f"{loss_v:.3f}", bpt=f"{last['bits_per_token']:.3f}")
            _log_line(acc, run, last)
        if eval_seqs is not None and eval_every and step % eval_every == 0 and step < steps:
            _log_line(acc, run, {"step": step, "eval": evaluate_nll(acc.unwrap_model(prior), eval_seqs, layout)})
        if ckpt_every and step % ckpt_every == 0 and step < steps:
            _save_checkpoint(acc, prior, opt, step, samples_seen, run / f"checkpoint-{step}")
    pbar.close()
    final = run / f"checkpoint-{step}"
    if found is None or found[0] != final:
        _save_checkpoint(acc, prior, opt, step, samples_seen, final)
    res = {**last, "step": step, "output_dir": str(run), "checkpoint": str(final), "train_time_s": time.time() - t0}
    if eval_seqs is not None:
        res["eval"] = evaluate_nll(acc.unwrap_model(prior), eval_seqs, layout)
    if acc.is_main_process:
        point_final(run, final)
        if eval_seqs is not None:
            (run / "eval.json").write_text(json.dumps({"step": step, **res["eval"], "eval_tokens": str(cfg.data.eval_tokens)}, indent=1))
    acc.wait_for_everyone()
    acc.end_training()
    return res


def _log_line(acc, run: Path, entry: dict) -> None:
    if acc.is_main_process:
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def _flat(d, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_prior(run, device="cpu") -> tuple[torch.nn.Module, TokenLayout, dict]:
    """``(prior in eval mode, layout, prior.json)`` of a trained RUN (its ``final`` checkpoint)."""
    run = Path(run)
    if not (run / INFO).is_file():
        raise ValueError(f"RUN {str(run)!r} is not a prior run folder (no {INFO}; train one with `gq prior train TOKENS --out RUN`)")
    if not (run / "final").exists():
        raise ValueError(f"RUN {str(run)!r} has no final checkpoint yet (rerun `gq prior train` to finish it)")
    info = json.loads((run / INFO).read_text())
    layout = TokenLayout(int(info["layout"]["codebook_size"]), tuple(info["layout"]["token_shape"]))
    prior = build_prior(layout, info["config"]["model"])
    prior.load_state_dict(_load_state(run / "final")["model"])
    return prior.to(device).eval(), layout, info


__all__ = ["train_prior", "evaluate_nll", "load_prior", "load_token_folder", "token_fields", "check_same_tokenizer", "latest_checkpoint"]
