"""``gq prior train`` / ``gq prior sample`` (registered by :mod:`gq_plugin.lab.cli`)."""

from __future__ import annotations

import argparse
import json


def _cmd_train(args) -> int:
    from .train import train_prior

    # `TOKENS --out RUN k=v ...`: argparse hands the overrides after --out to --out (nargs="+")
    out, overrides = args.out[0], [*args.overrides, *args.out[1:]]
    res = train_prior(args.tokens, out, config=args.config, overrides=overrides, progress=not args.quiet)
    print(json.dumps({k: v for k, v in res.items() if isinstance(v, (int, float, str, dict))}, indent=2))
    return 0


def _cmd_sample(args) -> int:
    from .sample import sample

    res = sample(args.run, args.n, args.out, tokenizer=args.tokenizer, batch_size=args.batch_size, temperature=args.temperature,
                 top_k=args.top_k, seed=args.seed, progress=not args.quiet)
    print(f"{len(res['paths'])} sample(s) in {args.out}; grid {res['grid']}; tokens {res['tokens']}")
    return 0


def add_prior_commands(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``train`` and ``sample`` under ``gq prior``."""
    sub = p.add_subparsers(dest="prior_cmd", required=True, metavar="COMMAND")
    quiet = {"action": "store_true", "help": "no progress bars"}
    t = sub.add_parser("train", help="fit an autoregressive transformer prior (x-transformers) on a `gq tokenize` folder",
                       description="Train, or resume (rerun the same command), a prior over TOKENS in RUN: RUN/prior.json, "
                                   "RUN/checkpoint-<step>/, RUN/final, RUN/metrics.jsonl. `accelerate launch -m gq_plugin.lab.cli prior train ...` for several processes.")
    t.add_argument("tokens", metavar="TOKENS", help="token folder written by `gq tokenize` (shard-*.gqt + manifest.json)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (before or after --out RUN), e.g. train.steps=2000 train.batch_size=64 data.eval_tokens=DIR")
    t.add_argument("--out", required=True, nargs="+", metavar="RUN", help="run folder (resumed when it holds checkpoints)")
    t.add_argument("--config", default=None, help="YAML with model / optim / train / data sections (default: the built-in small prior)")
    t.add_argument("--quiet", **quiet)
    t.set_defaults(func=_cmd_train)
    s = sub.add_parser("sample", help="sample index maps from a trained prior and decode them to PNGs + a grid",
                       description="Decode through the tokenizer recorded with the training tokens, or --tokenizer MODEL.")
    s.add_argument("run", metavar="RUN", help="run folder of `gq prior train`")
    s.add_argument("--n", type=int, default=16, help="number of samples")
    s.add_argument("--out", required=True, help="output folder (sample-NNNN.png, grid.png, samples.gqt)")
    s.add_argument("--tokenizer", default=None, metavar="MODEL", help="decode with this tokenizer (GQ model or baseline checkpoint dir)")
    s.add_argument("--batch-size", type=int, default=16, help="samples per generate / decode call")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    s.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely codes (default: the full distribution)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--quiet", **quiet)
    s.set_defaults(func=_cmd_sample)
    return p
