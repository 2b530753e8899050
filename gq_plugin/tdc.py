"""Target Divergence Constraint (TDC): steer every group's rate to about ``log2 K`` bits.

Replaces the VAE's KL term during fine-tuning. Target ``T = log2 K`` bits per group (one
sub-codebook of m channels), band ``[T - alpha, T + alpha]`` with ``alpha = 0.5`` bits. GQ is
nearly lossless for a group whose rate ``R_g <= T`` (the paper's Theorem 3.1) and loses
information fast above it, so the constraint that matters is **no group over budget**
(``R_g > T + alpha``); groups under budget only leave codebook capacity unused.

Two rules (``rule=``), both with three multipliers that move by a factor ``1 + eps`` once per
optimizer step of the autoencoder (:meth:`TargetDivergenceConstraint.step`):

``rule="reference"`` -- the authors' rule, kept bit for bit::

    loss = lam * mean_over_batch( sum_{tokens, groups} w_g * R_g )
    w_g  = lam_max if R_g > T + alpha,   1 in the band,   lam_min if R_g < T - alpha
    lam     grows if mean R_g > T            else shrinks   (clamp lam_global_range)
    lam_max grows if max  R_g > T + alpha    else shrinks   (clamp [1, 1000])
    lam_min shrinks if min R_g < T - alpha   else grows     (clamp [1e-3, 1])

Why it does not hold the band: the over-budget weight is the *product* ``lam * lam_max``.
When a model's mean rate sits below T while some tokens are above the band -- the normal
state of a VAE whose simple tokens do not need T bits (the loss can only lower rates, never
raise them) -- ``lam`` shrinks by ``1/(1+eps)`` on exactly the steps on which ``lam_max``
grows by ``1+eps``: the product stays at 1 until both hit their clamps (1e-3 * 1000 = 1 again).
The over-budget penalty is then no stronger than a plain KL weight. And ``lam_max`` reacts to
the single most extreme token of the batch, so it rises on every step as long as one token
anywhere is above the band, whatever happens to the other 99.9 %. Measured on the tiny_cpu
recipe (600 steps, K = 2^10, m = 4, seeds 0-5): all three multipliers at their clamps from step
240 and 21-26 % of held-out group rates over budget (benchmarks/tdc_rule/RESULTS.md).

``rule="band"`` (default) -- decoupled controllers, quantile-driven::

    loss = mean_over_batch( sum_g  lam * v_g * R_g  +  lam_max * max(R_g - H, 0) )
    H    = T + hinge * alpha                                  (hinge = tdc_hinge, default 0.5)
    v_g  = lam_min if R_g < T - alpha,   1 otherwise
    lam     grows if mean R_g > T                                 else shrinks
    lam_max grows if share(R_g > T + alpha) > 1 - quantile       else shrinks  (clamp [1e-2, 1e4])
    lam_min shrinks if share(R_g < T - alpha) > 1 - quantile     else grows    (clamp [1e-3, 1])

* **Decoupled**: the mean controller ``lam`` scales the KL-like term of every group; the band
  controller ``lam_max`` weighs a hinge on the *excess over H* that is **added**, so a
  falling ``lam`` (mean below target) can no longer cancel it. An over-budget group's gradient
  per bit is ``lam + lam_max``; in the band ``lam``; under it ``lam * lam_min``.
* **Quantiles, not extremes**: ``share(R_g > T + alpha) > 1 - quantile`` is the same event as
  "the ``quantile``-th quantile of the rates lies above ``T + alpha``" (0.99: the 99th
  percentile), so ``lam_max`` settles where about 1 % of the rates are over budget instead of
  chasing one outlier token. Counts are sums, so the statistic all-reduces exactly across ranks.
* The hinge (instead of ``w_g * R_g``) is continuous and charges only the excess over ``H``:
  high-demand groups settle *on* ``H``, inside the band, instead of being pushed through it.
  Where ``H`` sits inside the band trades the GQ conversion loss (lower ``H``: fewer bits
  above ``T``, the paper's lossless budget) against the rate the continuous model may use
  (higher ``H``). Measured where the rate budget binds (tiny_cpu with K = 2^6, seeds 0-5,
  benchmarks/tdc_rule/k64/RESULTS.md): ``H = T`` (the rule's first form) cut the conversion loss
  by 0.21 dB against the authors' rule on every seed but cost 0.37 dB of continuous PSNR
  (mean rate ~1 bit under T), so GQ PSNR fell 0.17 dB (5 of 6 seeds); ``H = T + alpha/2``
  gains 0.14 dB GQ PSNR over ``H = T`` (5 of 6 seeds) and ties the authors' rule (mean -0.02 dB,
  signs split 3/3) with ~1 % over budget instead of 21-26 %. At the recipe's K = 2^10, where
  600 steps (not rate) limit PSNR, the two hinges and the authors' rule are inside each other's
  noise (means within 0.06 dB; a no-effect perturbation moves a seed by up to 0.48 dB).
  (A hinge at the band edge ``T + alpha`` lets rates chatter across the edge that also defines
  "over budget", and ``lam_max`` runs away on the toy problem of tests/test_tdc.py.)

Other band variants measured (benchmarks/tdc_rule/RESULTS.md and k64/RESULTS.md: ``quantile=0.97``,
a lift that pushes under-budget rates up into the band, at K = 2^10; the default plus that lift,
-0.05 dB against the default at K = 2^6 and -0.09 dB at K = 2^10; the hinge at ``T + 3 alpha/4``,
+0.02 dB against the default at K = 2^6) were no better on every seed. Over all runs at K = 2^6,
continuous PSNR grows +0.44 dB per bit of mean rate but the GQ conversion loss grows too
(+0.28 dB per bit), so GQ PSNR barely follows the rate a rule lets the model spend (+0.16 dB per bit).

``tdc_spend=True`` (band rule only; issue #26): the ``lam`` term charges only the rate above the
target, ``lam * v_g * max(R_g - T, 0)``, instead of the whole ``R_g``. The idea: a fine-tune from a
pretrained VAE starts far above T (about 40 bits per group at the tiny from-pretrained scale); while
the mean is above T, ``lam`` grows and its pull lowers *every* group, also those already under T.
With ``tdc_spend`` a group under T feels no rate pull at all, only the reconstruction loss.
**Measured, and not adopted** (campaign h26 of benchmarks/paper/pretrained.py, tiny scale, 12 bits,
3 seeds, 1000 TDC + 200 calibration steps): the held-out mean rate stays where the default leaves it
(9.41 / 9.53 / 9.83 bits against 9.62 / 9.64 / 9.72; 93-95 % of the groups under T, 1 % over
T + alpha), and GQ PSNR ties the default (+0.12 / -0.10 / +0.02 dB). Groups under T do not climb
back without a pull: the reconstruction loss alone does not spend the budget at this length. The
default stays ``False``.

Both rules: the multipliers are buffers (saved in checkpoints, restored on resume), ``lam_max``
can decay again (the authors' pre-2026 code only ratcheted it up), the statistics are
all-reduced across ranks under ``torch.distributed`` so every rank holds the same multipliers,
and the update happens on-device without host syncs. Under- / over-budget masks come from
:func:`gq_plugin.rate.band_masks` (one definition for the loss, the controllers and the logged
band statistics).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .rate import DEFAULT_TOLERANCE, RateStats, band_masks, rate_statistics

RULES = ("band", "reference")
# default multiplier clamps per rule (lam_max_range, lam_min_range); lam_global_range is shared
_DEFAULT_RANGES = {"reference": ((1.0, 1000.0), (1e-3, 1.0)), "band": ((1e-2, 1e4), (1e-3, 1.0))}


def _pair(name: str, value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    return lo, hi


def _in_unit_interval(name: str, value, low: float, hint: str = "") -> float:
    """``value`` as a float in ``[low, 1)``; ``ValueError`` naming the setting otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < 1.0:
        raise ValueError(f"{name} must be in [{low:g}, 1){hint}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TDCSettings:
    """The TDC settings: the single source of their names, defaults and validation.

    Args:
        tolerance: ``alpha``, half-width of the band around ``log2 K``, in bits.
        lam_factor: ``1 + eps``; the multipliers move by this factor per :meth:`~TargetDivergenceConstraint.step`.
        lam_max_range / lam_min_range / lam_global_range: clamps of the multipliers (None: the
            rule's default, [1, 1000] / [1e-3, 1] for "reference", [1e-2, 1e4] / [1e-3, 1] for "band").
        tdc_rule: ``"band"`` (default) or ``"reference"`` (the authors' rule); see the module docstring.
        tdc_quantile: band rule: ``lam_max`` grows while more than ``1 - tdc_quantile`` of the rates
            are over budget (it steers that quantile to ``T + alpha``; ``lam_min`` likewise below).
        tdc_hinge: band rule: where the over-budget hinge starts, as a fraction of ``alpha`` above
            ``T``: 0.5 (default) at ``T + alpha/2``, 0 at ``T`` (the paper's lossless budget; the
            default before 2026-12); in [0, 1) (at 1 it would coincide with the edge that defines
            "over budget"); see the module docstring.
        tdc_spend: band rule: the ``lam`` term charges only the rate above ``T`` (groups under the
            target feel no rate pull), so the rates narrow onto ``T`` from above; False (default) charges
            the whole rate. Measured (issue #26): it neither raises the held-out rate nor GQ PSNR at
            the tiny from-pretrained scale; see the module docstring.

    Serialise with :meth:`as_dict` (JSON-able); rebuild with :meth:`from_dict`, which names an
    unknown key or a bad value in a ``ValueError``. To add a setting, add a field here (with its
    default and its check in ``__post_init__``); every serialisation, recipe validation and
    quantizer keyword follows.
    """

    tolerance: float = DEFAULT_TOLERANCE
    lam_factor: float = 1.01
    lam_max_range: tuple[float, float] | None = None
    lam_min_range: tuple[float, float] | None = None
    lam_global_range: tuple[float, float] = (1e-3, 1e3)
    tdc_rule: str = "band"
    tdc_quantile: float = 0.99
    tdc_hinge: float = 0.5
    tdc_spend: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
        if self.tdc_rule not in RULES:
            raise ValueError(f"tdc_rule must be one of {RULES}, got {self.tdc_rule!r}")
        set_(self, "tdc_quantile", _in_unit_interval("tdc_quantile", self.tdc_quantile, 0.5))
        set_(self, "tdc_hinge", _in_unit_interval("tdc_hinge", self.tdc_hinge, 0.0, " (a fraction of the tolerance alpha above log2 K)"))
        if not isinstance(self.tdc_spend, bool):
            raise ValueError(f"tdc_spend must be True or False, got {self.tdc_spend!r}")
        if self.tdc_spend and self.tdc_rule != "band":
            raise ValueError(f"tdc_spend is a setting of tdc_rule='band', got tdc_rule={self.tdc_rule!r}")
        default_max, default_min = _DEFAULT_RANGES[self.tdc_rule]  # None: the rule's default clamps
        if self.lam_max_range is None:
            set_(self, "lam_max_range", default_max)
        if self.lam_min_range is None:
            set_(self, "lam_min_range", default_min)
        for name in ("tolerance", "lam_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{name} must be a number, got {v!r}")
            set_(self, name, float(v))
        if not self.tolerance >= 0 or not math.isfinite(self.tolerance):
            raise ValueError(f"tolerance must be finite and >= 0, got {self.tolerance}")
        if not self.lam_factor > 1.0 or not math.isfinite(self.lam_factor):
            raise ValueError(f"lam_factor must be finite and > 1 (eps = lam_factor - 1 > 0), got {self.lam_factor}")
        for name in ("lam_max_range", "lam_min_range", "lam_global_range"):
            lo, hi = _pair(name, getattr(self, name))
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
            set_(self, name, (lo, hi))

    @property
    def eps(self) -> float:
        """The multiplicative step ``lam_factor - 1``."""
        return self.lam_factor - 1.0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_dict(self) -> dict:
        """JSON-able dict (pairs as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> TDCSettings:
        """Settings from a dict of field names (``ValueError`` naming any unknown key)."""
        unknown = sorted(set(d) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown TDC setting(s) {unknown}; valid: {list(cls.names())}")
        return cls(**d)


class TargetDivergenceConstraint(nn.Module):
    """Adaptive rate constraint on per-group rates (bits).

    Args:
        target_bits: ``T``, normally ``log2(codebook_size)``.
        tolerance, eps, and the :class:`TDCSettings` fields as keywords (``lam_max_range``, ...):
            override ``settings`` (default :class:`TDCSettings()`); ``eps`` is ``lam_factor - 1``.
        settings: a :class:`TDCSettings`.
        auto_step: if True, every forward with gradients enabled in training mode also calls
            :meth:`step` (convenient for loops you cannot edit, e.g. a diffusers training
            script). If False (recommended in your own loop), call :meth:`step` once after
            each autoencoder optimizer step.
        sync_distributed: all-reduce the batch statistics when ``torch.distributed`` is
            initialised (mean by sum/count, min by MIN, max by MAX).
        clamp_patience: warn once (``RuntimeWarning``) when ``lam_global`` has sat at an end of
            ``lam_global_range`` (the band rule: its upper end) for this many consecutive steps:
            the constraint is inactive or overwhelmed (e.g. a host KL weight of 1e-6 scaling the
            TDC loss, or a loss that never reaches the optimizer). Checked every ``clamp_patience`` steps (one host sync each);
            0 disables it.
    """

    def __init__(
        self,
        target_bits: float,
        tolerance: float | None = None,
        eps: float | None = None,
        *,
        settings: TDCSettings | None = None,
        auto_step: bool = True,
        sync_distributed: bool = True,
        clamp_patience: int = 200,
        rule: str | None = None,
        quantile: float | None = None,
        **fields,
    ) -> None:
        super().__init__()
        if rule is not None:
            fields["tdc_rule"] = rule
        if quantile is not None:
            fields["tdc_quantile"] = quantile
        if not math.isfinite(target_bits) or target_bits <= 0:
            raise ValueError(f"target_bits must be a positive finite number, got {target_bits}")
        if tolerance is not None:
            fields["tolerance"] = tolerance
        if eps is not None:
            if not eps > 0:
                raise ValueError(f"eps must be > 0, got {eps}")
            fields["lam_factor"] = 1.0 + eps
        base = settings if settings is not None else TDCSettings()
        # the given fields override ``settings``; from_dict validates names and values
        merged = {**base.as_dict(), **fields}
        if "tdc_rule" in fields:  # ranges left at the old rule's defaults follow the new rule's defaults
            for k, d in zip(("lam_max_range", "lam_min_range"), _DEFAULT_RANGES[base.tdc_rule]):
                if k not in fields and tuple(merged[k]) == d:
                    merged[k] = None
        self.settings = TDCSettings.from_dict(merged) if fields else base
        self.target_bits = float(target_bits)
        self.auto_step = auto_step
        self.sync_distributed = sync_distributed
        self.register_buffer("lam_global", torch.ones(()))
        self.register_buffer("lam_max", torch.ones(()))
        self.register_buffer("lam_min", torch.ones(()))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        if isinstance(clamp_patience, bool) or not isinstance(clamp_patience, int) or clamp_patience < 0:
            raise ValueError(f"clamp_patience must be an int >= 0, got {clamp_patience!r}")
        self.clamp_patience = clamp_patience
        # consecutive steps with lam_global at a clamp (on-device; read every clamp_patience steps)
        self.register_buffer("_steps_at_clamp", torch.zeros((), dtype=torch.long), persistent=False)
        self._steps_since_check = 0
        self._clamp_warned = False
        # Pending statistics since the last step(): [sum, count, min, max, n_over, n_under] (float64).
        self._pending: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    # the settings, read where the math needs them
    tolerance = property(lambda self: self.settings.tolerance)
    eps = property(lambda self: self.settings.eps)
    lam_max_range = property(lambda self: self.settings.lam_max_range)
    lam_min_range = property(lambda self: self.settings.lam_min_range)
    lam_global_range = property(lambda self: self.settings.lam_global_range)
    rule = property(lambda self: self.settings.tdc_rule)
    quantile = property(lambda self: self.settings.tdc_quantile)

    @property
    def hinge_bits(self) -> float:
        """Band rule: the rate (bits) above which the ``lam_max`` hinge charges, ``T + tdc_hinge * alpha``."""
        return self.target_bits + self.settings.tdc_hinge * self.tolerance

    def extra_repr(self) -> str:
        q = f", quantile={self.quantile}, hinge_bits={self.hinge_bits}" if self.rule == "band" else ""
        return f"target_bits={self.target_bits}, tolerance={self.tolerance}, eps={self.eps}, rule={self.rule!r}{q}, auto_step={self.auto_step}"

    # ------------------------------------------------------------------ loss

    def _masks(self, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return band_masks(r, self.target_bits, self.tolerance)

    def weights(self, rates: torch.Tensor) -> torch.Tensor:
        """Per-group weights of the ``lam``-scaled term (no gradient): ``{lam_max, 1, lam_min}``
        (reference) or ``{1, 1, lam_min}`` (band; its over-budget penalty is the separate hinge)."""
        r = rates.detach()
        hi, lo = self._masks(r)
        one = torch.ones((), dtype=r.dtype, device=r.device)
        above = self.lam_max.to(r.dtype) if self.rule == "reference" else one
        return torch.where(hi, above, torch.where(lo, self.lam_min.to(r.dtype), one))

    def per_sample_loss(self, rates: torch.Tensor) -> torch.Tensor:
        """The loss for each sample: (B, ...) bits -> (B,).

        reference: ``lam * sum(w * R)``; band: ``sum(lam * w * R + lam_max * max(R - hinge_bits, 0))``
        (``hinge_bits = T + tdc_hinge * alpha``; with ``tdc_spend`` the first term charges ``max(R - T, 0)``)."""
        if rates.ndim < 1 or rates.shape[0] == 0:
            raise ValueError(f"rates must be (B, ...) with B > 0, got shape {tuple(rates.shape)}")
        w = self.weights(rates)
        charged = (rates - self.target_bits).clamp_min(0) if self.settings.tdc_spend else rates
        per_sample = (w * charged).flatten(1).sum(1) if rates.ndim > 1 else w * charged
        # clone: step() updates the buffers in place, which must not touch the autograd graph
        per_sample = self.lam_global.clone().to(rates.dtype) * per_sample
        if self.rule == "band":
            excess = (rates - self.hinge_bits).clamp_min(0)
            excess = excess.flatten(1).sum(1) if rates.ndim > 1 else excess
            per_sample = per_sample + self.lam_max.clone().to(rates.dtype) * excess
        return per_sample

    def loss(self, rates: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of :meth:`per_sample_loss`; ``rates`` is (B, ...) bits."""
        return self.per_sample_loss(rates).mean()

    def forward(self, rates: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Loss for this batch (``reduction="none"``: per sample); records its statistics for
        the next :meth:`step`."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        rates = rates.float()
        per_sample = self.per_sample_loss(rates)
        loss = per_sample.mean() if reduction == "mean" else per_sample
        self.accumulate(rates)
        if self.auto_step and self.training and torch.is_grad_enabled():
            self.step()
        return loss

    # ------------------------------------------------------------------ statistics

    def accumulate(self, rates: torch.Tensor) -> None:
        """Add a batch's rates to the statistics consumed by the next :meth:`step`."""
        r = rates.detach().reshape(-1).double()
        over, under = self._masks(r)
        n = torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device)
        batch = torch.stack([r.sum(), n, r.min(), r.max(), over.sum().double(), under.sum().double()])
        if self._pending is None or self._pending.device != batch.device:
            self._pending = batch
        else:
            p = self._pending
            self._pending = torch.stack([p[0] + batch[0], p[1] + batch[1], torch.minimum(p[2], batch[2]), torch.maximum(p[3], batch[3]),
                                         p[4] + batch[4], p[5] + batch[5]])
        mean = batch[0] / batch[1]
        self.last_stats = {"bits-mean": mean.float(), "bits-min": batch[2].float(), "bits-max": batch[3].float(),
                           "band-over": (batch[4] / n).float(), "band-under": (batch[5] / n).float()}

    def _reduced_pending(self) -> torch.Tensor:
        p = self._pending
        if self.sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            dev = p.device
            if backend == "nccl" and dev.type != "cuda":
                p = p.cuda()
            sums = p[[0, 1, 4, 5]].clone()
            mins = p[2:3].clone()
            maxs = p[3:4].clone()
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(mins, op=dist.ReduceOp.MIN)
            dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
            p = torch.cat([sums[:2], mins, maxs, sums[2:]]).to(dev)
        return p

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name in ("lam_global", "lam_max", "lam_min"):
            t = state_dict.get(prefix + name)
            if t is None:
                continue
            if not torch.is_tensor(t) or t.numel() != 1 or not t.is_floating_point():
                raise ValueError(f"TDC buffer {prefix}{name} must be one floating-point value, got {t!r}")
            v = float(t)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"TDC multiplier {prefix}{name} = {v} in the checkpoint: multipliers must be finite and > 0; refusing to load")
        t = state_dict.get(prefix + "num_steps")
        if t is not None and (not torch.is_tensor(t) or t.numel() != 1 or t.is_floating_point() or int(t) < 0):
            raise ValueError(f"TDC buffer {prefix}num_steps must be one integer >= 0, got {t!r}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    @torch.no_grad()
    def step(self) -> bool:
        """Apply one multiplicative update from the statistics accumulated since the last call.

        Returns False (and changes nothing) if no batch was seen since the last step. Under
        ``torch.distributed`` every rank must call it (it all-reduces).
        """
        if self._pending is None:
            return False
        p = self._reduced_pending()
        self._pending = None
        mean, rmin, rmax = p[0] / p[1], p[2], p[3]
        share_over, share_under = p[4] / p[1], p[5] / p[1]
        up = self.settings.lam_factor
        t, a = self.target_bits, self.tolerance
        dev = self.lam_global.device
        f_global = torch.where(mean > t, up, 1.0 / up).to(dev, torch.float32)
        if self.rule == "reference":  # the extremes of the batch
            f_max = torch.where(rmax > t + a, up, 1.0 / up).to(dev, torch.float32)
            f_min = torch.where(rmin < t - a, 1.0 / up, up).to(dev, torch.float32)
        else:  # the shares outside the band, i.e. the quantile-th / (1 - quantile)-th quantiles
            allowed = 1.0 - self.quantile
            f_max = torch.where(share_over > allowed, up, 1.0 / up).to(dev, torch.float32)
            f_min = torch.where(share_under > allowed, 1.0 / up, up).to(dev, torch.float32)
        self.lam_global.mul_(f_global).clamp_(*self.lam_global_range)
        self.lam_max.mul_(f_max).clamp_(*self.lam_max_range)
        self.lam_min.mul_(f_min).clamp_(*self.lam_min_range)
        self.num_steps.add_(1)
        self._watch_clamp()
        self.last_stats.update({"bits-mean-global": mean.float(), "bits-min-global": rmin.float(), "bits-max-global": rmax.float(),
                                "band-over-global": share_over.float(), "band-under-global": share_under.float()})
        return True

    def _watch_clamp(self) -> None:
        if not self.clamp_patience or self._clamp_warned:
            return
        lo, hi = self.lam_global_range
        # band rule: lam at its lower clamp is the normal state of a model whose mean rate is below
        # the target (nothing in the band rule needs those groups higher), so only the upper clamp counts
        at = (self.lam_global >= hi) if self.rule == "band" else (self.lam_global <= lo) | (self.lam_global >= hi)
        self._steps_at_clamp.copy_(torch.where(at, self._steps_at_clamp + 1, torch.zeros_like(self._steps_at_clamp)))
        self._steps_since_check += 1
        if self._steps_since_check < self.clamp_patience:
            return
        self._steps_since_check = 0
        run = int(self._steps_at_clamp)
        if run >= self.clamp_patience:
            self._clamp_warned = True
            lam = float(self.lam_global)
            side = "upper" if lam >= math.sqrt(lo * hi) else "lower"
            why = ("the rates stay above the target however hard TDC pulls: its loss is too weak to act (a host KL "
                   "weight such as ldm's kl_weight=1e-6 scaling it, or a loss that never reaches the optimizer)"
                   if side == "upper" else "the rates stay below the target even at the weakest weight")
            warnings.warn(
                f"TDC multipliers have sat at their {side} clamp for {run} consecutive steps (lam={lam:g}, "
                f"lam-max={float(self.lam_max):g}, lam-min={float(self.lam_min):g}, lam_global_range={self.lam_global_range}): "
                f"{why}; the constraint is inactive or overwhelmed (target {self.target_bits:g} bits)",
                RuntimeWarning,
                stacklevel=3,
            )

    def multipliers(self) -> dict[str, float]:
        """Current multipliers as Python floats (forces a host sync; for logging)."""
        return {"lam": float(self.lam_global), "lam-max": float(self.lam_max), "lam-min": float(self.lam_min)}

    def log_dict(self) -> dict[str, float]:
        """Last batch statistics + multipliers as floats, for loggers."""
        out = {k: float(v) for k, v in self.last_stats.items()}
        out.update(self.multipliers())
        return out

    @staticmethod
    def statistics(rates: torch.Tensor, bins: int = 64) -> RateStats:
        """Full statistics (incl. histogram) of a rates tensor; see :func:`rate_statistics`."""
        return rate_statistics(rates, bins=bins)
