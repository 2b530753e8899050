"""Rates of a diagonal Gaussian posterior against the N(0, I) prior, in bits.

All public quantities are base 2. For one latent channel with posterior ``N(mu, sigma^2)``:

    R_c = 0.5 * (mu^2 + sigma^2 - 1 - ln sigma^2) / ln 2          [bits]

A *group* (one sub-codebook vector) is ``m`` channels; its rate ``R_g`` is the sum of its
channels' rates. Gaussian Quant with a codebook of ``K`` Gaussian vectors is nearly lossless
when ``R_g <= log2 K`` (the paper's Theorem 3.1) and degrades quickly above it (Theorem 3.2),
which is what the Target Divergence Constraint (:mod:`gq_plugin.tdc`) enforces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .codebook import check_grouping, divisors, group_channels

LN2 = math.log(2.0)
LOGVAR_RANGE = (-30.0, 20.0)
#: Half-width (bits) of the TDC band around log2 K; the default of TDCSettings.tolerance and of the
#: band statistics here (one literal: the TDC settings import it).
DEFAULT_TOLERANCE = 0.5


def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The reparameterised sample ``mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)`` (differentiable
    in ``mean`` and ``logvar``; ``generator`` makes ``eps`` reproducible). Computed in float32 or
    wider, returned in ``mean``'s dtype."""
    dtype = torch.promote_types(mean.dtype, torch.float32)
    m, lv = mean.to(dtype), logvar.to(dtype)
    eps = torch.randn(m.shape, generator=generator, device=m.device, dtype=dtype)
    return (m + torch.exp(0.5 * lv) * eps).to(mean.dtype)


def kl_bits_per_channel(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, 1) ) per element, in bits (float32 or wider)."""
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must have the same shape, got {tuple(mean.shape)} and {tuple(logvar.shape)}")
    dtype = torch.promote_types(mean.dtype, torch.float32)
    mean = mean.to(dtype)
    logvar = logvar.to(dtype)
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar) / LN2


def group_rates(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    codebook_dim: int,
    grouping: str = "contiguous",
) -> torch.Tensor:
    """Per-group rate ``R_g`` in bits for channel-last tensors: ``(..., C) -> (..., G)``."""
    kl = kl_bits_per_channel(mean, logvar)
    return group_channels(kl, codebook_dim, grouping).sum(-1)


def bits_per_token(num_codebooks: int, codebook_size: int) -> float:
    """Bits carried by one latent token: ``num_codebooks * log2 K``."""
    return num_codebooks * math.log2(codebook_size)


def bits_per_pixel(num_codebooks: int, codebook_size: int, pixels_per_token: int) -> float:
    """Nominal bits per pixel: ``num_codebooks * log2 K / pixels_per_token``.

    >>> bits_per_pixel(1, 2**16, 8 * 8)   # SD3 VAE (f8, 16 ch), m=16, K=2^16
    0.25
    """
    if pixels_per_token <= 0:
        raise ValueError(f"pixels_per_token must be positive, got {pixels_per_token}")
    return bits_per_token(num_codebooks, codebook_size) / pixels_per_token


def real_bpp(num_bytes: int, num_pixels: int) -> float:
    """Actual bits per pixel of a stored / compressed stream: ``8 * num_bytes / num_pixels``."""
    if num_pixels <= 0:
        raise ValueError(f"num_pixels must be positive, got {num_pixels}")
    return 8.0 * num_bytes / num_pixels


@dataclass
class RateStats:
    """Summary statistics of a batch of group rates (bits)."""

    mean: float
    min: float
    max: float
    std: float
    quantiles: dict[float, float]
    histogram: torch.Tensor  # counts per bin
    bin_edges: torch.Tensor
    count: int

    def as_dict(self, prefix: str = "bits") -> dict[str, float]:
        out = {f"{prefix}-mean": self.mean, f"{prefix}-min": self.min, f"{prefix}-max": self.max, f"{prefix}-std": self.std}
        out.update({f"{prefix}-q{int(q * 100):02d}": v for q, v in self.quantiles.items()})
        return out


def rate_statistics(
    rates: torch.Tensor,
    bins: int = 64,
    range: tuple[float, float] | None = None,
    quantiles: tuple[float, ...] = (0.01, 0.5, 0.99),
) -> RateStats:
    """Min / mean / max / std / quantiles and a histogram of any tensor of rates (bits)."""
    r = rates.detach().reshape(-1).to("cpu", torch.float64)
    if r.numel() == 0:
        raise ValueError("rates is empty")
    if not torch.isfinite(r).all():
        raise ValueError("rates contains non-finite values")
    lo, hi = (float(r.min()), float(r.max())) if range is None else range
    if hi <= lo:
        hi = lo + 1.0
    hist = torch.histc(r, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    q = torch.quantile(r, torch.tensor(quantiles, dtype=torch.float64)) if r.numel() < 2**24 else None
    qd = {float(a): float(b) for a, b in zip(quantiles, q)} if q is not None else {}
    return RateStats(
        mean=float(r.mean()),
        min=float(r.min()),
        max=float(r.max()),
        std=float(r.std()) if r.numel() > 1 else 0.0,
        quantiles=qd,
        histogram=hist,
        bin_edges=edges,
        count=r.numel(),
    )


# --------------------------------------------------------------------------- band statistics

BAND_QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)


def band_masks(rates: torch.Tensor, target_bits: float, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(over, under)`` boolean masks of the TDC band ``[T - alpha, T + alpha]``.

    ``over``: ``R_g > T + alpha`` (over budget: GQ loses information, the paper's Theorem 3.2);
    ``under``: ``R_g < T - alpha`` (under budget: codebook capacity unused). The one definition
    used by the TDC weights and controllers, the band statistics and :func:`recommend_codebook`.
    """
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    return rates > target_bits + tolerance, rates < target_bits - tolerance


