"""The from-pretrained protocol (issue #13): start from one pretrained Gaussian VAE, as users do.

    python benchmarks/paper/pretrained.py --scale tiny [--seeds 3] [--only ROWS] [--budget-min 100] [--estimate]
        [--pretrain-seeds 0,1] [--steps 1200,4800] [--campaign NAME]

1. **Pretrain** one Gaussian VAE with a fixed KL weight (a plain VAE; `kl_weight` of the scale), seed 0,
   saved once under ``<out>/runs/<scale>/pretrain/`` and shared by every row and seed.
2. **Fine-tune** it for the same number of steps (>= 1200 at ``tiny``) with every method, at the same
   bit budget (12 bits per token: 6 latent channels, f4 -> 0.75 bpp), over a small LR grid:
   ``tdc`` (TDC, the default band rule) and ``tdc-ref`` (the authors' rule), ``vanilla-fixed`` (the
   paper's vanilla: the same fixed KL weight, no rate matching), ``vanilla-matched`` (only the global
   TDC multiplier: a KL weight steered so the mean rate is log2 K), ``vq`` / ``fsq`` / ``lfq`` / ``bsq``
   (the KL bottleneck replaced by the quantizer; encoder and decoder start from the pretrained VAE).
3. **Evaluate** on held-out crops: continuous rows, GQ conversions (K = 2^12, m = 6: one index per
   token), the baselines' quantized reconstructions, and TokenBridge post-training quantisation
   (2 bits x 6 channels) of the pretrained VAE, of the TDC VAE and of the vanilla-fixed VAE. ``pre+gq``
   is the GQ conversion with no fine-tuning at all. TokenBridge also runs at its own 6 bits per channel
   (``tokenbridge-b6-…``, on a per-channel TDC fine-tune with K = 2^6): a pair outside the equal-bits rows.

LR selection: every method runs every LR of the grid on seed 0; the LR with the best seed-0 PSNR of
the method's own quantized row is then used for the other seeds (disclosed in RESULTS.md; the
same rule for every method). Verdicts are paired by seed over the seeds run at the chosen LRs.

4. **Calibrate** (issue #26): ``tdc+cal`` / ``tdc-ref+cal`` fine-tune with TDC for ``steps - cal_steps``
   steps (the ``…-precal`` fine-tunes), then train the decoder alone on the GQ codewords for
   ``cal_steps`` steps (``gq calibrate``), so ``tdc+gq+cal`` spends the same total steps as ``vq``.

Axes (issue #26): ``--pretrain-seeds 0,1`` pretrains one VAE per seed (``runs/<scale>/pretrain`` for
seed 0, ``pretrain-ps<p>`` otherwise) and fine-tunes each of them; ``--steps 1200,4800`` trains every
method for each length. Pairs are formed within one (pretrain seed, steps) point. Every result file
records ``pretrain_seed`` and ``steps`` (total optimizer steps, calibration included).
``--campaign NAME`` keeps a measurement campaign apart (``<out>/campaigns/NAME/results`` and its own
``RESULTS.md``; the trainings stay under ``<out>/runs``): a VAE pretrained on another machine differs,
so its rows pair only with rows of the same campaign. A campaign takes each method's LR from the
default campaign's LR grid (``<out>/results``) instead of rerunning the grid.

Resumable: trainings keep checkpoints and a ``train.json`` when finished; every evaluated (row, LR,
seed) writes ``<results>/<row>@lr<lr>[@ps<p>][@steps<n>]/seed<k>.json`` right away (the suffixes only
off pretrain seed 0 and the scale's default steps); a rerun skips what exists.
``--budget-min`` stops starting new trainings after that many minutes (chunks well under 2 h).
The report (``RESULTS.md`` section in ``<out>/RESULTS.md``) lists every row, measured or pending.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  benchmarks/paper/run.py (puts this checkout's gq_plugin on sys.path)
from report_pretrained import BETAS, CAL_LR_MULTS, CAL_SPLIT_LR_MULTS, CAL_SPLITS, TB_OWN_BITS, TOLERANCES, lr_tag, point_tag, rate_of  # noqa: E402  (result-folder names and bit budget, shared with the report)

BITS = 12  # bits per token for every quantized row
C = 6  # latent channels: 12 bits = GQ 2^12 x 1 group = VQ 2^12 = FSQ [8,8,8,8] = LFQ/BSQ 12 bits = TokenBridge 2 bits x 6 ch

SCALES = {
    # micro model for the test: seconds
    "smoke": {"model": bench._model([8, 8, 16], C, 1, 4, 32), "size": 32, "resize": 64, "pretrain_steps": 4, "steps": 3, "batch": 4,
              "pretrain_lr": 1e-3, "lrs": [1e-4, 3e-4], "lr": 1e-4, "lpips": 0.2, "eval_images": 16, "eval_crops": 1, "eval_batch": 16,
              "distribution": False, "seeds": 1, "ckpt_every": 0, "kl_weight": 1e-4, "lam_factor": 1.02, "entropy_frac": 0.25, "cal_steps": 1},
    # tiny_cpu-like backbone with 6 latent channels: 64x64 crops, 2 CPU cores
    "tiny": {"model": bench._model([32, 32, 64], C, 1, 32, 64), "size": 64, "resize": 128, "pretrain_steps": 1500, "steps": 1200,
             "batch": 8, "pretrain_lr": 1e-3, "lrs": [1e-4, 3e-4], "lr": 1e-4, "lpips": 0.2, "eval_images": 192, "eval_crops": 4,
             "eval_batch": 32, "distribution": True, "seeds": 3, "ckpt_every": 300, "kl_weight": 1e-4, "lam_factor": 1.02,
             "entropy_frac": 0.25, "cal_steps": 200},
    # the paper's headline setting (issue #26): f8, 16 latent channels, K = 2^16, m = 16 -> 16 bits per 8x8 pixels = 0.25 bpp,
    # on a CPU-sized backbone (64x64 crops: 8x8 tokens); every baseline at 16 bits, VQ with its large-codebook options
    # LR grid one step wider than tiny's: with [1e-4, 3e-4] every method's seed-0 best sat at 3e-4, the grid's top
    "headline": {"model": bench._model([32, 32, 64, 64], 16, 1, 32, 64), "size": 64, "resize": 128, "pretrain_steps": 1500, "steps": 1200,
                 "batch": 8, "pretrain_lr": 1e-3, "lrs": [1e-4, 3e-4, 1e-3], "lr": 1e-4, "lpips": 0.2, "eval_images": 192, "eval_crops": 4,
                 "eval_batch": 32, "distribution": True, "seeds": 3, "ckpt_every": 300, "kl_weight": 1e-4, "lam_factor": 1.02,
                 "entropy_frac": 0.25, "cal_steps": 200, "bits": 16, "m": 16, "fsq_levels": [8, 8, 8, 5, 5, 5], "vq_lookup_dim": 8},
    # the headline setting on a micro model, for the test
    "smoke-headline": {"model": bench._model([8, 8, 16, 16], 16, 1, 4, 32), "size": 32, "resize": 64, "pretrain_steps": 2, "steps": 3,
                       "batch": 4, "pretrain_lr": 1e-3, "lrs": [1e-4, 3e-4], "lr": 1e-4, "lpips": 0.2, "eval_images": 16, "eval_crops": 1,
                       "eval_batch": 16, "distribution": False, "seeds": 1, "ckpt_every": 0, "kl_weight": 1e-4, "lam_factor": 1.02,
                       "entropy_frac": 0.25, "cal_steps": 1, "bits": 16, "m": 16, "fsq_levels": [8, 8, 8, 5, 5, 5], "vq_lookup_dim": 8},
}
# the rate-distortion axis at tiny (issue #26 item 6): the same backbone and pretrained VAE(s) as `tiny` ("pretrain_of"),
# 8 and 16 bits per token (GQ K = 2^8 / 2^16 with m = 6; VQ 2^8 / 2^16, the latter with its large-codebook options; FSQ
# [8, 6, 5] = 240 / [8, 8, 8, 5, 5, 5] = 64000 levels); TokenBridge has no whole number of bits per channel there. Campaigns only:
# the LRs are tiny's (12 bits) choices, so that the three rates differ only in the rate.
SCALES["tiny-b8"] = {**SCALES["tiny"], "bits": 8, "fsq_levels": [8, 6, 5], "pretrain_of": "tiny"}
SCALES["tiny-b16"] = {**SCALES["tiny"], "bits": 16, "fsq_levels": [8, 8, 8, 5, 5, 5], "vq_lookup_dim": 8, "pretrain_of": "tiny"}


def vq_large_codebook_options(s: dict) -> dict:
    """vector-quantize-pytorch's options for a large codebook (issue #26): a low-dimensional cosine lookup with the
    rotation trick, k-means init, and dead-code replacement whose threshold is half the expected hits per code per
    batch (tokens per batch / K); ``{}`` where the scale sets no ``vq_lookup_dim`` (the committed tiny rows)."""
    if not s.get("vq_lookup_dim"):
        return {}
    r = rate_of(s)
    tokens = s["batch"] * (s["size"] * s["size"]) // r["ppt"]
    opts = {"lookup_dim": int(s["vq_lookup_dim"]), "use_cosine_sim": True, "rotation_trick": True, "kmeans_init": True}
    if vqp_has_dead_code_ratio():  # vector-quantize-pytorch >= 1.34: the threshold is a ratio of the mean cluster size
        return {**opts, "dead_code_threshold_ratio": 0.5}
    return {**opts, "threshold_ema_dead_code": 0.5 * tokens / r["K"]}


def vqp_has_dead_code_ratio() -> bool:
    """Whether the installed vector-quantize-pytorch takes ``dead_code_threshold_ratio`` (1.34 deprecated the absolute
    ``threshold_ema_dead_code`` and reads a value < 1 as that ratio, which would change what the option means)."""
    import inspect

    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return False
    return "dead_code_threshold_ratio" in inspect.signature(VectorQuantize.__init__).parameters


def _scale_key(scale: str) -> str:
    """Register the scale in run.py's table (its recipe() / ModelEval read it) and return its key."""
    key = f"from-pretrained-{scale}"
    bench.SCALES[key] = SCALES[scale]
    return key


