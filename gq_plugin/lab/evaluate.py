"""Evaluate a trained autoencoder: the continuous VAE and its GQ conversion side by side.

For a GQ / vanilla-KL model the same encoder pass gives both reconstructions:
``decode(posterior.mean)`` (continuous Gaussian VAE) and ``decode(z_hat)`` (GQ, discrete).
A vanilla VAE checkpoint (no GQ config) is converted on the fly with the recipe's (K, m) --
that is the paper's "convert without training" experiment. Baseline bottlenecks (VQ/FSQ/...)
report their quantized reconstruction next to the unquantized one.

Writes ``eval.md`` (Markdown table), ``eval.json`` and ``recon_grid.png`` into ``out_dir``. For GQ models
``eval.json``'s ``info.band`` holds the band statistics of the held-out group rates
(:func:`gq_plugin.rate.band_statistics`: shares in band / over / under budget, quantiles), also
printed under the table.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from ..rate import BandStats, band_statistics
from ..tdc import TDCSettings
from .config import gq_recipe_settings, load_config
from .metrics.image import MS_SSIM_MIN_SIZE
from .models import QuantizerBottleneck, build_model, pixels_per_token

METRIC_ORDER = ("PSNR", "SSIM", "MS-SSIM", "LPIPS-alex", "FD-EffNetLite0", "KID-EffNetLite0")


def load_for_eval(cfg: DictConfig, ckpt: str | os.PathLike | None):
    """``(vae, wrapper, converted)``: the model of ``ckpt`` (a checkpoint dir, its ``vae/`` or a
    ``save_pretrained`` dir); a vanilla VAE is GQ-patched with the recipe's quantizer settings."""
    from ..adapters import is_patched, patch_autoencoder_kl

    if ckpt is not None:
        from .models import resolve_model_dir

        cfg.model.pretrained = resolve_model_dir(ckpt, "CKPT")
    vae, wrapper = build_model(cfg)
    converted = False
    q = cfg.quantizer
    if not isinstance(wrapper.bottleneck, QuantizerBottleneck) and not is_patched(vae):
        gq = gq_recipe_settings(q)
        eval_q = cfg.get("eval", {}).get("gq") or {}
        K = int(eval_q.get("codebook_size", q.get("codebook_size", 4096)))
        m = int(eval_q.get("codebook_dim", q.get("codebook_dim", vae.config.latent_channels)))
        gq.update({k: v for k, v in eval_q.items() if k not in ("codebook_size", "codebook_dim")})
        patch_autoencoder_kl(vae, K=K, m=m, **gq)
        converted = True
    vae.eval()
    wrapper.eval()
    return vae, wrapper, converted


@torch.no_grad()
def reconstruct(vae, wrapper, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"continuous": ..., "quantized": ..., "indices": ..., "rates": ...}`` for a batch."""
    if isinstance(wrapper.bottleneck, QuantizerBottleneck):
        posterior = vae.encode(x).latent_dist
        cont = vae.decode(posterior.mean).sample
        out = wrapper(x)
        return {"continuous": cont, "quantized": out.sample, "indices": out.indices, "rates": None}
    posterior = vae.encode(x).latent_dist
    cont = vae.decode(posterior.mean).sample
    z_hat, indices = posterior.quantize()
    quant = vae.decode(z_hat).sample
    return {"continuous": cont, "quantized": quant, "indices": indices, "rates": posterior.rates()}


def evaluate(cfg, ckpt=None, out_dir=None, overrides: list[str] | None = None, progress: bool = True, dataset=None) -> dict:
    """Run the evaluation; returns ``{"continuous": {...}, "quantized": {...}, "codebook": {...}, ...}``."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .metrics import MetricSuite
    from .plots import plot_rate_histogram, save_grid
    from .train import build_datasets

    cfg = load_config(cfg, overrides)
    ecfg = cfg.eval
    vae, wrapper, converted = load_for_eval(cfg, ckpt)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.train.get("cpu", False) else "cpu")
    vae.to(device)
    wrapper.to(device)
    dataset = dataset if dataset is not None else build_datasets(cfg.data, "eval")
    n = min(len(dataset), int(ecfg.get("max_images", 256)))
    if n == 0:
        raise ValueError("the eval split is empty: fetch more photos or lower data.eval_fraction")
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = DataLoader(subset, batch_size=int(ecfg.get("batch_size", 16)), shuffle=False)
    lp = ("alex",) if ecfg.get("lpips", True) else ()
    suites = {k: MetricSuite(lpips_nets=lp, distribution=bool(ecfg.get("distribution", True)), device=device) for k in ("continuous", "quantized")}
    all_idx, all_rates, grid = [], [], {"original": [], "continuous": [], "quantized": []}
    n_grid = int(ecfg.get("grid_images", 8))
    for batch in tqdm(loader, desc="eval", disable=not progress):
        x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
        rec = reconstruct(vae, wrapper, x)
        for k in suites:
            suites[k].update(x, rec[k].clamp(-1, 1))
        if rec["indices"] is not None:
            all_idx.append(rec["indices"].cpu())
        if rec["rates"] is not None:
            all_rates.append(rec["rates"].cpu())
        if len(grid["original"]) * x.shape[0] < n_grid:
            grid["original"].append(x.cpu())
            grid["continuous"].append(rec["continuous"].cpu())
            grid["quantized"].append(rec["quantized"].cpu())
    results = {k: s.compute() for k, s in suites.items()}
    q = getattr(vae, "gq_quantizer", None) or getattr(wrapper, "quantizer", None)
    K = int(getattr(q, "codebook_size", 0) or 0)
    info = {"converted_from_vanilla": converted, "checkpoint": str(ckpt) if ckpt else None, "n_images": n,
            "image_size": list(grid["original"][0].shape[-2:]) if grid["original"] else None}
    bpp = float(q.bits_per_token) / pixels_per_token(vae) if q is not None and hasattr(q, "bits_per_token") else None
    info.update(bottleneck_info(all_idx, all_rates, K or None, bpp, _tolerance(q, cfg)))
    results["info"] = info
    out_dir = Path(out_dir or (Path(cfg.train.output_dir) / "eval"))
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {"continuous": "continuous VAE (decode(mean))", "quantized": "GQ (decode(z_hat))" if q is not None and hasattr(q, "tdc") else f"{cfg.quantizer.name} (quantized)"}
    results["table"] = format_table(results, names)
    (out_dir / "eval.md").write_text(results["table"] + "\n")
    (out_dir / "eval.json").write_text(json.dumps({k: v for k, v in results.items() if k != "table"}, indent=2, default=float))
    rows = {k: torch.cat(v)[:n_grid] for k, v in grid.items() if v}
    rows = {"original": rows["original"], "continuous": rows["continuous"], "GQ" if "GQ" in names["quantized"] else "quantized": rows["quantized"]}
    save_grid(rows, out_dir / "recon_grid.png")
    if all_rates:
        target = math.log2(K) if K else None
        plot_rate_histogram({"eval": torch.cat([t.reshape(-1) for t in all_rates])}, out_dir / "rates_hist.png", target=target,
                            tolerance=_tolerance(q, cfg))
    results["out_dir"] = str(out_dir)
    return results