@dataclass
class BandStats:
    """Where a set of group rates lies relative to the TDC band ``[T - alpha, T + alpha]``.

    Shares are fractions of all (token, group) rates; ``in_band + over_budget + under_budget = 1``.
    ``quantiles`` maps a probability to the rate (bits) at that quantile (linear interpolation).
    """

    target_bits: float
    tolerance: float
    count: int
    in_band: float
    over_budget: float
    under_budget: float
    mean: float
    min: float
    max: float
    mean_excess: float  # E[max(R_g - (T + alpha), 0)] bits per group
    quantiles: dict[float, float]

    def as_dict(self) -> dict[str, float]:
        """Flat logger keys: ``band-in``, ``band-over``, ``band-under``, ``band-excess``, ``bits-qNN``."""
        out = {"band-in": self.in_band, "band-over": self.over_budget, "band-under": self.under_budget, "band-excess": self.mean_excess}
        out.update({f"bits-q{round(q * 100):02d}": v for q, v in self.quantiles.items()})
        return out

    def to_json(self) -> dict:
        """JSON-ready dict (quantile keys as ``"q01"``, ...)."""
        return {"target_bits": self.target_bits, "tolerance": self.tolerance, "count": self.count, "in_band": self.in_band,
                "over_budget": self.over_budget, "under_budget": self.under_budget, "mean": self.mean, "min": self.min,
                "max": self.max, "mean_excess": self.mean_excess,
                "quantiles": {f"q{round(q * 100):02d}": v for q, v in self.quantiles.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "BandStats":
        """Inverse of :meth:`to_json` (extra keys, e.g. ``codebook_size``, are ignored)."""
        names = ("target_bits", "tolerance", "count", "in_band", "over_budget", "under_budget", "mean", "min", "max", "mean_excess")
        return cls(**{k: d[k] for k in names}, quantiles={int(k[1:]) / 100: v for k, v in d["quantiles"].items()})

    def table(self) -> str:
        """One-row Markdown table (shares in percent, rates in bits)."""
        qs = list(self.quantiles)
        head = ("| group rates (bits) | in band | over budget | under budget | mean | "
                + " | ".join(f"q{round(q * 100):02d}" for q in qs) + " | max |")
        band = f"{self.target_bits - self.tolerance:g}-{self.target_bits + self.tolerance:g}"
        row = (f"| {self.count} rates, band {band} | {100 * self.in_band:.1f}% | {100 * self.over_budget:.1f}% | "
               f"{100 * self.under_budget:.1f}% | {self.mean:.2f} | " + " | ".join(f"{self.quantiles[q]:.2f}" for q in qs)
               + f" | {self.max:.2f} |")
        return "\n".join([head, "|" + "---|" * (len(qs) + 6), row])


def band_statistics(
    rates: torch.Tensor, target_bits: float, tolerance: float = DEFAULT_TOLERANCE, quantiles: tuple[float, ...] = BAND_QUANTILES
) -> BandStats:
    """Shares of ``rates`` (any shape, bits) in band / over budget (``> T + alpha``) / under budget
    (``< T - alpha``), the mean excess over the band, and quantiles.

    >>> s = band_statistics(torch.tensor([9.0, 10.2, 10.4, 12.0]), target_bits=10.0, tolerance=0.5)
    >>> (s.in_band, s.over_budget, s.under_budget, s.mean_excess)
    (0.5, 0.25, 0.25, 0.375)
    """
    if not math.isfinite(target_bits):
        raise ValueError(f"target_bits must be finite, got {target_bits}")
    r = rates.detach().reshape(-1).to("cpu", torch.float64)
    if r.numel() == 0:
        raise ValueError("rates is empty")
    if not torch.isfinite(r).all():
        raise ValueError("rates contains non-finite values")
    if any(not 0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"quantiles must lie in [0, 1], got {quantiles}")
    over, under = band_masks(r, target_bits, tolerance)
    n = r.numel()
    n_over, n_under = int(over.sum()), int(under.sum())
    qv = np.quantile(r.numpy(), list(quantiles)) if quantiles else []
    return BandStats(
        target_bits=float(target_bits), tolerance=float(tolerance), count=n, in_band=(n - n_over - n_under) / n,
        over_budget=n_over / n, under_budget=n_under / n, mean=float(r.mean()), min=float(r.min()), max=float(r.max()),
        mean_excess=float((r - (target_bits + tolerance)).clamp_min(0).mean()),
        quantiles={float(q): float(v) for q, v in zip(quantiles, qv)},
    )


# --------------------------------------------------------------------------- recommendation


#: The paper's operating range: 0.5 to 4 bits per channel, K <= 2**18 (search cost grows with K * m).
BITS_PER_CHANNEL_RANGE = (0.5, 4.0)
MAX_RECOMMENDED_LOG2_K = 18


@dataclass
class CodebookOption:
    """One candidate ``(K, m)`` for a model: what it costs and, when measured by
    :func:`recommend_codebook`, what it predicts (the measured fields are NaN otherwise)."""

    codebook_dim: int
    log2_codebook_size: int
    num_codebooks: int
    bits_per_token: float
    mean_group_rate: float = math.nan
    frac_over_budget: float = math.nan  # share of groups with R_g > log2 K + tolerance
    mean_excess_bits: float = math.nan  # E[max(R_g - log2 K, 0)]: information GQ must throw away
    pixels_per_token: int | None = None
    tokens_per_image: int | None = None

    @property
    def codebook_size(self) -> int:
        return 2**self.log2_codebook_size

    @property
    def bits_per_channel(self) -> float:
        return self.log2_codebook_size / self.codebook_dim

    @property
    def bpp(self) -> float | None:
        return None if self.pixels_per_token is None else self.bits_per_token / self.pixels_per_token

    @property
    def bits_per_image(self) -> float | None:
        return None if self.tokens_per_image is None else self.bits_per_token * self.tokens_per_image

    @property
    def recommended(self) -> bool:
        """Inside the paper's operating range (:data:`BITS_PER_CHANNEL_RANGE`, ``K <= 2**18``)."""
        lo, hi = BITS_PER_CHANNEL_RANGE
        return lo <= self.bits_per_channel <= hi and self.log2_codebook_size <= MAX_RECOMMENDED_LOG2_K

    @property
    def note(self) -> str:
        if self.bits_per_channel > BITS_PER_CHANNEL_RANGE[1]:
            return "many bits per channel: a larger m is usually better at this rate"
        if self.bits_per_channel < BITS_PER_CHANNEL_RANGE[0]:
            return "under 0.5 bit per channel: expect a large TDC fine-tune / quality loss"
        return ""


def _g(v) -> str:
    return "n/a" if v is None else f"{v:g}"


class CodebookOptions(list):
    """A list of :class:`CodebookOption` with a Markdown :meth:`table`."""

    def table(self, only_recommended: bool = False) -> str:
        rows = ["| m | K | codebooks/token | bits/token | bits/channel | bpp | bits/image | recommended | note |",
                "|---|---|---|---|---|---|---|---|---|"]
        for o in self:
            if only_recommended and not o.recommended:
                continue
            rows.append(f"| {o.codebook_dim} | 2^{o.log2_codebook_size} | {o.num_codebooks} | {o.bits_per_token:g} | "
                        f"{o.bits_per_channel:g} | {_g(o.bpp)} | {_g(o.bits_per_image)} | "
                        f"{'yes' if o.recommended else 'no'} | {o.note} |")
        return "\n".join(rows)


def codebook_options(channels: int, log2_codebook_sizes=(8, 10, 12, 14, 16, 18), pixels_per_token: int | None = None,
                     tokens_per_image: int | None = None) -> CodebookOptions:
    """Every ``(K = 2**k, m)`` for ``m`` dividing ``channels`` and ``k`` in ``log2_codebook_sizes``,
    with its rates (bits per token / channel, and bpp / bits per image when ``pixels_per_token`` /
    ``tokens_per_image`` are given), sorted by bpp then larger ``m`` (at equal bits the paper's
    ablation favours larger ``m``). A static table; :func:`recommend_codebook` chooses from measured rates."""
    out = CodebookOptions(
        CodebookOption(m, int(k), channels // m, channels // m * int(k), pixels_per_token=pixels_per_token,
                       tokens_per_image=tokens_per_image)
        for m in divisors(channels) for k in log2_codebook_sizes
    )
    out.sort(key=lambda o: (o.bits_per_token, -o.codebook_dim))
    return out


@dataclass
class CodebookRecommendation:
    """Result of :func:`recommend_codebook`: the chosen option plus every option considered."""

    codebook_size: int
    codebook_dim: int
    chosen: CodebookOption
    options: list[CodebookOption] = field(default_factory=list)
    reasoning: str = ""

    def table(self) -> str:
        """Markdown table of every option considered."""
        rows = [
            "| m | log2 K | codebooks/token | bits/token | mean R_g | P(R_g > log2K + tol) | E[excess bits] |",
            "|---|---|---|---|---|---|---|",
        ]
        for o in self.options:
            mark = " **(chosen)**" if o is self.chosen else ""
            rows.append(
                f"| {o.codebook_dim}{mark} | {o.log2_codebook_size} | {o.num_codebooks} | {o.bits_per_token:.0f} | "
                f"{o.mean_group_rate:.2f} | {o.frac_over_budget:.3f} | {o.mean_excess_bits:.3f} |"
            )
        return "\n".join(rows)


def recommend_codebook(
    channel_rates: torch.Tensor,
    grouping: str = "contiguous",
    max_log2_codebook_size: int = 18,
    min_log2_codebook_size: int = 1,
    tolerance: float = DEFAULT_TOLERANCE,
    codebook_dims: list[int] | None = None,
) -> CodebookRecommendation:
    """Recommend ``(K, m)`` for a model from its per-channel rates.

    ``channel_rates`` is ``(N, C)``: for N tokens (spatial positions of many images), the KL
    of each of the C latent channels in bits (:func:`kl_bits_per_channel`).

    Reasoning (the paper's theorems): GQ's error is small for a group when ``log2 K >= R_g``
    and grows fast when ``log2 K < R_g``. For each codebook dimension ``m`` dividing C we
    group the channels, set ``log2 K = ceil(mean R_g)`` (the smallest power-of-two codebook
    that covers the *average* group, i.e. the rate a TDC fine-tune would equalise at), clipped
    to ``[min_log2_codebook_size, max_log2_codebook_size]`` because search cost grows
    linearly with K. Options whose K would need to exceed the cap are kept but penalised by
    the information they throw away (``E[max(R_g - log2 K, 0)]``). Among options we prefer,
    in order: the least expected excess bits per token, then the larger ``m`` (the paper's
    ablation: larger m reconstructs better at equal bits), then fewer bits per token.
    The fraction of groups above ``log2 K + tolerance`` predicts how much a TDC fine-tune has
    to move the model before the conversion becomes nearly lossless: near 0 means GQ can
    be applied directly; large means fine-tune with TDC first.
    """
    if channel_rates.ndim != 2:
        raise ValueError(f"channel_rates must be (N, C), got shape {tuple(channel_rates.shape)}")
    if not torch.isfinite(channel_rates).all():
        raise ValueError("channel_rates contains non-finite values")
    if max_log2_codebook_size < min_log2_codebook_size:
        raise ValueError("max_log2_codebook_size must be >= min_log2_codebook_size")
    rates = channel_rates.detach().to("cpu", torch.float64)
    channels = rates.shape[1]
    dims = codebook_dims or divisors(channels)
    options = []
    for m in dims:
        check_grouping(channels, m, grouping)
        rg = group_channels(rates, m, grouping).sum(-1)  # (N, G)
        mean_rg = float(rg.mean())
        log2k = int(min(max(math.ceil(mean_rg - 1e-9), min_log2_codebook_size), max_log2_codebook_size))
        excess = (rg - log2k).clamp_min(0)
        options.append(
            CodebookOption(
                codebook_dim=m,
                log2_codebook_size=log2k,
                num_codebooks=channels // m,
                bits_per_token=channels // m * log2k,
                mean_group_rate=mean_rg,
                frac_over_budget=float(band_masks(rg, log2k, tolerance)[0].double().mean()),
                mean_excess_bits=float(excess.sum(-1).mean()),
            )
        )
    chosen = min(options, key=lambda o: (round(o.mean_excess_bits, 1), -o.codebook_dim, o.bits_per_token))
    larger = [o for o in options if o.codebook_dim > chosen.codebook_dim]
    if not larger:
        why = "and has the largest m"
    else:  # chosen over a larger m only because every larger m throws away more bits
        nxt = min(larger, key=lambda o: o.codebook_dim)
        why = (f", the fewest of the options; larger m lose more (m={nxt.codebook_dim}, K=2^{nxt.log2_codebook_size}: "
               f"{nxt.mean_excess_bits:.3f} bits/token)")
    reasoning = (
        f"mean channel rate {float(rates.mean()):.3f} bits; chose m={chosen.codebook_dim}, "
        f"K=2^{chosen.log2_codebook_size} ({chosen.bits_per_token:.0f} bits/token) because it loses "
        f"{chosen.mean_excess_bits:.3f} expected bits/token {why}; "
        f"{100 * chosen.frac_over_budget:.1f}% of groups exceed log2 K + {tolerance} "
        + ("(convert directly)." if chosen.frac_over_budget < 0.05 else "(fine-tune with TDC before converting).")
    )
    return CodebookRecommendation(
        codebook_size=chosen.codebook_size, codebook_dim=chosen.codebook_dim, chosen=chosen, options=options, reasoning=reasoning
    )