def plan(scale: str) -> tuple[dict, dict]:
    """``(finetunes, rows)``. finetunes: name -> quantizer section; rows: name -> eval spec
    (``train`` = a fine-tune name or ``"pretrain"``; ``key`` marks the row that selects the LR)."""
    s = SCALES[scale]
    r = rate_of(s)
    K = r["K"]
    gq = {"name": "gq", "codebook_size": K, "codebook_dim": r["m"], "lam_factor": s["lam_factor"]}
    ef = s["entropy_frac"]
    finetunes = {
        # the band rule with the hinge at log2 K, as its rows were measured (the library's default hinge
        # moved to log2 K + alpha/2 afterwards: benchmarks/tdc_rule/k64)
        "tdc": {**gq, "tdc_rule": "band", "tdc_hinge": 0.0},
        "tdc-ref": {**gq, "tdc_rule": "reference"},
        "vanilla-fixed": {"name": "kl", "weight": s["kl_weight"]},
        "vanilla-matched": {**gq, "tdc_rule": "reference", "lam_max_range": [1.0, 1.0], "lam_min_range": [1.0, 1.0]},
        "vq": {"name": "vq", "codebook_size": K, **vq_large_codebook_options(s)},
        "fsq": {"name": "fsq", "levels": r["levels"]},
        "lfq": {"name": "lfq", "codebook_size": K, "entropy_frac": ef},
        "bsq": {"name": "bsq", "codebook_size": K, "entropy_frac": ef},
    }
    if "vq_lookup_dim" in s:  # large codebooks: SimVQ as a second learned-VQ baseline
        finetunes["simvq"] = {"name": "simvq", "codebook_size": K}
        # the other option set for the seed-0 choice: VQ as at 12 bits (Euclidean, no low-dimensional lookup, no
        # dead-code replacement), at VQ's LR
        finetunes["vq-plain"] = {"name": "vq", "codebook_size": K, "lr_of": "vq"}
        # and the large-codebook options with the k-means init fed K encoder latents before the first step
        # (vector-quantize-pytorch's own init sees one batch: 512 vectors at headline, 2048 at tiny-b16)
        finetunes["vq-kinit"] = {**finetunes["vq"], "kmeans_init_vectors": K, "lr_of": "vq"}
    conv = {"kind": "gq", "K": K, "m": r["m"], "beta": 1.0}
    tb = {"kind": "tokenbridge", "bits": r["tb_bits"]}
    rows = {
        "pre": {"train": "pretrain", "kind": "continuous", "label": "pretrained Gaussian VAE, continuous"},
        "pre+gq": {"train": "pretrain", **conv, "label": "(a) pretrained VAE + GQ, no fine-tuning"},
    }
    if r["tb_bits"] is not None:  # TokenBridge spends a whole number of bits per channel
        rows["tokenbridge-pre"] = {"train": "pretrain", **tb, "label": "(d) TokenBridge on the pretrained VAE"}
    for t, label in (("tdc", "(b) TDC (band rule)"), ("tdc-ref", "(b) TDC (authors' rule)"),
                     ("vanilla-fixed", "vanilla (fixed KL weight)"), ("vanilla-matched", "vanilla (rate-matched)")):
        rows[t] = {"train": t, "kind": "continuous", "label": f"{label} fine-tune, continuous"}
        rows[f"{t}+gq"] = {"train": t, **conv, "key": True, "label": f"{label} fine-tune + GQ"}
    for b in [q for q in ("vq", "simvq", "fsq", "lfq", "bsq") if q in finetunes]:
        rows[b] = {"train": b, "kind": "baseline", "key": True, "label": f"(c) {'SimVQ' if b == 'simvq' else b.upper()} fine-tune"}
    if "vq-plain" in finetunes:
        rows["vq-plain"] = {"train": "vq-plain", "kind": "baseline", "label": "(c) VQ fine-tune, without the large-codebook options"}
        rows["vq-kinit"] = {"train": "vq-kinit", "kind": "baseline",
                            "label": f"(c) VQ fine-tune, large-codebook options, k-means init on {K} encoder latents"}
    if r["tb_bits"] is not None:
        rows["tokenbridge-tdc"] = {"train": "tdc", **tb, "label": "(d) TokenBridge on the TDC fine-tune"}
        rows["tokenbridge-vanilla-fixed"] = {"train": "vanilla-fixed", **tb, "label": "(d) TokenBridge on the vanilla (fixed KL) fine-tune"}
    # decoder calibration at equal total steps (issue #26): TDC for steps - cal_steps, then the decoder alone
    # on the GQ codewords for cal_steps; both at the LR chosen for the TDC fine-tune (no grid of their own)
    cal = s["cal_steps"]

    def add_calibrated(t: str, qcfg: dict, lr_of: str, what: str, row: dict = conv, precal_row: bool = False) -> None:
        """Fine-tunes ``t-precal`` (quantizer ``qcfg``, steps - cal) and ``t+cal`` (cal decoder steps on its GQ
        codewords), both at ``lr_of``'s LR; the row ``t+gq+cal`` (and ``t+gq-precal``) converts them with ``row``;
        ``what`` heads the labels."""
        finetunes[f"{t}-precal"] = {**qcfg, "lr_of": lr_of, "steps_less": cal}
        finetunes[f"{t}+cal"] = {"calibrate": f"{t}-precal", "cal_steps": cal, "lr_of": lr_of}
        if precal_row:
            rows[f"{t}+gq-precal"] = {"train": f"{t}-precal", **row, "label": f"{what}, + GQ (before calibration)"}
        rows[f"{t}+gq+cal"] = {"train": f"{t}+cal", **row, "label": f"{what}, + GQ + {cal} calibration steps"}

    for t, label in (("tdc", "(b) TDC (band rule)"), ("tdc-ref", "(b) TDC (authors' rule)")):
        add_calibrated(t, finetunes[t], t, f"{label} fine-tune, steps - {cal}", precal_row=True)
    # item 3, the calibration's own settings at equal total steps, on the authors' rule (the best calibrated row):
    # a longer calibration started from an earlier checkpoint of the same precal run (TDC for steps - n, then n
    # decoder steps), where that run keeps the checkpoint; and the calibration LR at 0.3 and 3 times the TDC
    # fine-tune's chosen LR (no grid of its own otherwise)
    ck = s["ckpt_every"]
    for n in CAL_SPLITS:
        if not (ck and cal < n < s["steps"] and (s["steps"] - n) % ck == 0):
            continue
        for mult in (1.0, *CAL_SPLIT_LR_MULTS):
            sfx = "" if mult == 1.0 else f"-lrx{mult:g}"
            finetunes[f"tdc-ref+cal{n}{sfx}"] = {"calibrate": "tdc-ref-precal", "cal_steps": n, "cal_from_checkpoint": True,
                                                 **({} if mult == 1.0 else {"cal_lr_mult": mult}), "lr_of": "tdc-ref"}
            rows[f"tdc-ref+gq+cal{n}{sfx}"] = {"train": f"tdc-ref+cal{n}{sfx}", **conv,
                                               "label": f"(b) TDC (authors' rule) fine-tune, steps - {n}, + GQ + {n} calibration steps at {mult:g} x LR"}
    for t, label in (("tdc", "(b) TDC (band rule)"), ("tdc-ref", "(b) TDC (authors' rule)")):
        for mult in CAL_LR_MULTS:
            finetunes[f"{t}+cal-lrx{mult:g}"] = {"calibrate": f"{t}-precal", "cal_steps": cal, "cal_lr_mult": mult, "lr_of": t}
            rows[f"{t}+gq+cal-lrx{mult:g}"] = {"train": f"{t}+cal-lrx{mult:g}", **conv,
                                               "label": f"{label} fine-tune, steps - {cal}, + GQ + {cal} calibration steps at {mult:g} x LR"}
    # item 4, TDC's tolerance alpha (the band's half-width around log2 K; default 0.5 bits), authors' rule, calibrated
    for tol in TOLERANCES:
        add_calibrated(f"tdc-ref-tol{tol:g}", {**gq, "tdc_rule": "reference", "tolerance": float(tol)}, "tdc-ref",
                       f"(b) TDC (authors' rule, tolerance {tol:g} bits), steps - {cal}")
    # issue #26 item 2: the band rule that charges only the rate above log2 K (tdc_spend), with the library's
    # default hinge (log2 K + alpha/2); measured at equal total steps with calibration, at the TDC fine-tune's LR
    add_calibrated("tdc-spend", {**gq, "tdc_rule": "band", "tdc_spend": True}, "tdc", f"(b) TDC (band rule, spend) fine-tune, steps - {cal}",
                   precal_row=True)
    # item 4, GQ's beta (the paper's codebook regularisation omega: the prior term's weight in the score), an
    # eval-time lever: the calibrated checkpoints converted with another beta (nothing is trained)
    for t, label in (("tdc", "(b) TDC (band rule)"), ("tdc-ref", "(b) TDC (authors' rule)")):
        for b in BETAS:
            rows[f"{t}+gq+cal-beta{b:g}"] = {"train": f"{t}+cal", **conv, "beta": float(b),
                                              "label": f"{label} fine-tune + calibration, GQ with beta = {b:g}"}
    # item 4, m at equal bits: groups of m // 2 channels with sqrt(K) codes each (same bits per token)
    log2k = int(math.log2(K))
    if r["m"] % 2 == 0 and log2k % 2 == 0:
        m2, K2 = r["m"] // 2, 2 ** (log2k // 2)
        add_calibrated(f"tdc-ref-m{m2}", {**gq, "codebook_size": K2, "codebook_dim": m2, "tdc_rule": "reference"}, "tdc-ref",
                       f"(b) TDC (authors' rule) with m = {m2}, K = 2^{log2k // 2}", row={**conv, "K": K2, "m": m2})
    # item 5, TokenBridge fairly: TDC constrains what TokenBridge quantizes, each channel on its own (m = 1,
    # K = 2^(TokenBridge's bits per channel)), at the band rule's LR and the full steps
    if r["tb_bits"] is not None:
        finetunes["tdc-tb"] = {**gq, "codebook_size": 2 ** r["tb_bits"], "codebook_dim": 1, "tdc_rule": "band", "lr_of": "tdc"}
        rows["tdc-tb+gq"] = {"train": "tdc-tb", **conv, "K": 2 ** r["tb_bits"], "m": 1,
                             "label": f"(b) TDC (band rule) per channel (m = 1, K = 2^{r['tb_bits']}) fine-tune + GQ"}
        rows["tokenbridge-tdc-tb"] = {"train": "tdc-tb", **tb, "label": "(d) TokenBridge on the per-channel TDC fine-tune"}
        # the same with the authors' rule, which spends the per-channel budget where the band rule leaves bits unspent
        finetunes["tdc-ref-tb"] = {**finetunes["tdc-tb"], "tdc_rule": "reference", "lr_of": "tdc-ref"}
        rows["tdc-ref-tb+gq"] = {**rows["tdc-tb+gq"], "train": "tdc-ref-tb",
                                 "label": f"(b) TDC (authors' rule) per channel (m = 1, K = 2^{r['tb_bits']}) fine-tune + GQ"}
        rows["tokenbridge-tdc-ref-tb"] = {"train": "tdc-ref-tb", **tb, "label": "(d) TokenBridge on the per-channel TDC (authors' rule) fine-tune"}
    # item 5 at TokenBridge's own rate (its released setting, 6 bits = 64 levels per channel), where its table is
    # fine rather than 1-2 levels wide: TDC per channel with K = 2^6, against the same vanilla fine-tune and the
    # pretrained VAE, all through TokenBridge at 6 bits per channel. Not equal bits with the other rows (see their
    # bpp): a TokenBridge-only pair, marked ``own_rate``
    nb = TB_OWN_BITS
    if r["tb_bits"] is not None and r["tb_bits"] != nb:
        finetunes[f"tdc-tb{nb}"] = {**gq, "codebook_size": 2 ** nb, "codebook_dim": 1, "tdc_rule": "band", "lr_of": "tdc"}
        finetunes[f"tdc-ref-tb{nb}"] = {**finetunes[f"tdc-tb{nb}"], "tdc_rule": "reference", "lr_of": "tdc-ref"}
        tbn = {"kind": "tokenbridge", "bits": nb, "own_rate": True}
        for t, rule in ((f"tdc-tb{nb}", "band rule"), (f"tdc-ref-tb{nb}", "authors' rule")):
            rows[f"{t}+gq"] = {"train": t, **conv, "K": 2 ** nb, "m": 1, "own_rate": True,
                               "label": f"(b) TDC ({rule}) per channel (m = 1, K = 2^{nb}) fine-tune + GQ"}
        for t, what in (("pretrain", "the pretrained VAE"), ("vanilla-fixed", "the vanilla (fixed KL) fine-tune"),
                        (f"tdc-tb{nb}", f"the per-channel TDC (K = 2^{nb}) fine-tune"),
                        (f"tdc-ref-tb{nb}", f"the per-channel TDC (authors' rule, K = 2^{nb}) fine-tune")):
            rows[f"tokenbridge-b{nb}-{'pre' if t == 'pretrain' else t}"] = {"train": t, **tbn,
                                                                           "label": f"(d) TokenBridge at {nb} bits per channel on {what}"}
    return finetunes, rows



