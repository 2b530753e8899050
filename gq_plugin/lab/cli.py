"""The ``gq`` command.

    gq demo                       fetch photos, train recipes/tiny_cpu.yaml, evaluate, print the table
    gq train RECIPE [k=v ...]     fine-tune (accelerate; `accelerate launch -m gq_plugin.lab.cli train ...` for DDP)
    gq eval RECIPE CKPT [k=v ...] continuous VAE vs GQ: Markdown table + reconstruction grid
    gq diagnose MODEL_DIR         per-channel rates -> recommended (K, m) + measured conversion loss
    gq data fetch [--set small]   download real photos from Debian packages / wheels into the cache
    gq encode IMG... --model DIR -o FILE.gqt   images -> bit-packed token file
    gq decode FILE.gqt --model DIR -o OUT.png  token file -> images
    gq recipes                    list the bundled recipes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_train(args) -> int:
    from .train import train

    logs = train(args.recipe, overrides=args.overrides, resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: v for k, v in logs.items() if isinstance(v, (int, float, str))}, indent=2))
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate

    res = evaluate(args.recipe, args.ckpt, out_dir=args.out, overrides=args.overrides, progress=not args.quiet)
    print(res["table"])
    print(f"\nwritten: {res['out_dir']}/eval.md, eval.json, recon_grid.png")
    return 0


def _cmd_diagnose(args) -> int:
    from .codec import load_image
    from .diagnose import diagnose, format_report
    from .models import build_autoencoder_kl, downsampling_factor

    import torch

    d = Path(args.model)
    vae = build_autoencoder_kl({"pretrained": str(d / "vae" if (d / "vae").is_dir() else d)})
    f = downsampling_factor(vae)
    if args.images:
        paths = args.images
    else:
        from .data import PhotoDataset, default_data_dir

        ds = PhotoDataset(args.data or default_data_dir(), split="eval", size=args.size)
        imgs = torch.stack([ds[i] if not isinstance(ds[i], (tuple, list)) else ds[i][0] for i in range(min(len(ds), args.max_images))])
        paths = None
    if paths is not None:
        imgs = torch.stack([load_image(p, args.size, f) for p in paths[: args.max_images]])
    res = diagnose(vae, imgs, out_dir=args.out, max_log2_codebook_size=args.max_log2k, progress=not args.quiet)
    print(format_report(res))
    if args.out:
        print(f"\nwritten: {args.out}/diagnose.md, diagnose.json, diagnose_rates.png")
    return 0


def _cmd_data(args) -> int:
    from .data import fetch_main

    return int(fetch_main(args.rest) or 0)


def _cmd_encode(args) -> int:
    from .codec import encode_files

    info = encode_files(args.model, args.images, args.output, size=None if args.size == 0 else args.size)
    print(f"{info['file']}: {info['images']} image(s), indices {info['shape']}, {info['bytes']} bytes; "
          f"real {info['real_bpp']:.4f} bpp (nominal {info['nominal_bpp']:.4f} bpp)")
    return 0


def _cmd_decode(args) -> int:
    from .codec import decode_file

    for p in decode_file(args.model, args.tokens, args.output, force=args.force):
        print(p)
    return 0


def _cmd_recipes(args) -> int:
    from .config import list_recipes, recipes_dir

    print(f"recipes in {recipes_dir()}:")
    for r in list_recipes():
        print(f"  {r}")
    return 0


def _cmd_demo(args) -> int:
    """Main job: photos -> tiny recipe (train) -> continuous vs GQ evaluation."""
    from .data import default_data_dir, fetch_photos
    from .evaluate import evaluate
    from .train import train

    overrides = list(args.overrides)
    root = Path(args.data or default_data_dir())
    if not (root / "manifest.json").is_file():
        print(f"fetching the '{args.set}' photo set into {root} (Debian packages + wheels; one-time)")
        fetch_photos(root, sets=(args.set, "wheels"))
    overrides.append(f"data.root={root}")
    out = args.out or "runs/demo"
    overrides.append(f"train.output_dir={out}")
    logs = train(args.recipe, overrides=overrides, progress=not args.quiet)
    print(f"trained {logs.get('train_time_s', 0):.0f} s; checkpoint {logs['checkpoint']}")
    res = evaluate(args.recipe, logs["checkpoint"], out_dir=Path(out) / "eval", overrides=overrides, progress=not args.quiet)
    print(res["table"])
    print(f"\nreconstructions: {res['out_dir']}/recon_grid.png; rates: {out}/rates_hist.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gq", description="Gaussian Quant: Gaussian VAE -> VQ-VAE (arXiv 2512.06609)")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="fine-tune with TDC (or a baseline quantizer) from a recipe")
    t.add_argument("recipe", help="recipe YAML path or bundled name (see `gq recipes`)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    t.add_argument("--resume", default=None, help="checkpoint dir, or 'latest'")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate continuous VAE vs GQ")
    e.add_argument("recipe")
    e.add_argument("ckpt", help="checkpoint dir (or its vae/ / a save_pretrained dir)")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--out", default=None)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_eval)

    d = sub.add_parser("diagnose", help="rate histogram of a VAE -> recommended K, m")
    d.add_argument("model", help="save_pretrained dir of a diffusers AutoencoderKL (GQ-patched or not)")
    d.add_argument("--images", nargs="*", default=None, help="image files (default: eval photos from the cache)")
    d.add_argument("--data", default=None)
    d.add_argument("--size", type=int, default=64)
    d.add_argument("--max-images", type=int, default=64)
    d.add_argument("--max-log2k", type=int, default=18)
    d.add_argument("--out", default=None)
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=_cmd_diagnose)

    da = sub.add_parser("data", help="photo data: `gq data fetch --help`")
    da.add_argument("rest", nargs=argparse.REMAINDER)
    da.set_defaults(func=_cmd_data)

    en = sub.add_parser("encode", help="images -> .gqt token file")
    en.add_argument("images", nargs="+")
    en.add_argument("--model", required=True)
    en.add_argument("-o", "--output", required=True)
    en.add_argument("--size", type=int, default=256, help="resize+centre-crop side (0: keep size, crop to a multiple of the factor)")
    en.set_defaults(func=_cmd_encode)

    de = sub.add_parser("decode", help=".gqt token file -> PNG")
    de.add_argument("tokens")
    de.add_argument("--model", required=True)
    de.add_argument("-o", "--output", required=True)
    de.add_argument("--force", action="store_true", help="decode even if the file was made with other weights")
    de.set_defaults(func=_cmd_decode)

    r = sub.add_parser("recipes", help="list bundled recipes")
    r.set_defaults(func=_cmd_recipes)

    dm = sub.add_parser("demo", help="the main job: fetch photos, train tiny_cpu, evaluate")
    dm.add_argument("overrides", nargs="*")
    dm.add_argument("--recipe", default="tiny_cpu")
    dm.add_argument("--data", default=None)
    dm.add_argument("--set", default="small")
    dm.add_argument("--out", default=None)
    dm.add_argument("--quiet", action="store_true")
    dm.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FloatingPointError as e:  # train.TrainingDiverged: non-finite weights, nothing saved
        print(f"gq {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad input (incl. FileNotFoundError, IsADirectoryError): one line, exit 2
        print(f"gq {args.cmd}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
