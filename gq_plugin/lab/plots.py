"""Figures: per-group rate histograms and reconstruction grids (matplotlib Agg / PIL)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..tdc import TDCSettings


def plot_rate_histogram(rates: dict[str, torch.Tensor], path, target: float | None = None, tolerance: float | None = None,
                        bins: int = 60, title: str = "Per-group rate R_g (bits)") -> Path:
    """Overlayed histograms of group rates (one per label) with the TDC band ``target +- tolerance``
    marked (``tolerance`` default: the TDC default of :class:`~gq_plugin.tdc.TDCSettings`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tolerance = TDCSettings().tolerance if tolerance is None else float(tolerance)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    allv = np.concatenate([r.detach().float().reshape(-1).cpu().numpy() for r in rates.values()])
    lo, hi = float(np.min(allv)), float(np.max(allv))
    if target is not None:
        lo, hi = min(lo, target - 2 * tolerance), max(hi, target + 2 * tolerance)
    edges = np.linspace(lo, hi + 1e-9, bins + 1)
    for label, r in rates.items():
        v = r.detach().float().reshape(-1).cpu().numpy()
        ax.hist(v, bins=edges, alpha=0.55, label=f"{label} (mean {v.mean():.2f}, range {v.min():.2f}-{v.max():.2f})")
    if target is not None:
        ax.axvspan(target - tolerance, target + tolerance, color="green", alpha=0.15, label=f"log2 K = {target:g} +/- {tolerance:g}")
        ax.axvline(target, color="green", lw=1)
    ax.set_xlabel("bits")
    ax.set_ylabel("groups")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) uint8."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def save_image(x: torch.Tensor, path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(x)).save(path)
    return path


def save_grid(rows: dict[str, torch.Tensor], path, pad: int = 2) -> Path:
    """One row per label (each an (N, C, H, W) batch in [-1, 1]); label text drawn on the left."""
    from PIL import Image, ImageDraw

    labels = list(rows)
    n = min(len(v) for v in rows.values())
    h, w = rows[labels[0]].shape[-2:]
    label_w = 90
    canvas = Image.new("RGB", (label_w + n * (w + pad) + pad, len(labels) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(labels):
        y = pad + r * (h + pad)
        draw.text((4, y + h // 2 - 5), label, fill="black")
        for i in range(n):
            canvas.paste(Image.fromarray(to_uint8(rows[label][i])), (label_w + pad + i * (w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