PROTOCOL_KEYS = ("lr_of", "steps_less", "calibrate", "cal_steps", "cal_from_checkpoint", "cal_lr_mult")  # fine-tune spec keys that are not quantizer settings


def quantizer_of(finetunes: dict, t: str) -> dict:
    """The quantizer section of fine-tune ``t`` (a calibration's: that of the fine-tune it calibrates)."""
    spec = finetunes[t]
    if "calibrate" in spec:
        return quantizer_of(finetunes, spec["calibrate"])
    return {k: v for k, v in spec.items() if k not in PROTOCOL_KEYS}


def lr_owner(finetunes: dict, t: str) -> str:
    """The fine-tune whose chosen LR ``t`` uses (itself unless it has ``lr_of``)."""
    return finetunes[t].get("lr_of", t)


def _recipe(key: str, qcfg: dict, seed: int, out_dir: Path, data_root, lr: float, steps: int, pretrained: str | None) -> dict:
    cfg = bench.recipe(key, qcfg, seed, out_dir, data_root)
    cfg["optim"]["lr"] = lr
    cfg["train"]["steps"] = steps
    if pretrained:
        cfg["model"]["pretrained"] = pretrained
    return cfg


def run_dir(args, name: str, seed: int, lr: float, ps: int, steps: int) -> Path:
    """``<out>/runs/<scale>/pretrain[-ps<p>]`` or ``<out>/runs/<scale>/<name>-lr<lr>-seed<k>[-ps<p>][-steps<n>]``."""
    root = Path(args.out) / "runs" / args.scale
    if name == "pretrain":  # a rate-distortion scale shares its base scale's pretrained VAE(s)
        root = Path(args.out) / "runs" / SCALES[args.scale].get("pretrain_of", args.scale)
        return root / ("pretrain" if ps == 0 else f"pretrain-ps{ps}")
    return root / (f"{name}-{lr_tag(lr)}-seed{seed}" + point_tag(ps, steps, SCALES[args.scale]["steps"]).replace("@", "-"))


