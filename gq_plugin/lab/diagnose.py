"""``gq diagnose``: read an existing Gaussian VAE's per-channel rates and recommend (K, m).

Runs the encoder over held-out photos, measures the KL (bits) of every latent channel of every
token, and feeds those rates to :func:`gq_plugin.rate.recommend_codebook`. It then *measures*
what direct GQ conversion with the recommendation would cost on the same images (PSNR of
``decode(mean)`` vs ``decode(z_hat)``), next to the predicted information loss (expected excess
bits per token over log2 K), and writes a rate histogram.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..rate import BandStats, band_statistics, group_rates, kl_bits_per_channel, recommend_codebook


@torch.no_grad()
def diagnose(vae, images: torch.Tensor, out_dir=None, max_log2_codebook_size: int = 18, grouping: str = "contiguous",
             batch_size: int = 8, progress: bool = True, tolerance: float = 0.5) -> dict:
    """Diagnose ``vae`` (a diffusers AutoencoderKL, patched or not) on ``images`` (N, 3, H, W) in [-1, 1].

    ``result["band"]["recommended"]``: band statistics (:func:`gq_plugin.rate.band_statistics`) of
    the group rates at the recommended (K, m) with half-width ``tolerance``; for a GQ-patched model
    also ``result["band"]["model"]``: the same at the model's own (K, m) and TDC tolerance.
    """
    from tqdm.auto import tqdm

    from ..adapters import is_patched, patch_autoencoder_kl, unpatch
    from .metrics import psnr
    from .plots import plot_rate_histogram

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    was_patched = is_patched(vae)
    saved_cfg = None
    if was_patched:
        from ..adapters.diffusers_vae import gq_config

        saved_cfg = gq_config(vae)
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
    # measure the conversion cost with the recommendation
    patch_autoencoder_kl(vae, K=rec.codebook_size, m=rec.codebook_dim, grouping=grouping)
    vae.eval()
    q = vae.gq_quantizer
    p_cont, p_gq = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        mu, lv = mean[i : i + batch_size], logvar[i : i + batch_size]
        z_hat, _ = q.quantize(mu, lv)
        p_cont.append(psnr(x, vae.decode(mu).sample.clamp(-1, 1)))
        p_gq.append(psnr(x, vae.decode(z_hat).sample.clamp(-1, 1)))
    unpatch(vae)
    if was_patched and saved_cfg is not None:
        from ..adapters.diffusers_vae import patch_from_config

        patch_from_config(vae, saved_cfg)
    psnr_cont, psnr_gq = float(torch.cat(p_cont).mean()), float(torch.cat(p_gq).mean())
    g = group_rates(mean.movedim(1, -1), logvar.movedim(1, -1), rec.codebook_dim, grouping)
    band = {"recommended": band_statistics(g, rec.chosen.log2_codebook_size, tolerance).to_json()}
    if saved_cfg is not None:  # the model's own (K, m): how well its training held the band
        own_m, own_k = int(saved_cfg["codebook_dim"]), int(saved_cfg["codebook_size"])
        own = group_rates(mean.movedim(1, -1), logvar.movedim(1, -1), own_m, saved_cfg.get("grouping", "contiguous"))
        band["model"] = {**band_statistics(own, math.log2(own_k), float(saved_cfg.get("tolerance", tolerance))).to_json(),
                         "codebook_size": own_k, "codebook_dim": own_m}
    per_channel_mean = chan.mean(0)
    result = {
        "recommended": {"codebook_size": rec.codebook_size, "codebook_dim": rec.codebook_dim, "log2_codebook_size": rec.chosen.log2_codebook_size,
                        "bits_per_token": rec.chosen.bits_per_token},
        "reasoning": rec.reasoning,
        "predicted": {"mean_excess_bits_per_token": rec.chosen.mean_excess_bits, "frac_groups_over_budget": rec.chosen.frac_over_budget},
        "measured": {"psnr_continuous": psnr_cont, "psnr_gq": psnr_gq, "psnr_drop": psnr_cont - psnr_gq},
        "channel_rate_bits": {"mean": per_channel_mean.tolist(), "min_channel": float(per_channel_mean.min()), "max_channel": float(per_channel_mean.max())},
        "band": band,
        "table": rec.table(),
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_rate_histogram({"R_g": g, "R_c (per channel)": chan}, out_dir / "diagnose_rates.png", target=rec.chosen.log2_codebook_size,
                            title=f"rates of {c}-channel latent; groups of m={rec.codebook_dim}")
        (out_dir / "diagnose.json").write_text(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
        (out_dir / "diagnose.md").write_text(format_report(result))
    return result


def format_report(result: dict) -> str:
    """The printed / ``diagnose.md`` report: recommendation, band statistics, options table."""
    r, p, m = result["recommended"], result["predicted"], result["measured"]
    lines = [
        f"Recommended: K = 2^{r['log2_codebook_size']} ({r['codebook_size']}), m = {r['codebook_dim']} -> {r['bits_per_token']:.0f} bits/token",
        result["reasoning"],
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
