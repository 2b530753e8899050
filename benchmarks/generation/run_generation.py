"""Do GQ tokens generate better than VQ / FSQ tokens? (issue #27)

    nice -n 19 python benchmarks/generation/run_generation.py --tokenizers-root benchmarks/paper/from_pretrained/runs/tiny [--seeds 3]

Tokenizers at equal bits come from the from-pretrained protocol (``benchmarks/paper/pretrained.py``:
TDC+GQ, VQ, FSQ at 12 bits per token, fine-tuned from one pretrained VAE): every run folder under
``--tokenizers-root`` with a ``train.json`` and a ``final`` checkpoint whose method is in ``--methods``
and whose fine-tune seed is ``--tokenizer-seed`` (default 0). ``--tokenizer NAME=DIR`` adds one by hand.

For every tokenizer, through one code path (``gq tokenize`` + ``gq prior``):

1. the train photos' crops (fixed crops of the protocol's train split) and the held-out crops (the
   protocol's eval crops) are tokenized (``gq tokenize``);
2. per seed, the same prior (size, steps, LR of the scale; seed = init, data order and sampling seed)
   is trained on the train tokens (``gq prior train``);
3. measured: held-out negative log-likelihood in bits per image (comparable across tokenizers at equal
   raw bits), and FD / KID on EfficientNet-Lite0 features of as many samples as held-out crops against
   the held-out crops, with the tokenizer's own reconstruction FD / KID of those crops beside it (the
   floor a perfect prior would reach); a sample grid per (tokenizer, seed).

Resumable: token folders, prior runs and features are kept under ``<out>/runs/`` (git-ignored); every
finished (tokenizer, seed) writes ``<out>/results/<tokenizer>/seed<k>.json`` at once, and a rerun
skips what exists. ``--budget-min`` stops starting new prior trainings after that many minutes. The
report (``<out>/RESULTS.md``) is regenerated at the end of every run (``--report-only`` to redo it).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SCALES = {
    # micro tokenizers of the test: seconds
    "smoke": {"size": 16, "resize": 32, "train_crops": 2, "eval_crops": 1, "eval_images": None, "eval_fraction": 0.3,
              "prior": ["model.dim=32", "model.depth=1", "model.heads=2", "model.dim_head=16", "train.steps=3", "train.batch_size=4",
                        "train.log_every=1", "train.ckpt_every=0"]},
    # the from-pretrained protocol's tiny scale: 64 px crops (short side 128), f4 -> 16 x 16 tokens of 12 bits;
    # the prior: 4 layers of width 128, 800 steps of 16 sequences (sized for ~10 min on 2 free CPU cores)
    "tiny": {"size": 64, "resize": 128, "train_crops": 8, "eval_crops": 4, "eval_images": 192, "eval_fraction": 0.15,
             "prior": ["model.dim=128", "model.depth=4", "model.heads=4", "model.dim_head=32", "train.steps=800", "train.batch_size=16",
                       "optim.lr=1e-3", "optim.warmup_steps=50", "train.log_every=25", "train.ckpt_every=100"]},
}
METHODS = ("tdc", "vq", "fsq")


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[generation {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- tokenizers


def tokenizer_name(method: str, model_dir) -> str:
    """The protocol's row name: ``tdc+gq`` for a GQ model of method ``tdc``, ``tdc-ref+gq+cal`` for a
    calibrated one (method ``tdc-ref+cal``), the method itself for a baseline."""
    from gq_plugin.lab.tokenizer import is_gq_model

    if not is_gq_model(model_dir, "tokenizer"):
        return method
    base, plus, suffix = method.partition("+")
    return f"{base}+gq{plus}{suffix}"


def discover(root, methods, seed: int = 0, results_dir=None, lrs: dict | None = None) -> dict:
    """``{name: {"dir", "method", "lr", "lr_choice", "train_json"}}`` for the runs under ``root``
    (a ``train.json`` and a ``final`` checkpoint, fine-tune seed ``seed``, pretrain seed 0). With
    several LRs of one method: ``lrs[method]``, else the best seed-0 PSNR of the protocol's results
    (``results_dir/<row>@lr<lr>/seed0.json``), else the smallest LR."""
    found: dict[str, list] = {}
    for tj in sorted(Path(root).rglob("train.json")):
        info = json.loads(tj.read_text())
        method = info.get("train")
        if method not in methods or info.get("seed") != seed or int(info.get("pretrain_seed", 0) or 0) != 0:
            continue
        if not (tj.parent / "final").exists():
            continue
        found.setdefault(method, []).append((info.get("lr"), tj.parent))
    out = {}
    for method, runs in found.items():
        name = tokenizer_name(method, runs[0][1] / "final")
        want = (lrs or {}).get(method)
        if want is not None:
            pick = [r for r in runs if r[0] is not None and math.isclose(float(r[0]), float(want))]
            if not pick:
                raise ValueError(f"--lr {method}={want}: no {method} run at that LR under {root} (have {[r[0] for r in runs]})")
            lr, d, how = *pick[0], "given by --lr"
        elif len(runs) == 1:
            (lr, d), how = runs[0], "the only run"
        else:
            psnr = {}
            for lr, d in runs:
                p = Path(results_dir or "") / f"{name}@lr{float(lr):g}" / "seed0.json"
                if results_dir and p.is_file():
                    psnr[lr] = json.loads(p.read_text())["metrics"].get("PSNR")
            ok = {lr: v for lr, v in psnr.items() if isinstance(v, (int, float))}
            if ok:
                best = max(ok, key=ok.get)
                lr, d = next(r for r in runs if r[0] == best)
                how = "best seed-0 PSNR of the protocol"
            else:
                lr, d = min(runs, key=lambda r: float(r[0] or 0))
                how = "smallest LR (no protocol results to choose by)"
        out[name] = {"dir": str(d / "final"), "method": method, "lr": lr, "lr_choice": how, "train_json": str(d / "train.json")}
    return out


# --------------------------------------------------------------------------- data


def export_crops(work: Path, s: dict, data_root=None, quiet: bool = False) -> dict:
    """The protocol's crops as PNG folders ``work/data/{train,held}`` (written once): ``train_crops``
    fixed random crops per train photo (seeded by crop number), the first ``eval_images`` of the eval
    split's fixed crops (the protocol's held-out crops)."""
    from gq_plugin.lab.data import PhotoDataset
    from gq_plugin.lab.plots import save_image

    out = {}
    for split, folder, crops in (("train", "train", s["train_crops"]), ("eval", "held", s["eval_crops"])):
        d = work / "data" / folder
        done = d / "done.json"
        if not done.is_file():
            ds = PhotoDataset(data_root, split=split, size=s["size"], resize=s["resize"], eval_fraction=s["eval_fraction"], seed=0,
                              crops_per_image=crops if split == "eval" else 1)
            d.mkdir(parents=True, exist_ok=True)
            n = 0
            if split == "eval":
                for i in range(min(len(ds), s["eval_images"] or len(ds))):
                    save_image(ds[i], d / f"crop-{i:05d}.png")
                    n += 1
            else:
                for c in range(crops):
                    for i in range(len(ds)):
                        save_image(ds[(i, 1000003 * c + i)], d / f"crop-{c}-{i:05d}.png")
                        n += 1
            done.write_text(json.dumps({"images": n, "split": split, "photos": ds.n_photos}))
            log(f"exported {n} {folder} crops of {ds.n_photos} photos", quiet)
        out[folder] = d
    return out


def load_folder(d: Path) -> torch.Tensor:
    from gq_plugin.lab.codec import load_image

    return torch.stack([load_image(p, None, 1) for p in sorted(d.glob("*.png"))])


_FEATURES = None


def features(x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """EfficientNet-Lite0 features ``(N, 1280)`` of images in [-1, 1]."""
    from gq_plugin.lab.metrics.features import EffNetLite0Features

    global _FEATURES
    if _FEATURES is None:
        _FEATURES = EffNetLite0Features()
    fe = _FEATURES
    with torch.no_grad():
        return torch.cat([fe(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def fd_kid(f_gen: torch.Tensor, f_ref: torch.Tensor) -> dict:
    from gq_plugin.lab.metrics.features import frechet_distance, kernel_inception_distance

    kid, kid_std = kernel_inception_distance(f_gen, f_ref)
    return {"FD": frechet_distance(f_gen, f_ref), "KID": kid, "KID_std": kid_std}


# --------------------------------------------------------------------------- one tokenizer


def tokenize_all(name: str, spec: dict, work: Path, crops: dict, s: dict, quiet: bool) -> dict:
    """``gq tokenize`` of the train and held-out crops (resumable), and the reconstruction floor."""
    from gq_plugin.lab.tokenize_dataset import tokenize
    from gq_plugin.lab.tokenizer import load_tokenizer

    tdir = work / "tokens" / name
    for folder in ("train", "held"):
        if not (tdir / folder / "manifest.json").is_file():
            log(f"tokenize {name} {folder}", quiet)
            tokenize(spec["dir"], crops[folder], tdir / folder, size=s["size"], batch_size=32, workers=0, shard_size=1000, progress=not quiet)
    floor = tdir / "recon.json"
    if not floor.is_file():
        from gq_plugin.lab.prior.train import load_token_folder

        tok = load_tokenizer(spec["dir"])
        held = load_token_folder(tdir / "held")
        tok.check_tokens(held.manifest)
        idx = torch.stack([held[j] for j in range(len(held))])
        rec = torch.cat([tok.decode(idx[i : i + 32]).cpu() for i in range(0, len(idx), 32)])
        ref = reference_features(work, crops)
        floor.write_text(json.dumps({**fd_kid(features(rec), ref), "images": len(held)}, indent=1))
        from gq_plugin.lab.plots import save_grid

        x = load_folder(crops["held"])[:8]
        save_grid({"held-out": x, name: rec[:8]}, tdir / "recon_grid.png")
    return {"train": tdir / "train", "held": tdir / "held", "recon": json.loads(floor.read_text())}


def reference_features(work: Path, crops: dict) -> torch.Tensor:
    f = work / "held_features.pt"
    if not f.is_file():
        torch.save(features(load_folder(crops["held"])), f)
    return torch.load(f, weights_only=True)


def run_one(name: str, spec: dict, seed: int, toks: dict, work: Path, s: dict, out: Path, quiet: bool) -> dict:
    """Train the prior of ``name`` at ``seed``, measure it, write its result file and grid."""
    from gq_plugin.lab.prior import evaluate_nll, load_prior, sample, train_prior
    from gq_plugin.lab.prior.train import _sequences, load_token_folder

    run = work / "priors" / f"{name}-seed{seed}"
    t0 = time.time()
    res = train_prior(toks["train"], run, overrides=[*s["prior"], f"seed={seed}", f"name={name}-seed{seed}"], progress=not quiet)
    held = load_token_folder(toks["held"])
    prior, layout, info = load_prior(run)
    nll = evaluate_nll(prior, _sequences(held, layout), layout)
    smp = sample(run, len(held), work / "samples" / f"{name}-seed{seed}", tokenizer=spec["dir"], batch_size=64, seed=seed, progress=not quiet)
    gen = fd_kid(features(smp["images"]), reference_features(work, {"held": work / "data" / "held"}))
    grid = out / "grids" / f"{name}-seed{seed}.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    grid.write_bytes(Path(smp["grid"]).read_bytes())
    mf = held.manifest
    raw_bits = layout.num_tokens * math.log2(layout.codebook_size)
    result = {
        "tokenizer": name, "seed": seed,
        "metrics": {"bits_per_image": nll["bits_per_image"], "bits_per_token": nll["bits_per_token"], "FD": gen["FD"], "KID": gen["KID"],
                    "KID_std": gen["KID_std"], "recon_FD": toks["recon"]["FD"], "recon_KID": toks["recon"]["KID"]},
        "raw_bits_per_image": raw_bits, "held_images": nll["images"], "samples": len(smp["paths"]),
        "tokenizer_info": {**spec, "codebook_size": mf["codebook_size"], "token_shape": mf["token_shape"], "quantizer": mf.get("quantizer"),
                           "model_id": mf["model_id"]},
        "prior": {"overrides": s["prior"], "config": info["config"], "train_time_s": res.get("train_time_s"),
                  "final_train_bits_per_token": res.get("bits_per_token")},
        "wall_s": time.time() - t0, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command(), "machine": machine(),
    }
    p = out / "results" / name / f"seed{seed}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2))
    return result


def machine() -> str:
    import os
    import platform

    from gq_plugin.lab.sysinfo import cpu_model

    return f"{platform.system()}, {cpu_model()}, {os.cpu_count()} CPUs visible, torch.get_num_threads()={torch.get_num_threads()}, torch {torch.__version__}"


def command() -> str:
    return "python benchmarks/generation/run_generation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def estimate(s: dict, steps: int = 3) -> float:
    """Seconds per prior step at the scale's settings on a 16 x 16 map of 4096 codes (random tokens)."""
    from gq_plugin.lab.prior import TokenLayout, build_prior, load_prior_config

    cfg = load_prior_config(None, s["prior"])
    layout = TokenLayout(4096, (1, s["size"] // 4, s["size"] // 4))
    prior = build_prior(layout, cfg.model)
    opt = torch.optim.AdamW(prior.parameters())
    x = layout.to_sequence(torch.randint(0, 4096, (int(cfg.train.batch_size), *layout.token_shape)))
    times = []
    for _ in range(steps + 1):
        t = time.time()
        prior(x).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.time() - t)
    per = sum(times[1:]) / steps
    print(f"{per:.2f} s/step x {cfg.train.steps} steps ~ {per * int(cfg.train.steps) / 60:.1f} min per prior training "
          f"({sum(p.numel() for p in prior.parameters()) / 1e6:.2f} M parameters; {machine()})")
    return per


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizers-root", default=str(ROOT / "benchmarks/paper/from_pretrained/runs/tiny"),
                   help="folder holding the from-pretrained protocol's run folders (read only)")
    p.add_argument("--results-dir", default=None, help="the protocol's results/ (to pick an LR; default: <root>/../../results)")
    p.add_argument("--methods", default=",".join(METHODS), help="fine-tune names to use (train.json 'train')")
    p.add_argument("--tokenizer-seed", type=int, default=0, help="fine-tune seed of the tokenizers")
    p.add_argument("--tokenizer", action="append", default=[], metavar="NAME=DIR", help="add a tokenizer by hand")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="the fine-tune LR to use for METHOD")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--data-root", default=None, help="photo folder (default: the `gq data fetch` cache)")
    p.add_argument("--budget-min", type=float, default=None, help="start no new prior training after this many minutes")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--estimate", action="store_true", help="time a few prior steps and project one training")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = SCALES[args.scale]
    out = Path(args.out)
    from report_generation import write_report

    if args.estimate:
        estimate(s)
        return 0
    if args.report_only:
        print(write_report(out))
        return 0
    root = Path(args.tokenizers_root)
    results_dir = Path(args.results_dir) if args.results_dir else root.parent.parent / "results"
    lrs = dict(kv.split("=", 1) for kv in args.lr)
    toks = discover(root, args.methods.split(","), args.tokenizer_seed, results_dir, lrs) if root.is_dir() else {}
    for kv in args.tokenizer:
        name, _, d = kv.partition("=")
        if not name or not d:
            raise SystemExit(f"--tokenizer {kv!r}: expected NAME=DIR")
        toks[name] = {"dir": d, "method": name, "lr": None, "lr_choice": "given by --tokenizer", "train_json": None}
    if not toks:
        log(f"no finished tokenizer under {root} yet (methods {args.methods}); rerun when the protocol has trained them", args.quiet)
    deadline = time.time() + 60 * args.budget_min if args.budget_min is not None else None
    work = out / "runs" / args.scale
    crops = export_crops(work, s, args.data_root, args.quiet) if toks else {}
    for seed in range(args.seeds):  # seed-major: every tokenizer gets seed 0 before any gets seed 1
        for name, spec in sorted(toks.items()):
            if (out / "results" / name / f"seed{seed}.json").is_file():
                continue
            if deadline is not None and time.time() > deadline:
                log(f"--budget-min reached before {name} seed {seed}; rerun the same command to continue", args.quiet)
                print(write_report(out))
                return 0
            t = tokenize_all(name, spec, work, crops, s, args.quiet)
            log(f"prior {name} seed {seed}", args.quiet)
            r = run_one(name, spec, seed, t, work, s, out, args.quiet)
            m = r["metrics"]
            log(f"{name} seed {seed}: {m['bits_per_image']:.1f} bits/image, FD {m['FD']:.2f} (recon {m['recon_FD']:.2f}), KID {m['KID']:.4f}",
                args.quiet)
    print(write_report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