def ensure_trained(args, name: str, finetunes: dict | None, seed: int, lr: float, log, ps: int = 0, steps: int | None = None) -> dict:
    """Train (resume, or skip) one run; ``name == "pretrain"`` is the pretrained VAE of pretrain seed ``ps``.
    ``steps`` is the run's total length (the scale's by default); a ``…-precal`` fine-tune trains
    ``steps - cal_steps`` of it, a ``…+cal`` one calibrates that run's decoder for the rest."""
    from gq_plugin.lab.train import latest_checkpoint, train

    s = SCALES[args.scale]
    steps = s["steps"] if steps is None else int(steps)
    pre = name == "pretrain"
    rd = run_dir(args, name, seed, lr, ps, steps)
    done = rd / "train.json"
    if done.is_file():
        return json.loads(done.read_text())
    if args.deadline is not None and time.time() > args.deadline:
        raise TimeoutError(name)
    spec = {} if pre else finetunes[name]
    if "calibrate" in spec:
        return _ensure_calibrated(args, name, finetunes, seed, lr, log, ps, steps, rd)
    pretrained = None if pre else str(Path(ensure_trained(args, "pretrain", None, ps, s["pretrain_lr"], log, ps)["checkpoint"]) / "vae")
    qcfg = {"name": "kl", "weight": s["kl_weight"]} if pre else quantizer_of(finetunes, name)
    n = s["pretrain_steps"] if pre else steps - int(spec.get("steps_less", 0))
    cfg = bench._load_config(_recipe(args.key, qcfg, ps if pre else seed, rd, args.data_root, lr, n, pretrained))
    resume = "latest" if latest_checkpoint(rd) is not None else None
    prev = json.loads((rd / "train_time_partial.json").read_text())["train_time_s"] if resume and (rd / "train_time_partial.json").is_file() else 0.0
    log(f"train {rd.name} ({'resume' if resume else 'start'}, {cfg.train.steps} steps, lr {lr:g})")
    res = bench._train_with_time_log(train, cfg, resume, rd, prev, args)
    info = {"train": name, "seed": seed, "pretrain_seed": ps, "steps": int(cfg.train.steps), "lr": lr, "batch_size": int(cfg.train.batch_size),
            "train_time_s": prev + float(res["train_time_s"]), "checkpoint": res["checkpoint"], "quantizer": qcfg, "pretrained": pretrained,
            "final_log": {k: v for k, v in res.items() if isinstance(v, (int, float))}}
    done.write_text(json.dumps(info, indent=2))
    return info


