"""TDC rule comparison on the tiny_cpu recipe (issue #13): ``rule="reference"`` vs ``rule="band"``.

    # train (one per rule and seed; resumable with --resume latest), then:
    python -m gq_plugin.lab.cli train tiny_cpu seed=S quantizer.tdc_rule=RULE train.output_dir=RUNS/RULE/seedS
    python benchmarks/tdc_rule/compare.py --runs RUNS [--seeds 0 1 2] [--out benchmarks/tdc_rule]

Evaluates every finished ``RUNS/<rule>/seed<k>/final`` checkpoint with the recipe's own evaluation
(:func:`gq_plugin.lab.evaluate.evaluate`: held-out crops, continuous VAE vs GQ, band statistics),
caches one JSON per (rule, seed) under ``<out>/results/`` (a rerun only evaluates what is new) and
writes ``RESULTS.md`` + ``results.json``: per-seed over-budget share and PSNRs, paired differences
band - reference on the same seed, and the issue's goal checked on every seed.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO) not in sys.path:  # this checkout's gq_plugin, not whichever one is installed
    sys.path.insert(0, str(REPO))

RULES = ("reference", "band")
GOAL_OVER = 0.05  # the goal: at most 5 % of held-out rates over budget


def evaluate_run(run: Path, rule: str, seed: int, data_root: str | None) -> dict:
    """Evaluate one finished training; returns the row stored in ``results/<rule>-seed<k>.json``."""
    from gq_plugin.lab.evaluate import evaluate

    # the run's own resolved config (recipe + the overrides it was trained with, e.g. another K)
    overrides = [f"train.output_dir={run}"] + ([f"data.root={data_root}"] if data_root else [])
    res = evaluate(run / "config.yaml", run / "final", out_dir=run / "eval", overrides=overrides, progress=False)
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = logs[-1]
    clamp_step = _first_step_all_clamped(logs)
    return {
        "rule": rule, "seed": seed, "checkpoint": str(run / "final"), "steps": last["step"],
        "continuous": res["continuous"], "gq": res["quantized"], "band": res["info"]["band"], "codebook": res["info"].get("codebook"),
        "final_multipliers": {k: last[k] for k in ("lam", "lam-max", "lam-min")},
        "step_all_multipliers_at_clamps": clamp_step,
        "train_bits_max_last": last.get("bits-max"),
    }


def _first_step_all_clamped(logs: list[dict]) -> int | None:
    """First logged step at which lam, lam-max and lam-min all sit at a clamp of the reference rule
    (lam at 1e-3 or 1e3, lam-max at 1 or 1e3, lam-min at 1e-3 or 1) -- the failure the issue reports."""
    def at(v, *bounds):
        return any(abs(v / b - 1) < 1e-3 for b in bounds)

    for e in logs:
        if at(e["lam"], 1e-3, 1e3) and at(e["lam-max"], 1.0, 1e3) and at(e["lam-min"], 1e-3, 1.0):
            return int(e["step"])
    return None


def collect(args) -> dict[tuple[str, int], dict]:
    """Rows keyed ``(rule or variant name, seed)``: cached result files, evaluating finished runs that have none."""
    out = Path(args.out) / "results"
    out.mkdir(parents=True, exist_ok=True)
    sources = [(rule, f"{rule}-seed{{}}.json", Path(args.runs) / rule) for rule in RULES]
    sources += [(name, f"variant-{name}-seed{{}}.json", Path(run_dir)) for name, run_dir, _ in args.variant]
    rows = {}
    for name, file_pattern, run_root in sources:
        for seed in args.seeds:
            f = out / file_pattern.format(seed)
            run = run_root / f"seed{seed}"
            if not f.is_file() and (run / "final").exists():
                print(f"evaluating {run}", flush=True)
                f.write_text(json.dumps(evaluate_run(run, name, seed, args.data_root), indent=2, default=float))
            if f.is_file():
                rows[(name, seed)] = json.loads(f.read_text())
    return rows


def _variant(spec: str) -> tuple[str, str, str]:
    """``NAME=DIR=DESCRIPTION`` of a ``--variant``."""
    parts = spec.split("=", 2)
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"--variant wants NAME=DIR=DESCRIPTION, got {spec!r}")
    return parts[0], parts[1], parts[2]


def _paired(rows, seeds, key, a="band", b="reference") -> list[tuple[int, float, float]]:
    return [(s, key(rows[(a, s)]), key(rows[(b, s)])) for s in seeds if (a, s) in rows and (b, s) in rows]


def _diffs(p) -> str:
    return " / ".join(f"{x - y:+.2f}" for _, x, y in p) + (f" (mean {statistics.fmean(x - y for _, x, y in p):+.2f})" if p else "")


def _seed_rows(rows: dict, name: str, seeds: list[int]) -> tuple[list[int], list[dict]]:
    """The seeds that rule or variant ``name`` has a result for, and those results."""
    have = [s for s in seeds if (name, s) in rows]
    return have, [rows[(name, s)] for s in have]


def _psnr_gq(r: dict) -> float:
    return r["gq"]["PSNR"]


def _psnr_cont(r: dict) -> float:
    return r["continuous"]["PSNR"]


def _conv_loss(r: dict) -> float:
    """The PSNR the GQ conversion itself costs (continuous minus GQ, same model)."""
    return r["continuous"]["PSNR"] - r["gq"]["PSNR"]


def noise_floor(rows: dict, name: str, seeds: list[int]) -> list[str]:
    """How far a change with no intended effect (variant ``name`` vs ``band``) moves GQ PSNR and the GQ
    conversion loss on a seed, against the rule difference (``band`` vs ``reference``)."""
    L = []
    for what, key in (("GQ PSNR", _psnr_gq), ("the GQ conversion loss", _conv_loss)):
        pairs = _paired(rows, seeds, key, name, "band")
        noise = [x - y for _, x, y in pairs]
        rule = [x - y for _, x, y in _paired(rows, seeds, key, "band", "reference")]
        if not noise or not rule:
            continue
        n, r = max(abs(d) for d in noise), max(abs(d) for d in rule)
        L += [f"* `{name}` (see the variants table) changes nothing the rule is meant to do, yet moves {what} by "
              + " / ".join(f"{d:+.2f}" for d in noise) + f" dB against `band` on seeds {', '.join(str(s) for s, _, _ in pairs)} (largest {n:.2f} dB).",
              f"* The rule difference `band` minus `reference` in {what} is at most {r:.2f} dB in size on any seed: "
              + ("**inside** that noise floor, so these seeds cannot say which rule is better on it; the paired "
                 "criterion is undecidable at this scale, not failed by a margin." if r <= n else
                 "**larger** than that noise floor.")]
    return ["## Noise floor", "", *L, ""] if L else []


def default_goal(rows: dict, name: str, seeds: list[int], steps: int) -> list[str]:
    """The issue's goal checked for the variant ``name`` that is the library's default band rule now."""
    have, rs = _seed_rows(rows, name, seeds)
    if not have:
        return []
    over = [r["band"]["over_budget"] for r in rs]
    L = [f"## The goal for today's default (`{name}` in the variants table)", "",
         f"* At most 5 % of held-out rates over budget after {steps} steps: "
         + ("**met**" if all(o <= GOAL_OVER for o in over) else "**not met**") + " on "
         + ", ".join(f"seed {s}: {100 * o:.1f} %" for s, o in zip(have, over)) + "."]
    for what, key in (("GQ PSNR", _psnr_gq), ("continuous PSNR", _psnr_cont), ("GQ conversion loss", _conv_loss)):
        p = _paired(rows, have, key, name, "reference")
        d = [x - y for _, x, y in p]
        if not d:
            continue
        lower_better = key is _conv_loss
        wins = sum((x < 0) if lower_better else (x > 0) for x in d)
        L.append(f"* {what} minus `reference`, paired by seed: " + " / ".join(f"{x:+.2f}" for x in d)
                 + f" dB (mean {statistics.fmean(d):+.2f}" + (f", sd {statistics.stdev(d):.2f}" if len(d) > 1 else "")
                 + f"; `{name}` better on {wins} of {len(d)} seeds).")
    return L + [""]


def variants_section(rows: dict, args, seeds: list[int]) -> list[str]:
    """Table of the band-rule variants tried (``--variant``), paired by seed against both rules."""
    if not args.variant:
        return []
    dflt = args.default
    L = ["## Band-rule variants tried" + (f" (`{dflt}` is today's default; the others were not adopted)" if dflt else " (not adopted)"), "",
         ("Same recipe, same seeds; each row changes one thing in the `band` rule. Paired differences in dB, seeds "
          + " / ".join(str(s) for s in seeds) + "."), "",
         ("| variant | seeds | over budget | in band | under budget | PSNR GQ | GQ PSNR minus `reference` | GQ PSNR minus `band` | "
          + (f"GQ PSNR minus `{dflt}` | " if dflt else "") + "continuous PSNR minus `reference` |"),
         "|---|---|---|---|---|---|---|---|---|" + ("---|" if dflt else "")]
    for name, _, desc in args.variant:
        have, rs = _seed_rows(rows, name, seeds)
        if not have:
            L.append(f"| `{name}`: {desc} | *not run yet* |" + " |" * (8 if dflt else 7))
            continue
        b = [r["band"] for r in rs]
        g = [_psnr_gq(r) for r in rs]
        L.append(f"| `{name}`: {desc} | {', '.join(map(str, have))} | "
                 + " / ".join(f"{100 * x['over_budget']:.1f}" for x in b) + " % | "
                 + " / ".join(f"{100 * x['in_band']:.0f}" for x in b) + " % | "
                 + " / ".join(f"{100 * x['under_budget']:.0f}" for x in b) + " % | "
                 + " / ".join(f"{x:.2f}" for x in g) + " | "
                 + _diffs(_paired(rows, have, _psnr_gq, name, "reference")) + " | " + _diffs(_paired(rows, have, _psnr_gq, name, "band")) + " | "
                 + ((_diffs(_paired(rows, have, _psnr_gq, name, dflt)) if name != dflt else "-") + " | " if dflt else "")
                 + _diffs(_paired(rows, have, _psnr_cont, name, "reference")) + " |")
    L.append("")
    return L


def report(rows: dict, args) -> Path:
    seeds = list(args.seeds)
    cfg = _run_config(args, seeds)
    q, o = cfg.get("quantizer", {}), cfg.get("optim", {})
    K, m, steps = int(q.get("codebook_size", 1024)), int(q.get("codebook_dim", 4)), int(cfg.get("train", {}).get("steps", 600))
    T, a = math.log2(K), float(q.get("tolerance", 0.5))
    sched = o.get("lr_schedule", "constant")
    # a saved config.yaml is the resolved recipe: a cosine run's has lr_final_frac
    optim = (f"Adam, LR {o['lr']:g}" + (f" -> {o['lr'] * o['lr_final_frac']:g} (cosine)" if sched == "cosine" else " (constant)")) if o else "unknown"
    extra = "".join(f" {x}" for x in args.override)
    L = [f"# TDC rule: `reference` (the authors') vs `band` (decoupled, quantile-driven) — tiny_cpu, K = 2^{T:g}, {steps} steps", "",
         "Generated by `benchmarks/tdc_rule/compare.py` from the per-run result files in `results/`.", "",
         f"* Recipe `tiny_cpu` (diffusers AutoencoderKL f4, 8 latent channels, m = {m} -> {8 // m} groups per token, "
         f"K = 2^{T:g}: band {T - a:g}-{T + a:g} bits, over budget = R_g > {T + a:g} bits; lam_factor {q.get('lam_factor')}, {steps} steps, "
         f"batch 8, 64x64 crops, trained from random initialisation; the runs' optimizer: {optim})"
         + (f"; overrides of the recipe: `{extra.strip()}`" if extra else "")
         + "; only `quantizer.tdc_rule` differs between the rules. Same seeds for both rules (seed = initialisation + data order).",
         f"* Training: `python -m gq_plugin.lab.cli train tiny_cpu seed=S quantizer.tdc_rule=RULE{extra} train.output_dir=RUNS/RULE/seedS` "
         "(2 CPU cores shared with other jobs, `OMP_NUM_THREADS=1`).",
         *[f"* {n}" for n in args.note],
         "* Evaluation: the recipe's own `gq eval` on its held-out crops (photos split by photo); band statistics of the "
         "held-out group rates (`gq_plugin.rate.band_statistics`).",
         f"* This file: `{_command()}`", ""]
    L += ["## Per seed", "",
          "| rule | seed | over budget | in band | under budget | q99 (bits) | max (bits) | PSNR continuous | PSNR GQ | GQ gap (dB) | "
          "LPIPS GQ | final lam / lam-max / lam-min | all multipliers at clamps from step |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rule in RULES:
        for s in seeds:
            r = rows.get((rule, s))
            if r is None:
                L.append(f"| {rule} | {s} | *not run yet* |" + " |" * 10)
                continue
            b, c, g, mult = r["band"], r["continuous"], r["gq"], r["final_multipliers"]
            L.append(f"| {rule} | {s} | {100 * b['over_budget']:.1f} % | {100 * b['in_band']:.1f} % | {100 * b['under_budget']:.1f} % | "
                     f"{b['quantiles']['q99']:.2f} | {b['max']:.2f} | {c['PSNR']:.2f} | {g['PSNR']:.2f} | {g['PSNR'] - c['PSNR']:+.2f} | "
                     f"{g['LPIPS-alex']:.4f} | {mult['lam']:.3g} / {mult['lam-max']:.3g} / {mult['lam-min']:.3g} | "
                     f"{r['step_all_multipliers_at_clamps'] or 'never'} |")
    L += ["", "## Paired by seed (band minus reference, same seed)", ""]
    verdicts = {}
    checks = [("over-budget share (points of %)", lambda r: 100 * r["band"]["over_budget"], False),
              ("PSNR GQ (dB)", _psnr_gq, True),
              ("PSNR continuous (dB)", _psnr_cont, True),
              # what the rule is for: the PSNR the GQ conversion itself costs (continuous minus GQ, same model)
              ("GQ conversion loss (dB, continuous minus GQ)", _conv_loss, False),
              ("LPIPS-alex GQ", lambda r: r["gq"]["LPIPS-alex"], False)]
    for name, key, higher in checks:
        p = _paired(rows, seeds, key)
        if not p:
            L.append(f"* {name}: no common seed yet.")
            continue
        diffs = [b - a for _, b, a in p]
        better = all((d > 0) if higher else (d < 0) for d in diffs)
        not_worse = all((d >= 0) if higher else (d <= 0) for d in diffs)
        verdicts[name] = {"seeds": [s for s, _, _ in p], "diffs": diffs, "band_better_on_every_seed": better, "band_not_worse_on_every_seed": not_worse}
        L.append(f"* {name}: " + ", ".join(f"seed {s}: {b:.3f} vs {a:.3f} ({b - a:+.3f})" for s, b, a in p)
                 + f" -> band {'better on every seed' if better else ('not worse on every seed' if not_worse else 'NOT better on every seed')}"
                 + f" ({len(p)} of {len(seeds)} seeds; mean {statistics.fmean(diffs):+.3f}"
                 + (f", sd {statistics.stdev(diffs):.3f}" if len(diffs) > 1 else "") + ").")
    over = [rows[("band", s)]["band"]["over_budget"] for s in seeds if ("band", s) in rows]
    n_pairs = len(_paired(rows, seeds, lambda r: 0.0))
    goal_over = bool(over) and all(o <= GOAL_OVER for o in over)
    L += ["", "## The issue's goal", "",
          f"* At most 5 % of held-out rates over budget with `band` after {steps} steps: "
          + (("**met**" if goal_over else "**not met**") + " on " + ", ".join(f"seed {s}: {100 * rows[('band', s)]['band']['over_budget']:.1f} %"
                                                                          for s in seeds if ("band", s) in rows) if over else "not measured yet") + ".",
          "* Continuous and GQ PSNR at least as good as `reference`, paired by seed: "
          + (("**met**" if verdicts.get("PSNR GQ (dB)", {}).get("band_not_worse_on_every_seed") and
              verdicts.get("PSNR continuous (dB)", {}).get("band_not_worse_on_every_seed") else "**not met**")
             + f" on the {n_pairs} seed(s) measured" if n_pairs else "not measured yet")
          + (f"; {len(seeds) - n_pairs} seed(s) still missing (see the per-seed table)." if n_pairs < len(seeds) else "."), ""]
    if args.default:
        L += default_goal(rows, args.default, seeds, steps)
    if args.noise_variant:
        L += noise_floor(rows, args.noise_variant, seeds)
    L += variants_section(rows, args, seeds)
    L += rate_psnr_section(rows, args, seeds)
    plot = plot_rates(rows, Path(args.out), seeds)
    if plot:
        L += [f"![held-out group rates, reference vs band]({plot.name})", ""]
    path = Path(args.out) / "RESULTS.md"
    path.write_text("\n".join(L))
    (Path(args.out) / "results.json").write_text(json.dumps(
        {"command": _command(), "rows": {f"{k[0]}-seed{k[1]}": v for k, v in rows.items()}, "paired": verdicts,
         "goal": {"over_budget_at_most_5pct_every_band_seed": goal_over, "seeds_measured": n_pairs}}, indent=2, default=float))
    return path


def _names(args) -> list[str]:
    """The rules and the ``--variant`` names, in report order."""
    return [*RULES, *(name for name, _, _ in args.variant)]


def rate_psnr_section(rows: dict, args, seeds: list[int]) -> list[str]:
    """Mean held-out rate against continuous PSNR, GQ PSNR and the conversion loss, per rule and variant:
    where the rules differ in continuous PSNR, does it follow the rate they spend, and does GQ PSNR?"""
    table, runs = [], []
    mean = statistics.fmean
    for name in _names(args):
        have, rs = _seed_rows(rows, name, seeds)
        if not have:
            continue
        runs += rs
        table.append(f"| `{name}` | {len(have)} | {mean(r['band']['mean'] for r in rs):.2f} | {mean(100 * r['band']['over_budget'] for r in rs):.1f} % | "
                     f"{mean(_psnr_cont(r) for r in rs):.2f} | {mean(_psnr_gq(r) for r in rs):.2f} | {mean(_conv_loss(r) for r in rs):.2f} |")
    if not table:
        return []
    x = [r["band"]["mean"] for r in runs]
    fits = []
    if len(runs) > 2 and statistics.pstdev(x) > 0:
        for what, key in (("continuous PSNR", _psnr_cont), ("GQ PSNR", _psnr_gq), ("the GQ conversion loss", _conv_loss)):
            y = [key(r) for r in runs]
            slope, _ = statistics.linear_regression(x, y)
            fits.append(f"{what} {slope:+.2f} dB per bit (r = {statistics.correlation(x, y):+.2f})")
    L = ["## Rate versus PSNR", "",
         "Means over each row's seeds (rows with fewer seeds are not paired with the others). "
         + (f"Least-squares fit over all {len(runs)} runs against their mean held-out rate: " + "; ".join(fits) + "." if fits else ""), "",
         "| rule / variant | seeds | mean rate (bits per group) | over budget | PSNR continuous | PSNR GQ | GQ conversion loss (dB) |",
         "|---|---|---|---|---|---|---|", *table, ""]
    plot = plot_psnr_rate(rows, Path(args.out), seeds, _names(args))
    if plot:
        L += [f"![continuous and GQ PSNR against the mean held-out rate, every run]({plot.name})", ""]
    return L


def plot_psnr_rate(rows: dict, out: Path, seeds: list[int], names: list[str]) -> Path | None:
    """Two panels, one point per run: continuous and GQ PSNR against the run's mean held-out group rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120, sharey=True)
    t = None
    for i, name in enumerate(names):
        have, rs = _seed_rows(rows, name, seeds)
        if not have:
            continue
        x = [r["band"]["mean"] for r in rs]
        t = rs[0]["band"]["target_bits"]
        for ax, key in zip(axes, (_psnr_cont, _psnr_gq)):
            ax.scatter(x, [key(r) for r in rs], color=f"C{i}", marker="os^vDP*X"[i % 8], s=22, label=f"{name} ({len(have)} seeds)")
    if t is None:
        plt.close(fig)
        return None
    for ax, what in zip(axes, ("continuous VAE, decode(mean)", "GQ, decode(z_hat)")):
        ax.axvline(t, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(f"mean held-out group rate (bits; log2 K = {t:g})")
        ax.set_title(what, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR (dB)")
    axes[1].legend(fontsize=6)
    fig.suptitle(f"Rate spent vs PSNR per run (tiny_cpu, K = 2^{t:g})", fontsize=10)
    from gq_plugin.lab.plots import save_figure

    return save_figure(fig, out / "psnr_vs_rate.png")


def _run_config(args, seeds) -> dict:
    """The resolved config (saved ``config.yaml``) of the first run found: K, m, steps and optimizer of the runs."""
    import yaml

    for rule in RULES:
        for s in seeds:
            cfg = Path(args.runs) / rule / f"seed{s}" / "config.yaml"
            if cfg.is_file():
                return yaml.safe_load(cfg.read_text())
    return {}


def plot_rates(rows: dict, out: Path, seeds: list[int]) -> Path | None:
    """Held-out rate quantiles per rule and seed against the band (from the result files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [(rule, s) for rule in RULES for s in seeds if (rule, s) in rows]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    qs = ["q01", "q05", "q50", "q95", "q99"]
    for i, (rule, s) in enumerate(have):
        b = rows[(rule, s)]["band"]
        v = [b["quantiles"][q] for q in qs]
        ax.plot(qs + ["max"], v + [b["max"]], marker="o", color="C0" if rule == "reference" else "C1", alpha=0.8,
                label=f"{rule} seed {s} ({100 * b['over_budget']:.1f} % over)")
        t, a = b["target_bits"], b["tolerance"]
    ax.axhspan(t - a, t + a, color="green", alpha=0.15, label=f"band {t - a:g}-{t + a:g} bits")
    ax.set_yscale("log")
    ax.set_ylabel("group rate (bits)")
    ax.set_title(f"Held-out group-rate quantiles (tiny_cpu, K = 2^{t:g})")
    ax.legend(fontsize=6)
    from gq_plugin.lab.plots import save_figure

    return save_figure(fig, out / "rate_quantiles.png")


def _command() -> str:
    return "python benchmarks/tdc_rule/compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="folder with <rule>/seed<k>/ training outputs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(HERE))
    p.add_argument("--data-root", default=None)
    p.add_argument("--variant", type=_variant, action="append", default=[],
                   help="NAME=DIR=DESCRIPTION: band-rule variant runs DIR/seed<k>/, paired against both rules in their own table")
    p.add_argument("--noise-variant", default=None, help="the --variant NAME that only perturbs the band rule (noise floor)")
    p.add_argument("--note", action="append", default=[], help="a line added to the setup list (provenance of the runs)")
    p.add_argument("--default", default=None, help="the --variant NAME that is the library's default band rule now (its goal is checked too)")
    p.add_argument("--override", action="append", default=[],
                   help="a recipe override the runs were trained with (e.g. quantizer.codebook_size=64), shown in the training command")
    args = p.parse_args(argv)
    rows = collect(args)
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