def _tolerance(q, cfg) -> float:
    """The band half-width alpha: the quantizer's own TDC tolerance, else the recipe's."""
    tdc = getattr(q, "tdc", None)
    return float(tdc.tolerance) if tdc is not None else float(cfg.quantizer.get("tolerance", TDCSettings().tolerance))


def bottleneck_info(indices: list, rates: list, codebook_size: int | None, bpp: float | None, tolerance: float,
                    target_bits: float | None = None) -> dict:
    """The codebook / bpp / rate entries of an evaluation (``gq eval`` and benchmarks/paper share it).

    ``indices`` / ``rates``: lists of per-batch tensors (may be empty); ``codebook_size``: K of the
    indices (None: no codebook statistics); ``target_bits``: centre of the rate band (default
    ``log2 codebook_size``). Returns ``{"codebook", "bpp", "rates", "band"}`` (those that apply).
    """
    from .metrics.codebook import codebook_stats

    info: dict = {}
    if indices and codebook_size:
        info["codebook"] = codebook_stats(torch.cat([i.reshape(-1) for i in indices]), int(codebook_size))
    if bpp is not None:
        info["bpp"] = float(bpp)
    if rates:
        r = torch.cat([t.reshape(-1).float().cpu() for t in rates])
        sub = r if r.numel() <= 2**24 else r[:: r.numel() // 2**24 + 1]  # torch.quantile's size limit
        info["rates"] = {"mean": float(r.mean()), "min": float(r.min()), "max": float(r.max()), "std": float(r.std()),
                         "p01": float(sub.quantile(0.01)), "p99": float(sub.quantile(0.99))}
        if target_bits is None and codebook_size:
            target_bits = math.log2(codebook_size)
        if target_bits is not None:  # shares of (token, group) rates in the band log2 K +- alpha / over / under
            info["band"] = band_statistics(r, target_bits, tolerance).to_json()
    return info


def format_table(results: dict, names: dict[str, str]) -> str:
    """Markdown table: one row per reconstruction path; then, when the group rates are known, the
    band table (share of (token, group) rates in / over / under the band, quantiles)."""
    info = results.get("info", {})
    cols = [m for m in METRIC_ORDER if any(m in results[k] for k in names)]
    head = "| model | " + " | ".join(cols) + " | codebook usage | perplexity | bpp |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    cb = info.get("codebook") or {}
    for key, label in names.items():
        vals = []
        for c in cols:
            v = results[key].get(c)
            vals.append("n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.2f}" if c == "PSNR" else f"{v:.4f}"))
        if key == "quantized" and cb:
            usage, perp = f"{cb.get('usage', float('nan')):.3f}", f"{cb.get('perplexity', float('nan')):.0f}"
            bpp = f"{info['bpp']:.3f}" if "bpp" in info else "n/a"
        else:
            usage, perp, bpp = "-", "-", "continuous"
        lines.append(f"| {label} | " + " | ".join(vals) + f" | {usage} | {perp} | {bpp} |")
    if info.get("band"):
        lines += ["", BandStats.from_json(info["band"]).table()]
    ms = [results[k].get("MS-SSIM") for k in names]
    if "MS-SSIM" in cols and all(v is None or (isinstance(v, float) and math.isnan(v)) for v in ms):
        size = info.get("image_size")
        at = f" (these are {size[0]}x{size[1]})" if size else ""
        lines += ["", f"MS-SSIM n/a: it needs images of at least {MS_SSIM_MIN_SIZE} px per side (5 scales of an 11-px window){at}."]
    return "\n".join(lines)
