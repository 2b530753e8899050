"""The ``gq`` command.

    gq demo                       fetch photos, train recipes/tiny_cpu.yaml, evaluate, print the table
    gq train RECIPE [k=v ...]     fine-tune (accelerate; `accelerate launch -m gq_plugin.lab.cli train ...` for DDP)
    gq eval RECIPE CKPT [k=v ...] continuous VAE vs GQ: Markdown table + reconstruction grid
    gq calibrate RUN --out RUN2   fine-tune the decoder alone on the GQ codewords (encoder, tokens frozen)
    gq diagnose MODEL_DIR         per-channel rates -> recommended (K, m) + measured conversion loss
    gq data fetch [--set small]   download real photos from Debian packages / wheels into the cache
    gq encode IMG... --model DIR -o FILE.gqt   images -> bit-packed token file
    gq decode FILE.gqt --model DIR -o OUT.png  token file (or one shard of `gq tokenize`) -> images (videos: a PNG per frame)
    gq tokenize MODEL SOURCE... --out DIR      image folder / tar shards -> sharded token files + manifest
    gq import-authors CKPT --config YAML --out DIR   the paper authors' released tokenizer -> save_pretrained dir
    gq prior train TOKENS --out RUN            autoregressive prior (x-transformers) over a token folder
    gq prior sample RUN --n N --out DIR        prior samples decoded by the tokenizer -> PNGs + grid
    gq recipes [show NAME]        list the bundled recipes / print one resolved (the keys k=v can set)
    gq --version                  the version; `gq` alone prints the help
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_help import GQArgumentParser, fill_descriptions, show_recipe, version_string


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


def _cmd_calibrate(args) -> int:
    from .calibrate import calibrate

    logs = calibrate(args.run, args.out, overrides=args.overrides, resume=args.resume, progress=not args.quiet)
    print(json.dumps({k: v for k, v in logs.items() if isinstance(v, (int, float, str))}, indent=2))
    return 0


def _cmd_diagnose(args) -> int:
    from .codec import load_image
    from .diagnose import diagnose, format_report
    from .models import build_autoencoder_kl, downsampling_factor, resolve_model_dir

    import torch

    vae = build_autoencoder_kl({"pretrained": resolve_model_dir(args.model, "MODEL_DIR")})
    f = downsampling_factor(vae)
    if args.images:
        imgs = torch.stack([load_image(p, args.size, f) for p in args.images[: args.max_images]])
    else:
        from .data import PhotoDataset, default_data_dir

        ds = PhotoDataset(args.data or default_data_dir(), split="eval", size=args.size)
        imgs = torch.stack([ds[i] if not isinstance(ds[i], (tuple, list)) else ds[i][0] for i in range(min(len(ds), args.max_images))])
    res = diagnose(vae, imgs, out_dir=args.out, max_log2_codebook_size=args.max_log2k, progress=not args.quiet)
    print(format_report(res))
    if args.out:
        print(f"\nwritten: {args.out}/diagnose.md, diagnose.json, diagnose_rates.png")
    return 0


def _cmd_data(args) -> int:
    from .data import run_data

    return int(run_data(args) or 0)


def _cmd_encode(args) -> int:
    from .codec import encode_files

    info = encode_files(args.model, args.images, args.output, size=None if args.size == 0 else args.size)
    print(f"{info['file']}: {info['images']} image(s), indices {info['shape']}, {info['bytes']} bytes; "
          f"real {info['real_bpp']:.4f} bpp (nominal {info['nominal_bpp']:.4f} bpp)")
    return 0


def _cmd_decode(args) -> int:
    from .codec import decode_file

    paths = decode_file(args.model, args.tokens, args.output, force=args.force, max_images=args.max_images, batch_size=args.batch_size)
    for p in paths:
        print(p)
    return 0


def _cmd_tokenize(args) -> int:
    from .tokenize_dataset import tokenize

    info = tokenize(args.model, args.source, args.out, size=args.size, batch_size=args.batch_size, workers=args.workers,
                    shard_size=args.shard_size, progress=not args.quiet)
    if info.get("manifest"):
        print(f"{info['manifest']}: {info['num_images']} image(s) in {info['num_shards']} shard(s); "
              f"this process wrote {info['written_shards']} shard(s) ({info['written_images']} images, {info['images_per_s']:.1f} images/s), "
              f"skipped {info['skipped_shards']} finished")
    return 0


def _cmd_recipes(args) -> int:
    from .config import list_recipes, recipes_dir

    if getattr(args, "recipes_cmd", None) == "show":
        print(show_recipe(args.name, args.overrides), end="")
        return 0
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
    print(f"\ncheckpoint: {out}/final (use it with gq eval / diagnose / encode / tokenize)\n"
          f"metrics: {res['out_dir']}/eval.md, eval.json; reconstructions: {res['out_dir']}/recon_grid.png; rates: {out}/rates_hist.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``gq`` argument parser (every option has a help text)."""
    from .data import add_data_commands

    p = GQArgumentParser(prog="gq", description="Gaussian Quant: Gaussian VAE -> VQ-VAE (arXiv 2512.06609). "
                                                "`gq COMMAND --help` for a command's options.")
    p.add_argument("--version", action="version", version=version_string(), help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    quiet = {"action": "store_true", "help": "no progress bars"}

    overrides_help = "key=value overrides, e.g. train.steps=100 (the keys: `gq recipes show RECIPE`)"
    t = sub.add_parser("train", help="fine-tune with TDC (or a baseline quantizer) from a recipe",
                       description="Fine-tune the recipe's model with TDC (or train a baseline quantizer) under accelerate: "
                                   "one CPU, one GPU, or DDP with `accelerate launch -m gq_plugin.lab.cli train ...`. Writes "
                                   "train.output_dir/checkpoint-<step>/ (and final), metrics.jsonl, rates_hist.png.")
    t.add_argument("recipe", help="recipe YAML path or bundled name (see `gq recipes`)")
    t.add_argument("overrides", nargs="*", help=overrides_help)
    t.add_argument("--resume", default=None, help="checkpoint dir, or 'latest' (the newest checkpoint-<step> in train.output_dir)")
    t.add_argument("--quiet", **quiet)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate continuous VAE vs GQ",
                       description="Evaluate a checkpoint on the recipe's held-out crops as a continuous VAE (decode(mean)) "
                                   "and as a GQ VQ-VAE (decode(z_hat)): PSNR, SSIM, LPIPS, FD/KID-EffNetLite0, codebook usage, "
                                   "bpp and where the group rates lie against the TDC band. Prints the Markdown table; writes "
                                   "eval.md, eval.json, recon_grid.png.")
    e.add_argument("recipe", help="recipe YAML path or bundled name the checkpoint was trained with")
    e.add_argument("ckpt", metavar="CKPT", help="checkpoint dir (e.g. runs/demo/final), its vae/, or a save_pretrained dir")
    e.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.max_images=32 (the keys: `gq recipes show RECIPE`)")
    e.add_argument("--out", default=None, help="output folder for eval.md, eval.json, recon_grid.png (default: <train.output_dir>/eval)")
    e.add_argument("--quiet", **quiet)
    e.set_defaults(func=_cmd_eval)

    ca = sub.add_parser("calibrate", help="fine-tune the decoder alone on the GQ codewords of a trained run (docs/calibration.md)")
    ca.add_argument("run", metavar="RUN", help="a `gq train` output folder (config.yaml + final/) or one of its checkpoint folders")
    ca.add_argument("overrides", nargs="*", help="key=value: steps (200), lr (default: lr_scale x the run's optim.lr), lr_scale (0.3), "
                                                 "batch_size, seed (default: the run's), ckpt_every (50), log_every (10)")
    ca.add_argument("--out", required=True, help="the new run folder (config.yaml, checkpoint-<step>/, final, calibrate.json)")
    ca.add_argument("--resume", default=None, help="'latest' (or a checkpoint dir of --out): continue an interrupted calibration")
    ca.add_argument("--quiet", **quiet)
    ca.set_defaults(func=_cmd_calibrate)

    d = sub.add_parser("diagnose", help="rate histogram of a VAE -> recommended K, m")
    d.add_argument("model", metavar="MODEL_DIR", help="save_pretrained dir of a diffusers AutoencoderKL, or a checkpoint dir such as runs/demo/final "
                                                       "(a GQ-patched model is measured with its own K and m)")
    d.add_argument("--images", nargs="*", default=None, help="image files (default: eval photos from the cache)")
    d.add_argument("--data", default=None, help="photo folder for the default images (default: the `gq data fetch` cache)")
    d.add_argument("--size", type=int, default=64, help="resize + centre-crop side in pixels")
    d.add_argument("--max-images", type=int, default=64, help="use at most this many images")
    d.add_argument("--max-log2k", type=int, default=18, help="largest log2 K to recommend (search cost grows linearly with K)")
    d.add_argument("--out", default=None, help="also write diagnose.md, diagnose.json, diagnose_rates.png here")
    d.add_argument("--quiet", **quiet)
    d.set_defaults(func=_cmd_diagnose)

    da = sub.add_parser("data", help="real photos: `gq data fetch`, `gq data list`",
                        description="Real photos that install offline (Debian packages, wheels).")
    add_data_commands(da)
    da.set_defaults(func=_cmd_data)

    en = sub.add_parser("encode", help="images -> .gqt token file",
                        description="Encode images with a GQ model into one bit-packed .gqt token file (header with the "
                                    "codebook's settings and the model's hash, CRC-checked); prints the real and nominal bpp.")
    en.add_argument("images", nargs="+", help="image files (all end up the same size in one file)")
    en.add_argument("--model", required=True, help="GQ model dir (save_pretrained, or a checkpoint dir such as runs/demo/final)")
    en.add_argument("-o", "--output", required=True, help="token file to write (.gqt)")
    en.add_argument("--size", type=int, default=256, help="resize+centre-crop side (0: keep size, crop to a multiple of the factor)")
    en.set_defaults(func=_cmd_encode)

    de = sub.add_parser("decode", help=".gqt token file (or a `gq tokenize` shard) -> PNG (video tokens: one PNG per frame)",
                        description="Decode a .gqt token file (from `gq encode`, or a shard of `gq tokenize`) into PNG images "
                                    "with the GQ model it was made with; a file made with another codebook is refused, one "
                                    "made with other weights only with --force.")
    de.add_argument("tokens", help=".gqt file from `gq encode`, or a shard-*.gqt from `gq tokenize`")
    de.add_argument("--model", required=True, help="the GQ model dir the tokens were made with")
    de.add_argument("-o", "--output", required=True, help="PNG path; several images are written as <stem>_<i>.png")
    de.add_argument("--force", action="store_true", help="decode even if the file was made with other weights")
    de.add_argument("--max-images", type=int, default=None, help="decode only the first N images of the file")
    de.add_argument("--batch-size", type=int, default=16, help="images per decoder call")
    de.set_defaults(func=_cmd_decode)

    tk = sub.add_parser("tokenize", help="a whole dataset -> sharded token files + manifest (resumable, multi-process)",
                        description="Encode every image of SOURCE into bit-packed token shards DIR/shard-NNNNNN.gqt plus DIR/manifest.json. "
                                    "Re-running skips finished shards; under `accelerate launch` each rank writes its own shards.")
    tk.add_argument("model", metavar="MODEL", help="GQ model dir (save_pretrained, or a checkpoint dir such as runs/demo/final), "
                                                    "or a VQ/FSQ/LFQ/BSQ/TokenBridge checkpoint of `gq train`")
    tk.add_argument("source", metavar="SOURCE", nargs="+", help="image folder (searched recursively), or webdataset-style .tar shards / a glob of them")
    tk.add_argument("--out", required=True, help="output folder for shard-*.gqt and manifest.json")
    tk.add_argument("--size", type=int, default=256, help="resize (short side) + centre-crop side in pixels")
    tk.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
    tk.add_argument("--workers", type=int, default=2, help="DataLoader worker processes that read and resize images")
    tk.add_argument("--shard-size", type=int, default=1000, help="images per shard file (a killed run loses at most one shard per process)")
    tk.add_argument("--quiet", **quiet)
    tk.set_defaults(func=_cmd_tokenize)

    from .import_authors import add_import_authors_command

    add_import_authors_command(sub)
    from .prior.cli import add_prior_commands

    add_prior_commands(sub.add_parser("prior", help="token prior: `gq prior train`, `gq prior sample`",
                                      description="An autoregressive transformer prior over `gq tokenize` token files."))

    r = sub.add_parser("recipes", help="list the bundled recipes, or print one resolved (`gq recipes show NAME`)",
                       description="`gq recipes` (or `gq recipes list`) lists the bundled recipes; `gq recipes show NAME` "
                                   "prints a recipe merged with the defaults: every key that `gq train` / `gq eval` take "
                                   "as key=value.")
    rsub = r.add_subparsers(dest="recipes_cmd", metavar="{list,show}")
    rsub.add_parser("list", help="list the bundled recipes (the default)")
    rs = rsub.add_parser("show", help="print a recipe resolved with the defaults (and overrides) as YAML")
    rs.add_argument("name", metavar="NAME", help="bundled recipe name (e.g. tiny_cpu) or YAML path")
    rs.add_argument("overrides", nargs="*", help="key=value overrides to apply before printing")
    r.set_defaults(func=_cmd_recipes)

    dm = sub.add_parser("demo", help="the main job: fetch photos, train tiny_cpu, evaluate",
                        description="Fetch photos, fine-tune a recipe with TDC, evaluate continuous VAE vs GQ. "
                                    "Writes OUT/final (the checkpoint), OUT/eval/ (eval.md, eval.json, recon_grid.png), OUT/rates_hist.png.")
    dm.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.steps=100")
    dm.add_argument("--recipe", default="tiny_cpu", help="recipe name or YAML path")
    dm.add_argument("--data", default=None, help="photo folder (default: the `gq data fetch` cache, fetched if missing)")
    dm.add_argument("--set", default="small", help="photo set to fetch when the cache is empty (see `gq data list`)")
    dm.add_argument("--out", default=None, help="output folder (default: runs/demo)")
    dm.add_argument("--quiet", **quiet)
    dm.set_defaults(func=_cmd_demo)
    return fill_descriptions(p)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # `gq` alone: the help, not an error
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`gq calibrate RUN --out RUN2 steps=200`) join the others
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
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