def _ensure_calibrated(args, name: str, finetunes: dict, seed: int, lr: float, log, ps: int, steps: int, rd: Path) -> dict:
    """``gq calibrate`` of the base fine-tune's run for ``cal_steps`` steps at ``lr`` (resumable)."""
    from gq_plugin.lab.calibrate import calibrate
    from gq_plugin.lab.train import latest_checkpoint

    spec = finetunes[name]
    base = ensure_trained(args, spec["calibrate"], finetunes, seed, lr, log, ps, steps)
    cal = int(spec["cal_steps"])
    src, base_steps, base_time = Path(base["checkpoint"]), int(base["steps"]), float(base["train_time_s"])
    if spec.get("cal_from_checkpoint"):  # start from the base run's checkpoint at steps - cal (equal total steps)
        base_steps = steps - cal
        src = run_dir(args, spec["calibrate"], seed, lr, ps, steps) / f"checkpoint-{base_steps}"
        if not (src / "vae").is_dir():
            raise SystemExit(f"{name}: needs {src} (the run keeps a checkpoint every ckpt_every steps; delete the run to retrain it)")
        base_time *= base_steps / int(base["steps"])  # the share of the base run's time spent on the steps used
    cal_lr = lr * float(spec.get("cal_lr_mult", 1.0))
    resume = "latest" if latest_checkpoint(rd) is not None else None
    log(f"calibrate {rd.name} ({'resume' if resume else 'start'}, {cal} decoder steps on GQ codewords from step {base_steps}, lr {cal_lr:g})")
    t0 = time.time()
    res = calibrate(src, rd, [f"steps={cal}", f"lr={cal_lr}", f"seed={seed}", f"ckpt_every={max(1, min(50, cal))}"],
                    resume=resume, progress=not args.quiet)
    info = {**base, "train": name, "steps": base_steps + cal, "calibration_steps": cal, "calibration_lr": cal_lr, "calibrated": str(src),
            "train_time_s": base_time + time.time() - t0, "checkpoint": res["checkpoint"],
            "final_log": {k: v for k, v in res.items() if isinstance(v, (int, float))}}
    (rd / "train.json").write_text(json.dumps(info, indent=2))
    return info


