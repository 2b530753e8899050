"""``gq diagnose``: read an existing Gaussian VAE's per-channel rates and recommend (K, m).

Runs the encoder over held-out photos, measures the KL (bits) of every latent channel of every
token, and feeds those rates to :func:`gq_plugin.rate.recommend_codebook`. It then *measures*
what GQ costs on the same images -- with a GQ-patched model's own (K, m), else with the recommendation -- (PSNR of
``decode(mean)`` vs ``decode(z_hat)``), next to the predicted information loss (expected excess
bits per token over log2 K), and writes a rate histogram.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..rate import BandStats, band_statistics, group_rates, kl_bits_per_channel, recommend_codebook
from ..tdc import TDCSettings


@torch.no_grad()
def diagnose(vae, images: torch.Tensor, out_dir=None, max_log2_codebook_size: int = 18, grouping: str = "contiguous",
             batch_size: int = 8, progress: bool = True, tolerance: float | None = None) -> dict:
    """Diagnose ``vae`` (a diffusers AutoencoderKL, patched or not) on ``images`` (N, 3, H, W) in [-1, 1].

    A GQ-patched model is measured with its *own* quantizer (its K, m, grouping, codebook, beta);
    a plain VAE with the recommended (K, m). ``result["measured"]["setting"]`` says which.

    ``result["band"]["recommended"]``: band statistics (:func:`gq_plugin.rate.band_statistics`) of
    the group rates at the recommended (K, m) with half-width ``tolerance``; for a GQ-patched model
    also ``result["band"]["model"]``: the same at the model's own (K, m) and TDC tolerance.
    ``tolerance`` defaults to the TDC default (:class:`~gq_plugin.tdc.TDCSettings`).
    """
    from tqdm.auto import tqdm

    from ..adapters import is_patched, unpatch
    from ..quantizer import GaussianQuantizer
    from .metrics import psnr
    from .plots import plot_rate_histogram

    tolerance = TDCSettings().tolerance if tolerance is None else float(tolerance)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    own_q, saved_cfg = None, None
    if is_patched(vae):
        from ..adapters.diffusers_vae import gq_config

        own_q, saved_cfg = vae.gq_quantizer, gq_config(vae)
        grouping = own_q.grouping
        unpatch(vae)
    vae.eval()
    means, logvars = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encode", disable=not progress):
        post = vae.encode(images[i : i + batch_size]).latent_dist
        means.append(post.mean.float())
        logvars.append(post.logvar.float())
    mean, logvar = torch.cat(means), torch.cat(logvars)
    c = mean.shape[1]
    chan = kl_bits_per_channel(mean.movedim(1, -1), logvar.movedim(1, -1)).reshape(-1, c)
    rec = recommend_codebook(chan, grouping=grouping, max_log2_codebook_size=max_log2_codebook_size)
    if own_q is not None:  # measure the model as it is
        q, setting = own_q.eval(), "model"
    else:  # measure the recommendation
        q = GaussianQuantizer(c, rec.codebook_size, rec.codebook_dim, grouping=grouping, accept_image_fmap=True).eval()
        setting = "recommended"
    m_used, log2k_used = q.codebook_dim, math.log2(q.codebook_size)
    g = group_rates(mean.movedim(1, -1), logvar.movedim(1, -1), m_used, grouping).reshape(-1, c // m_used)
    p_cont, p_gq = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        mu, lv = mean[i : i + batch_size], logvar[i : i + batch_size]
        z_hat, _ = q.quantize(mu, lv)
        p_cont.append(psnr(x, vae.decode(mu).sample.clamp(-1, 1)))
        p_gq.append(psnr(x, vae.decode(z_hat).sample.clamp(-1, 1)))
    if saved_cfg is not None:
        from ..adapters.diffusers_vae import patch_from_config

        patch_from_config(vae, saved_cfg)
        vae.gq_quantizer.load_state_dict(own_q.state_dict())  # keep the TDC multipliers too
    psnr_cont, psnr_gq = float(torch.cat(p_cont).mean()), float(torch.cat(p_gq).mean())
    g_rec = group_rates(mean.movedim(1, -1), logvar.movedim(1, -1), rec.codebook_dim, grouping)
    band = {"recommended": band_statistics(g_rec, rec.chosen.log2_codebook_size, tolerance).to_json()}
    if saved_cfg is not None:  # the model's own (K, m): how well its training held the band
        own_m, own_k = own_q.codebook_dim, own_q.codebook_size
        own = g  # the group rates at the model's own m and grouping, measured above
        band["model"] = {**band_statistics(own, math.log2(own_k), own_q.tdc.tolerance).to_json(),
                         "codebook_size": own_k, "codebook_dim": own_m}
    per_channel_mean = chan.mean(0)
    result = {
        "recommended": {"codebook_size": rec.codebook_size, "codebook_dim": rec.codebook_dim, "log2_codebook_size": rec.chosen.log2_codebook_size,
                        "bits_per_token": rec.chosen.bits_per_token},
        "reasoning": rec.reasoning,
        # at the measured setting: the model's own (K, m) for a patched model, else the recommendation
        "predicted": {"mean_excess_bits_per_token": float((g - log2k_used).clamp_min(0).sum(-1).mean()),
                      "frac_groups_over_budget": band["model" if own_q is not None else "recommended"]["over_budget"]},
        "measured": {"setting": setting, "codebook_size": int(q.codebook_size), "codebook_dim": int(m_used), "grouping": grouping,
                     "psnr_continuous": psnr_cont, "psnr_gq": psnr_gq, "psnr_drop": psnr_cont - psnr_gq},
        "channel_rate_bits": {"mean": per_channel_mean.tolist(), "min_channel": float(per_channel_mean.min()), "max_channel": float(per_channel_mean.max())},
        "band": band,
        "table": rec.table(),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_rate_histogram({"R_g": g, "R_c (per channel)": chan}, out_dir / "diagnose_rates.png", target=log2k_used,
                            title=f"rates of {c}-channel latent; groups of m={m_used} ({setting} setting)")
        (out_dir / "diagnose.json").write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
        (out_dir / "diagnose.md").write_text(format_report(result))
    return result


def format_report(result: dict) -> str:
    """The printed / ``diagnose.md`` report: recommendation, the setting measured, band statistics, options table."""
    r, p, m = result["recommended"], result["predicted"], result["measured"]
    which = "the model's own setting" if m.get("setting") == "model" else "the recommended setting"
    k = m.get("codebook_size", r["codebook_size"])
    lines = [
        f"Recommended: K = 2^{r['log2_codebook_size']} ({r['codebook_size']}), m = {r['codebook_dim']} -> {r['bits_per_token']:.0f} bits/token",
        result["reasoning"],
        f"Measured with {which}: K = 2^{math.log2(k):g} ({k}), m = {m.get('codebook_dim', r['codebook_dim'])}, grouping {m.get('grouping', 'contiguous')}",
        f"Predicted loss: {p['mean_excess_bits_per_token']:.3f} excess bits/token; {100 * p['frac_groups_over_budget']:.1f}% of groups over budget",
        f"Measured on these images: PSNR continuous {m['psnr_continuous']:.2f} dB -> GQ {m['psnr_gq']:.2f} dB (drop {m['psnr_drop']:.2f} dB)",
        "",
    ]
    band = result.get("band") or {}
    if "model" in band:
        b = band["model"]
        lines += [f"Band statistics at the model's own K = {b['codebook_size']}, m = {b['codebook_dim']} "
                  f"(band log2 K +- {b['tolerance']:g} bits):", "", BandStats.from_json(b).table(), ""]
    if "recommended" in band:
        lines += ["Band statistics at the recommended (K, m):", "", BandStats.from_json(band["recommended"]).table(), ""]
    lines.append(result["table"])
    return "\n".join(lines)
