"""RESULTS.md section for benchmarks/paper/pretrained.py (the from-pretrained protocol), from result files only."""
# ruff: noqa: ISC004

from __future__ import annotations

import json
from pathlib import Path

from report import COLS, compare, fmt, info, metric, plot_main

BEGIN, END = "<!-- from-pretrained:begin -->", "<!-- from-pretrained:end -->"


def lr_tag(lr) -> str:
    return f"lr{lr:g}"


def point_tag(ps: int, steps: int, default_steps: int) -> str:
    """Result-folder suffix of a (pretrain seed, steps) point (pretrained.point_tag: empty at 0 / the default)."""
    return (f"@ps{ps}" if ps else "") + (f"@steps{steps}" if steps != default_steps else "")


def rate_of(s: dict) -> dict:
    """The scale's bit budget: ``bits`` per token, latent channels ``C``, GQ group size ``m``, ``K = 2^(bits m / C)``,
    FSQ ``levels``, TokenBridge ``tb_bits`` per channel (None where ``bits`` is not a whole number of bits per channel),
    pixels per token ``ppt`` and ``bpp`` (default: 12 bits, m = C = 6)."""
    c = s["model"]["latent_channels"]
    bits, m = s.get("bits", 12), s.get("m", c)
    ppt = 4 ** (len(s["model"]["block_out_channels"]) - 1)
    return {"bits": bits, "C": c, "m": m, "K": 2 ** (bits * m // c), "levels": s.get("fsq_levels", [8, 8, 8, 8]), "tb_bits": bits // c if bits % c == 0 else None,
            "ppt": ppt, "bpp": bits / ppt}


def load(out: Path, row: str, lr, seeds: int, tag: str = "") -> list[dict]:
    d = out / "results" / ((row if lr is None else f"{row}@{lr_tag(lr)}") + tag)
    return [json.loads((d / f"seed{s}.json").read_text()) for s in range(seeds) if (d / f"seed{s}.json").is_file()]


def _line(label: str, runs: list[dict], seeds: int) -> str:
    if not runs:
        return f"| {label} | *pending* |" + " |" * (len(COLS) + 4)
    n = len(runs)
    cells = [fmt(metric(runs, k), d, n) for k, _, d in COLS]
    over = info(runs, "band", "over_budget")
    cells.append(fmt((100 * over[0], 100 * over[1]), 1, n) + " %" if over else "-")
    used, ent = info(runs, "codebook", "used"), info(runs, "codebook", "entropy_bits")
    cells.append(f"{used[0]:,.0f} / {ent[0]:.2f}" if used and ent else "-")
    bpp = info(runs, "bpp")
    cells.append(f"{bpp[0]:.3f}" if bpp else "continuous")
    tt = info(runs, "train_time_s")
    cells.append(f"{tt[0] / 60:.1f} min" if tt else "-")
    return f"| {label} | " + " | ".join(cells) + f" | {n}/{seeds} |"


CLAIMS = [("Paper: ~5 dB from vanilla + GQ to TDC + GQ (vanilla = fixed KL weight)", "tdc+gq", "vanilla-fixed+gq", "PSNR", True),
          ("TDC + GQ vs the rate-matched vanilla + GQ", "tdc+gq", "vanilla-matched+gq", "PSNR", True),
          ("Fine-tuning with TDC improves on converting the pretrained VAE directly", "tdc+gq", "pre+gq", "PSNR", True),
          ("Paper: TDC improves TokenBridge by 3.4 dB (TDC VAE vs vanilla VAE)", "tokenbridge-tdc", "tokenbridge-vanilla-fixed", "PSNR", True),
          ("TokenBridge on the TDC fine-tune vs on the pretrained VAE", "tokenbridge-tdc", "tokenbridge-pre", "PSNR", True),
          ("Band rule vs the authors' rule, both + GQ", "tdc+gq", "tdc-ref+gq", "PSNR", True)]
for _b in ("vq", "simvq", "fsq", "lfq", "bsq"):
    CLAIMS += [(f"Paper: GQ beats {_b.upper()} on PSNR", "tdc+gq", _b, "PSNR", True),
               (f"Paper: GQ beats {_b.upper()} on LPIPS", "tdc+gq", _b, "LPIPS-alex", False)]
for _t, _name in (("tdc", "band rule"), ("tdc-ref", "authors' rule")):  # issue #26: decoder calibration at equal total steps
    CLAIMS += [(f"Calibration ({_name}): GQ + calibration beats VQ on PSNR at equal total steps", f"{_t}+gq+cal", "vq", "PSNR", True),
               (f"Calibration ({_name}): GQ + calibration beats VQ on LPIPS at equal total steps", f"{_t}+gq+cal", "vq", "LPIPS-alex", False),
               (f"Calibration ({_name}): the calibration steps improve GQ PSNR", f"{_t}+gq+cal", f"{_t}+gq-precal", "PSNR", True)]
CLAIMS += [  # issue #26 items 2 and 5
    ("Spend (band rule, tdc_spend): GQ + calibration beats VQ on PSNR at equal total steps", "tdc-spend+gq+cal", "vq", "PSNR", True),
    ("Spend (band rule, tdc_spend): GQ + calibration beats VQ on LPIPS at equal total steps", "tdc-spend+gq+cal", "vq", "LPIPS-alex", False),
    ("Spend vs today's band rule, both calibrated", "tdc-spend+gq+cal", "tdc+gq+cal", "PSNR", True),
    ("Spend vs the authors' rule, both calibrated", "tdc-spend+gq+cal", "tdc-ref+gq+cal", "PSNR", True),
    ("TDC per channel improves TokenBridge (vs the vanilla fine-tune)", "tokenbridge-tdc-tb", "tokenbridge-vanilla-fixed", "PSNR", True),
    ("TDC per channel improves TokenBridge (vs the pretrained VAE)", "tokenbridge-tdc-tb", "tokenbridge-pre", "PSNR", True),
    ("Paper: larger m is better at equal bits: m = C (one group) beats m = C/2 (two groups), authors' rule, calibrated",
     "tdc-ref+gq+cal", "tdc-ref-m3+gq+cal", "PSNR", True)]
CAL_SPLITS = (300, 600)  # longer calibrations at equal total steps (from the precal run's checkpoint at steps - n)
CAL_LR_MULTS = (0.1, 0.3, 3.0)  # calibration LRs beside the TDC fine-tune's own (multiples of it)
CAL_SPLIT_LR_MULTS = (0.3,)  # the longer calibrations also at these multiples (besides 1)
for _n in CAL_SPLITS:  # issue #26 item 3: the calibration's own settings, authors' rule
    for _sfx in ("", *(f"-lrx{_m:g}" for _m in CAL_SPLIT_LR_MULTS)):
        _r, _at = f"tdc-ref+gq+cal{_n}{_sfx}", f" at {_sfx[4:]} x LR" if _sfx else ""
        CLAIMS += [(f"Calibration for {_n} of the steps{_at} (authors' rule) beats VQ on PSNR at equal total steps", _r, "vq", "PSNR", True),
                   (f"Calibration for {_n} of the steps{_at} (authors' rule) beats VQ on LPIPS at equal total steps", _r, "vq", "LPIPS-alex", False),
                   (f"Calibration for {_n} of the steps{_at} vs for the default (authors' rule)", _r, "tdc-ref+gq+cal", "PSNR", True)]
for _t, _name in (("tdc", "band rule"), ("tdc-ref", "authors' rule")):
    for _m in CAL_LR_MULTS:
        CLAIMS += [(f"Calibration at {_m:g} x LR vs at the fine-tune's LR ({_name})", f"{_t}+gq+cal-lrx{_m:g}", f"{_t}+gq+cal", "PSNR", True),
                   (f"Calibration at {_m:g} x LR ({_name}) beats VQ on PSNR at equal total steps", f"{_t}+gq+cal-lrx{_m:g}", "vq", "PSNR", True),
                   (f"Calibration at {_m:g} x LR ({_name}) beats VQ on LPIPS at equal total steps", f"{_t}+gq+cal-lrx{_m:g}", "vq", "LPIPS-alex",
                    False)]
CLAIMS += [(f"Calibrated GQ (authors' rule, 0.3 x LR, gq calibrate's default) beats {_b.upper()} on {_k}", "tdc-ref+gq+cal-lrx0.3", _b, _k,
            _k == "PSNR") for _b in ("fsq", "lfq", "bsq") for _k in ("PSNR", "LPIPS-alex")]
CLAIMS += [(f"Calibrated GQ (authors' rule, 0.3 x LR) beats VQ without the large-codebook options on {_k}", "tdc-ref+gq+cal-lrx0.3",
            "vq-plain", _k, _k == "PSNR") for _k in ("PSNR", "LPIPS-alex")]
CLAIMS += [("VQ with the large-codebook options vs without them", "vq", "vq-plain", "PSNR", True),
           ("VQ: k-means init on K encoder latents vs on the first batch", "vq-kinit", "vq", "PSNR", True)]
CLAIMS += [(f"Calibrated GQ (authors' rule, 0.3 x LR) beats VQ with the k-means init on K latents on {_k}", "tdc-ref+gq+cal-lrx0.3",
            "vq-kinit", _k, _k == "PSNR") for _k in ("PSNR", "LPIPS-alex")]
CLAIMS += [("TDC per channel, authors' rule, improves TokenBridge (vs the vanilla fine-tune)", "tokenbridge-tdc-ref-tb",
            "tokenbridge-vanilla-fixed", "PSNR", True),
           ("TDC per channel: the authors' rule vs the band rule, through TokenBridge", "tokenbridge-tdc-ref-tb", "tokenbridge-tdc-tb", "PSNR",
            True)]
TB_OWN_BITS = 6  # TokenBridge's released setting: 6 bits (64 levels) per channel; issue #26 item 5 at that rate too
CLAIMS += [(f"TDC per channel improves TokenBridge at its own {TB_OWN_BITS} bits per channel (vs the vanilla fine-tune) on {_k}",
            f"tokenbridge-b{TB_OWN_BITS}-tdc-tb{TB_OWN_BITS}", f"tokenbridge-b{TB_OWN_BITS}-vanilla-fixed", _k, _k == "PSNR")
           for _k in ("PSNR", "LPIPS-alex")]
CLAIMS += [(f"TDC per channel, authors' rule, improves TokenBridge at its own {TB_OWN_BITS} bits per channel (vs the vanilla fine-tune)",
            f"tokenbridge-b{TB_OWN_BITS}-tdc-ref-tb{TB_OWN_BITS}", f"tokenbridge-b{TB_OWN_BITS}-vanilla-fixed", "PSNR", True)]
CLAIMS += [(f"TDC per channel improves TokenBridge at its own {TB_OWN_BITS} bits per channel (vs the pretrained VAE)",
            f"tokenbridge-b{TB_OWN_BITS}-tdc-tb{TB_OWN_BITS}", f"tokenbridge-b{TB_OWN_BITS}-pre", "PSNR", True)]
TOLERANCES = (0.25, 1.0)  # TDC tolerances (alpha, bits) beside the default 0.5, authors' rule, calibrated
for _a in TOLERANCES:  # issue #26 item 4: TDC's tolerance
    CLAIMS += [(f"TDC tolerance {_a:g} vs 0.5 bits (authors' rule, calibrated)", f"tdc-ref-tol{_a:g}+gq+cal", "tdc-ref+gq+cal", "PSNR", True),
               (f"TDC tolerance {_a:g} (authors' rule, calibrated) beats VQ on PSNR at equal total steps", f"tdc-ref-tol{_a:g}+gq+cal", "vq",
                "PSNR", True)]
BETAS = (0, 0.5, 2)  # GQ beta values measured beside the default 1 on the calibrated rows (pretrained.plan's rows)
for _t, _name in (("tdc", "band rule"), ("tdc-ref", "authors' rule")):  # issue #26 item 4: GQ's beta at conversion
    CLAIMS += [(f"GQ beta = {_b:g} vs beta = 1 ({_name}, calibrated)", f"{_t}+gq+cal-beta{_b:g}", f"{_t}+gq+cal", "PSNR", True)
               for _b in BETAS]


def _verdicts(res: dict) -> list[str]:
    """The claims whose two rows this scale has (``res``: row -> result files at the chosen LR)."""
    out = []
    for claim, a, b, key, hb in CLAIMS:
        if a not in res or b not in res:
            continue
        c = compare(a, b, res, key, hb)
        if c is None:
            out.append(f"* {claim}: *pending* (`{a}` or `{b}` has no result at its chosen LR yet).")
            continue
        sentence, v = c
        word = "**agrees**" if v else ("**unresolved** (signs differ across seeds)" if v is None else "**disagrees**")
        out.append(f"* {claim}: {word}. {sentence}.")
    return out


def write_section(out: Path, scale: str, rows: dict, finetunes: dict, s: dict, seeds: int, cmd: str, machine: str, best: dict,
                  points: list[tuple[int, int]] | None = None, campaign: str | None = None, summarise: bool = True) -> Path:
    """Write ``<out>/RESULTS.md`` (and ``block.md``) from the result files under ``<out>/results``.

    ``best``: the chosen LR per fine-tune (``pretrained.chosen_lr``); ``points``: the (pretrain seed,
    total steps) points to report, each with its own table and paired verdicts (default: seed 0 at the
    scale's steps); ``campaign``: the campaign's name (its LRs come from the default campaign's grid);
    ``summarise``: also write ``block.md`` and embed it in ``benchmarks/paper/RESULTS.md`` (``pretrained.summarises``)."""
    out = Path(out)
    points = points or [(0, s["steps"])]
    rt = rate_of(s)
    head = "| row | " + " | ".join(c for _, c, _ in COLS) + f" | over budget (R_g > {rt['bits'] * rt['m'] // rt['C'] + 0.5:g}) | codes used / entropy (bits), eval tokens | bpp | train time | seeds |"
    sep = "|" + "---|" * (len(COLS) + 6)
    title = f"# From-pretrained protocol — scale `{scale}`" + (f", campaign `{campaign}`" if campaign else "") + " (issues #13, #26)"
    L = [title, "",
         "Generated by `benchmarks/paper/report_pretrained.py` from the result files under `results/`; rows without a result "
         "file are *pending*.", "",
         f"* Pretraining: one Gaussian VAE per pretrain seed (diffusers AutoencoderKL, block_out_channels {s['model']['block_out_channels']}, "
         f"{s['model']['latent_channels']} latent channels, f{2 ** (len(s['model']['block_out_channels']) - 1)}), fixed KL weight "
         f"{s['kl_weight']:g} (per bit, against a per-image summed L1 + {s['lpips']:g} LPIPS loss), {s['pretrain_steps']} steps at LR "
         f"{s['pretrain_lr']:g}; each is shared by every row of its pretrain seed.",
         f"* Fine-tuning: {s['steps']} steps for every method (unless a section says otherwise), batch {s['batch']}, LR grid {s['lrs']}: "
         "every LR on seed 0, then each method's best seed-0 LR (PSNR of its own quantized row) on the other seeds. Equal bits: "
         f"{rt['bits']} bits per token for every quantized row (GQ K = 2^{rt['bits'] * rt['m'] // rt['C']}, m = {rt['m']}; VQ "
         f"2^{rt['bits']}{' and SimVQ 2^' + str(rt['bits']) if 'simvq' in finetunes else ''}; FSQ {rt['levels']}; LFQ / BSQ "
         f"{rt['bits']} bits" + (f"; TokenBridge {rt['tb_bits']} bits x {rt['C']} channels" if rt["tb_bits"] is not None else
         "; no TokenBridge row: no whole number of bits per channel") + f") = {rt['bpp']:g} bpp."
         + (f" Except the `tokenbridge-b{TB_OWN_BITS}-…` and `…tb{TB_OWN_BITS}+gq` rows: TokenBridge at its own {TB_OWN_BITS} bits "
            f"per channel ({TB_OWN_BITS * rt['C']} bits per token), a pair of their own." if f"tdc-tb{TB_OWN_BITS}" in finetunes else "")
         + (f" The LRs are scale `{s['pretrain_of']}`'s choices and its pretrained VAE(s) are shared (a rate-distortion point)."
            if s.get("pretrain_of") else "")
         + (f" VQ's large-codebook options: {finetunes['vq']}." if "lookup_dim" in finetunes["vq"] else ""),
         "* `vanilla-fixed` = the paper's vanilla (the pretraining's fixed KL weight, no rate matching); `vanilla-matched` = only "
         "TDC's global multiplier (a KL weight steered to a mean rate of log2 K). `tdc` = TDC with the band rule, its hinge at log2 K "
         "(`tdc_hinge: 0`, the default when these rows were measured; today's default is log2 K + alpha/2), `tdc-ref` = the authors' rule.",
         f"* Codes used / entropy: distinct indices and their entropy over the {s['eval_images'] * s['size'] ** 2 // rt['ppt']:,} eval "
         f"tokens ({s['eval_images']} crops of {s['size']}x{s['size']}), so at most min(K, that many) codes can show.",
         f"* Calibration (issue #26): `…+gq-precal` = the TDC fine-tune after steps - {s['cal_steps']} steps + GQ; `…+gq+cal` = the same "
         f"model after {s['cal_steps']} further steps of the decoder alone on its GQ codewords (`gq calibrate`, encoder and tokens "
         "frozen, same loss and LR): equal total steps with `vq`.",
         f"* Commands: `{cmd}` (each result file records its own command; new ones also their machine). Report written on: {machine}.", ""]
    if campaign:
        L += [f"Campaign `{campaign}`: every row here was measured on the pretrained VAE(s) trained in this campaign; pair its rows only "
              "with each other, never with the default campaign's (another machine's pretrained VAE differs).", ""]
    L += ["## Chosen LR per method (seed 0)", "", "| fine-tune | chosen LR |", "|---|---|"]
    L += [f"| {t} | {best[t]:g} |" if best.get(t) is not None else f"| {t} | *pending (grid incomplete)* |" for t in finetunes
          if "lr_of" not in finetunes[t]]
    if campaign:
        L += ["", "(The default campaign's choices; the calibration fine-tunes use the TDC fine-tune's LR.)"]
    else:
        L += ["", "(The calibration fine-tunes `…-precal` / `…+cal` use the LR chosen for their TDC fine-tune.)", "",
              "## Every row at every LR", "", head, sep]
        for r, sp in rows.items():
            if sp["train"] == "pretrain":
                L.append(_line(f"{sp['label']} (`{r}`)", load(out, r, None, seeds), seeds))
                continue
            if "lr_of" in finetunes[sp["train"]]:
                continue
            for lr in s["lrs"]:
                mark = " **chosen**" if best.get(sp["train"]) == lr else ""
                L.append(_line(f"{sp['label']} (`{r}`) LR {lr:g}{mark}", load(out, r, lr, seeds), seeds))
    block_lines, block_verdicts, plot = [], [], None
    for i, (ps, n) in enumerate(points):
        tag = point_tag(ps, n, s["steps"])
        res = {r: (load(out, r, None, seeds, point_tag(ps, s["steps"], s["steps"])) if sp["train"] == "pretrain"
                   else load(out, r, best[sp["train"]], seeds, tag) if best.get(sp["train"]) is not None else [])
               for r, sp in rows.items()}
        lines = [_line(f"{sp['label']} (`{r}`)" + ("" if sp["train"] == "pretrain" else
                                                  f" LR {best[sp['train']]:g}" if best.get(sp["train"]) is not None else " (LR grid incomplete)"),
                       res[r], seeds) for r, sp in rows.items()]
        verdicts = _verdicts(res)
        L += ["", f"## Pretrain seed {ps}, {n} steps: rows at the chosen LRs", "", head, sep] + lines
        L += ["", f"### Verdicts (pretrain seed {ps}, {n} steps; paired by seed)", ""] + verdicts
        if i == 0:
            block_lines, block_verdicts = lines, verdicts
            plot_rows = {r: {**sp, "group": "main"} for r, sp in rows.items() if sp["kind"] != "continuous"}
            plot = plot_main(out, plot_rows, res, ref="tdc+gq" if res.get("tdc+gq") else "tdc+gq+cal")
            if plot:
                L += ["", f"![from-pretrained rows, paired by seed]({plot.name})"]
        pending = [r for r in rows if not res.get(r)]
        L += ["", f"Rows without a chosen-LR result yet ({len(pending)}): " + (", ".join(f"`{r}`" for r in pending) or "none") + "."]
    campaigns = sorted((out / "campaigns").glob("*/RESULTS.md")) if not campaign else []
    if campaigns:
        L += ["", "## Campaigns", "", "Measurement campaigns on other machines (each with its own pretrained VAEs; pairs only within one):", ""]
        L += [f"* [`{c.parent.name}`](campaigns/{c.parent.name}/RESULTS.md)" for c in campaigns]
    pss, lens = list(dict.fromkeys(p for p, _ in points)), list(dict.fromkeys(n for _, n in points))
    opts = ((f" --campaign {campaign}" if campaign else "") + (f" --pretrain-seeds {','.join(map(str, pss))}" if pss != [0] else "")
            + (f" --steps {','.join(map(str, lens))}" if lens != [s["steps"]] else ""))
    L += ["", "Continue with the same command (finished trainings and result files are skipped): "
          f"`python benchmarks/paper/pretrained.py --scale {scale}{opts} --budget-min 100`.", ""]
    block = [BEGIN, "## From-pretrained protocol (issue #13)", "",
             f"Full tables (every LR), settings and plot: [{out.name}/RESULTS.md]({out.name}/RESULTS.md), produced by "
             f"`benchmarks/paper/pretrained.py --scale {scale}`. Rows at their chosen LR (*pending*: not measured yet):", "",
             head, sep] + block_lines + ["", "Verdicts (paired by seed):", ""] + block_verdicts + [END]
    path = out / "RESULTS.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))
    if summarise:
        (out / "block.md").write_text("\n".join(block) + "\n")
        _embed(out.parent / "RESULTS.md", block)
    return path


def section_block(out_fp: Path) -> list[str]:
    """The block for benchmarks/paper/RESULTS.md (written by :func:`write_section`), or nothing."""
    f = out_fp / "block.md"
    return f.read_text().splitlines() if f.is_file() else []


def _embed(parent: Path, block: list[str]) -> None:
    """Replace (or append) the from-pretrained block of an existing benchmarks/paper/RESULTS.md."""
    if not parent.is_file():
        return
    text = parent.read_text()
    b = "\n".join(block)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + b + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + b + "\n"
    parent.write_text(text)