def result_path(out: Path, row: str, lr: float | None, seed: int, tag: str = "") -> Path:
    """``<out>/results/<row>[@lr<lr>]<tag>/seed<k>.json`` (``tag``: :func:`point_tag`; ``out``: the campaign's folder)."""
    return out / "results" / ((row if lr is None else f"{row}@{lr_tag(lr)}") + tag) / f"seed{seed}.json"


def chosen_lr(out: Path, finetunes: dict, rows: dict, s: dict) -> dict[str, float | None]:
    """Per fine-tune: the LR whose seed-0 key row has the best PSNR (None until every LR has a result);
    a fine-tune with ``lr_of`` takes that fine-tune's."""
    out_lr = {}
    for t in finetunes:
        if "lr_of" in finetunes[t]:
            continue
        key = next(r for r, sp in rows.items() if sp["train"] == t and sp.get("key"))
        vals = {}
        for lr in s["lrs"]:
            p = result_path(out, key, lr, 0)
            if p.is_file():
                vals[lr] = json.loads(p.read_text())["metrics"].get("PSNR")
        ok = {lr: v for lr, v in vals.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        out_lr[t] = max(ok, key=ok.get) if len(vals) == len(s["lrs"]) and ok else None
    return {t: out_lr[lr_owner(finetunes, t)] for t in finetunes}


def _band(me, spec: dict) -> dict | None:
    """Band statistics of the model's group rates at the row's (K, m) (any Gaussian VAE)."""
    from gq_plugin import GaussianQuantizer
    from gq_plugin.rate import band_statistics

    if spec["kind"] not in ("gq", "continuous") or "K" not in spec:
        return None
    q = GaussianQuantizer(me.C, int(spec["K"]), int(spec["m"]), accept_image_fmap=True)
    r = bench.torch.cat([q.rates(m, lv).reshape(-1) for _, m, lv in me.batches])
    return band_statistics(r, math.log2(int(spec["K"])), 0.5).to_json()


def evaluate_rows(args, names: list[str], rows: dict, qcfg: dict | None, tinfo: dict, lr: float | None, seed: int, log, ps: int = 0,
                  steps: int | None = None) -> None:
    """Score ``names`` on the model of ``tinfo``; one result file per row (pretrain seed ``ps``, total ``steps``)."""
    res_dir = Path(args.results)
    default = SCALES[args.scale]["steps"]
    tag = point_tag(ps, default if steps is None else int(steps), default)
    todo = [r for r in names if not result_path(res_dir, r, lr, seed, tag).is_file()]
    if not todo:
        return
    me = bench.ModelEval(args.key, qcfg or {"name": "kl", "weight": SCALES[args.scale]["kl_weight"]}, tinfo["checkpoint"], seed, args.data_root)
    for r in todo:
        log(f"eval {r} {'' if lr is None else lr_tag(lr)}{tag} seed {seed}")
        res = me.score(rows[r])
        band = _band(me, rows[r])
        if band is not None:
            res["band"] = band
        res.update({"row": r, "seed": seed, "lr": lr, "scale": args.scale, "protocol": "from-pretrained", "label": rows[r]["label"],
                    "train": rows[r]["train"], "train_time_s": tinfo["train_time_s"], "steps": tinfo["steps"], "pretrain_seed": ps,
                    "campaign": args.campaign, "calibration_steps": tinfo.get("calibration_steps", 0), "spec": rows[r],
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "command": _command(), "machine": bench.machine()})
        p = result_path(res_dir, r, lr, seed, tag)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(res, indent=2, default=float))


def _ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{what}: expected comma-separated whole numbers, got {text!r}") from None
    if not vals or min(vals) < 0:
        raise SystemExit(f"{what}: expected comma-separated whole numbers >= 0, got {text!r}")
    return vals


def run(args) -> int:
    finetunes, rows = plan(args.scale)
    s = SCALES[args.scale]
    only = set(args.only.split(",")) if args.only else None
    selected = [r for r in rows if only is None or r in only or rows[r]["train"] in only]
    if only and not selected:
        raise SystemExit(f"--only: no row or fine-tune matches {args.only!r}; rows: {', '.join(rows)}")
    out = Path(args.out)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[from-pretrained {time.strftime('%H:%M:%S')}] {msg}", flush=True))
    args.deadline = time.time() + 60 * args.budget_min if args.budget_min is not None else None
    points = [(ps, n) for ps in args.pretrain_seeds for n in args.steps]
    by_train = {t: [r for r in selected if rows[r]["train"] == t] for t in finetunes}
    try:
        pre_rows = [r for r in selected if rows[r]["train"] == "pretrain"]
        for ps in args.pretrain_seeds if pre_rows else []:  # one pretrained model per pretrain seed, evaluated once per seed for pairing
            tinfo = ensure_trained(args, "pretrain", None, ps, s["pretrain_lr"], log, ps)
            for seed in range(args.seeds):
                evaluate_rows(args, pre_rows, rows, None, tinfo, None, seed, log, ps)
        if not args.campaign:  # the LR grid on seed 0 (pretrain seed 0, the default steps): the default campaign only
            for t, spec in finetunes.items():
                if by_train[t] and "lr_of" not in spec:
                    for lr in s["lrs"]:
                        tinfo = ensure_trained(args, t, finetunes, 0, lr, log)
                        evaluate_rows(args, by_train[t], rows, quantizer_of(finetunes, t), tinfo, lr, 0, log)
        best = chosen_lr(out, finetunes, rows, s)
        missing = sorted(t for t in finetunes if by_train[t] and best[t] is None)
        if args.campaign and missing:
            log(f"no chosen LR yet for {', '.join(missing)} (the default campaign's grid in {out / 'results'} is incomplete): skipped")
        for ps, n in points:  # a campaign goes seed by seed, so that pairs complete early
            for seed in range(args.seeds):
                for t, spec in finetunes.items():
                    grid_done = not args.campaign and seed == 0 and (ps, n) == (0, s["steps"]) and "lr_of" not in spec
                    if by_train[t] and best[t] is not None and not grid_done:
                        tinfo = ensure_trained(args, t, finetunes, seed, best[t], log, ps, n)
                        evaluate_rows(args, by_train[t], rows, quantizer_of(finetunes, t), tinfo, best[t], seed, log, ps, n)
    except TimeoutError as e:
        log(f"--budget-min reached before training {e}; rerun the same command to continue")
    return report(args, rows, finetunes, log)


def report(args, rows: dict, finetunes: dict, log=print) -> int:
    from report_pretrained import write_section

    points = [(ps, n) for ps in args.pretrain_seeds for n in args.steps]
    best = chosen_lr(Path(args.out), finetunes, rows, SCALES[args.scale])
    path = write_section(Path(args.results), args.scale, rows, finetunes, SCALES[args.scale], args.seeds, _command(), bench.machine(),
                         best=best, points=points, campaign=args.campaign, summarise=summarises(args))
    log(f"wrote {path}")
    return 0


def summarises(args) -> bool:
    """Whether the report's block goes into ``benchmarks/paper/RESULTS.md``, which summarises the tiny protocol only: not
    for a campaign (its tables stay in its own RESULTS.md), nor for a scale written to its own default folder
    (``default_out``: headline -> from_pretrained_headline)."""
    own = default_out(args.scale)
    return not args.campaign and (own == HERE / "from_pretrained" or Path(args.out).resolve() != own.resolve())


def estimate(args) -> int:
    """Time a few optimizer steps of the pretraining and of every fine-tune; project the whole protocol."""
    finetunes, _ = plan(args.scale)
    s = SCALES[args.scale]
    n_pts = len(args.pretrain_seeds)
    grid = 0 if args.campaign else len(s["lrs"]) - 1  # the default campaign's extra LR on seed 0
    total, lines = 0.0, []
    items = [("pretrain", {"name": "kl", "weight": s["kl_weight"]}, s["pretrain_steps"], n_pts)]
    for t, spec in finetunes.items():
        runs = n_pts * args.seeds + (0 if "lr_of" in spec else grid)
        if "calibrate" in spec:  # decoder-only steps, timed as full steps (an upper bound)
            n = int(spec["cal_steps"]) * len(args.steps)
        else:
            n = sum(steps - int(spec.get("steps_less", 0)) for steps in args.steps)
        items.append((t, quantizer_of(finetunes, t), n, runs))
    for name, qcfg, steps, runs in items:
        cfg = bench._load_config(_recipe(args.key, qcfg, 0, Path("/tmp/unused"), args.data_root, s["lr"], max(1, steps), None))
        _, per = bench.time_training_steps(cfg, s, args.estimate_steps)
        proj = per * steps * runs
        total += proj
        lines.append(f"{name:16s} {per:6.2f} s/step (cpu/threads) x {steps} steps x {runs} run(s) ~ {proj / 60:6.1f} min")
    return bench.print_estimate(lines, total, f"~{len(plan(args.scale)[1])} rows x {n_pts * args.seeds} x {s['eval_images']} images")


def _command() -> str:
    import shlex

    return "python benchmarks/paper/pretrained.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def default_out(scale: str) -> Path:
    """Where a scale's runs and results live by default: ``from_pretrained`` for ``tiny`` and the scales that share its
    pretrained VAE, ``from_pretrained_<scale>`` otherwise (the default campaign's results/ holds one scale's LR grid)."""
    family = SCALES[scale].get("pretrain_of", scale)
    return HERE / ("from_pretrained" if family == "tiny" else f"from_pretrained_{family}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default: 3 at tiny, 1 at smoke)")
    p.add_argument("--only", default=None, help="comma-separated rows or fine-tune names (pretrain, tdc, tdc-ref, vq, ...)")
    p.add_argument("--out", default=None, help="output folder (runs/, results/, RESULTS.md, plots; default: from_pretrained for "
                   "tiny and its rate-distortion scales, from_pretrained_<scale> for any other scale)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--budget-min", type=float, default=None, help="stop starting new trainings after this many minutes")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--estimate", action="store_true", help="time a few steps of every training and print the projected total")
    p.add_argument("--estimate-steps", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--pretrain-seeds", default="0", help="comma-separated pretraining seeds: one pretrained VAE each (default 0)")
    p.add_argument("--steps", default=None, help="comma-separated total training lengths (default: the scale's steps)")
    p.add_argument("--campaign", default=None, help="keep results apart under <out>/campaigns/NAME (LRs from the default campaign)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(default_out(args.scale))
    if args.seeds is None:
        args.seeds = SCALES[args.scale]["seeds"]
    args.pretrain_seeds = _ints(args.pretrain_seeds, "--pretrain-seeds")
    args.steps = _ints(args.steps, "--steps") or [SCALES[args.scale]["steps"]]
    if min(args.steps) <= SCALES[args.scale]["cal_steps"]:
        raise SystemExit(f"--steps: every length must exceed the calibration's {SCALES[args.scale]['cal_steps']} steps, got {args.steps}")
    if args.campaign is not None and (not args.campaign.replace("-", "").replace("_", "").isalnum()):
        raise SystemExit(f"--campaign: use letters, digits, '-' and '_' only, got {args.campaign!r}")
    if SCALES[args.scale].get("pretrain_of") and not args.campaign:
        raise SystemExit(f"--scale {args.scale}: a rate-distortion scale runs in a campaign (--campaign NAME), with "
                         f"{SCALES[args.scale]['pretrain_of']}'s pretrained VAE and LR choices")
    args.results = str(Path(args.out) / "campaigns" / args.campaign) if args.campaign else args.out
    if args.threads:
        bench.torch.set_num_threads(args.threads)
    args.key = _scale_key(args.scale)
    if args.estimate:
        return estimate(args)
    if args.report_only:
        finetunes, rows = plan(args.scale)
        return report(args, rows, finetunes)
    return run(args)

if __name__ == "__main__":
    sys.exit(main())
