"""Target Divergence Constraint (TDC): steer every group's rate to about ``log2 K`` bits.

Replaces the VAE's KL term during fine-tuning. For group rates ``R_g`` (bits) the loss is

    loss = lam_global * mean_over_batch( sum_{tokens, groups} w_g * R_g )
    w_g  = lam_max  if R_g > T + alpha,   1  if |R_g - T| <= alpha,   lam_min  if R_g < T - alpha

with target ``T = log2 K`` and ``alpha = 0.5`` bits. Once per optimizer step of the
autoencoder (:meth:`TargetDivergenceConstraint.step`, not on discriminator steps) the
multipliers move by a factor ``1 + eps``:

* ``lam_global`` grows if mean R_g > T else shrinks (clamped to ``lam_global_range``);
* ``lam_max`` grows if max R_g > T + alpha else shrinks, clamped to [1, 1000];
* ``lam_min`` shrinks if min R_g < T - alpha else grows, clamped to [1e-3, 1].

Unlike the authors' code, the multipliers are buffers (saved in checkpoints, restored on
resume), ``lam_max`` can decay again (their pre-2026 code only ratcheted it up), the
statistics are all-reduced across ranks under ``torch.distributed`` so every rank holds the
same multipliers, and the update happens on-device without host syncs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
import warnings

import torch
import torch.distributed as dist
from torch import nn

from .rate import DEFAULT_TOLERANCE, RateStats, rate_statistics


def _pair(name: str, value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    return lo, hi


@dataclass(frozen=True)
class TDCSettings:
    """The TDC settings: the single source of their names, defaults and validation.

    Args:
        tolerance: ``alpha``, half-width of the band around ``log2 K``, in bits.
        lam_factor: ``1 + eps``; the multipliers move by this factor per :meth:`~TargetDivergenceConstraint.step`.
        lam_max_range / lam_min_range / lam_global_range: clamps of the multipliers.

    Serialise with :meth:`as_dict` (JSON-able); rebuild with :meth:`from_dict`, which names an
    unknown key or a bad value in a ``ValueError``. To add a setting, add a field here (with its
    default and its check in ``__post_init__``); every serialisation, recipe validation and
    quantizer keyword follows.
    """

    tolerance: float = DEFAULT_TOLERANCE
    lam_factor: float = 1.01
    lam_max_range: tuple[float, float] = (1.0, 1000.0)
    lam_min_range: tuple[float, float] = (1e-3, 1.0)
    lam_global_range: tuple[float, float] = (1e-3, 1e3)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise in place once
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
            ``lam_global_range`` for this many consecutive steps: the constraint is inactive or
            overwhelmed (e.g. a host KL weight of 1e-6 scaling the TDC loss, or a loss that never
            reaches the optimizer). Checked every ``clamp_patience`` steps (one host sync each);
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
        **fields,
    ) -> None:
        super().__init__()
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
        self.settings = TDCSettings.from_dict({**base.as_dict(), **fields}) if fields else base
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
        # Pending statistics since the last step(): [sum, count, min, max] (float64).
        self._pending: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    # the settings, read where the math needs them
    tolerance = property(lambda self: self.settings.tolerance)
    eps = property(lambda self: self.settings.eps)
    lam_max_range = property(lambda self: self.settings.lam_max_range)
    lam_min_range = property(lambda self: self.settings.lam_min_range)
    lam_global_range = property(lambda self: self.settings.lam_global_range)

    def extra_repr(self) -> str:
        return f"target_bits={self.target_bits}, tolerance={self.tolerance}, eps={self.eps}, auto_step={self.auto_step}"

    # ------------------------------------------------------------------ loss

    def weights(self, rates: torch.Tensor) -> torch.Tensor:
        """Per-group weights ``{lam_max, 1, lam_min}`` (no gradient)."""
        r = rates.detach()
        hi = r > self.target_bits + self.tolerance
        lo = r < self.target_bits - self.tolerance
        one = torch.ones((), dtype=r.dtype, device=r.device)
        return torch.where(hi, self.lam_max.to(r.dtype), torch.where(lo, self.lam_min.to(r.dtype), one))

    def per_sample_loss(self, rates: torch.Tensor) -> torch.Tensor:
        """``lam_global * sum(w * R)`` for each sample: (B, ...) bits -> (B,)."""
        if rates.ndim < 1 or rates.shape[0] == 0:
            raise ValueError(f"rates must be (B, ...) with B > 0, got shape {tuple(rates.shape)}")
        w = self.weights(rates)
        per_sample = (w * rates).flatten(1).sum(1) if rates.ndim > 1 else w * rates
        # clone: step() updates the buffers in place, which must not touch the autograd graph
        return self.lam_global.clone().to(rates.dtype) * per_sample

    def loss(self, rates: torch.Tensor) -> torch.Tensor:
        """``lam_global * mean over batch of sum(w * R)``; ``rates`` is (B, ...) bits."""
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
        batch = torch.stack([r.sum(), torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device), r.min(), r.max()])
        if self._pending is None or self._pending.device != batch.device:
            self._pending = batch
        else:
            p = self._pending
            self._pending = torch.stack([p[0] + batch[0], p[1] + batch[1], torch.minimum(p[2], batch[2]), torch.maximum(p[3], batch[3])])
        mean = batch[0] / batch[1]
        self.last_stats = {"bits-mean": mean.float(), "bits-min": batch[2].float(), "bits-max": batch[3].float()}

    def _reduced_pending(self) -> torch.Tensor:
        p = self._pending
        if self.sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            backend = dist.get_backend()
            dev = p.device
            if backend == "nccl" and dev.type != "cuda":
                p = p.cuda()
            sums = p[:2].clone()
            mins = p[2:3].clone()
            maxs = p[3:4].clone()
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(mins, op=dist.ReduceOp.MIN)
            dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
            p = torch.cat([sums, mins, maxs]).to(dev)
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
        up = self.settings.lam_factor
        t, a = self.target_bits, self.tolerance
        dev = self.lam_global.device
        f_global = torch.where(mean > t, up, 1.0 / up).to(dev, torch.float32)
        f_max = torch.where(rmax > t + a, up, 1.0 / up).to(dev, torch.float32)
        f_min = torch.where(rmin < t - a, 1.0 / up, up).to(dev, torch.float32)
        self.lam_global.mul_(f_global).clamp_(*self.lam_global_range)
        self.lam_max.mul_(f_max).clamp_(*self.lam_max_range)
        self.lam_min.mul_(f_min).clamp_(*self.lam_min_range)
        self.num_steps.add_(1)
        self._watch_clamp()
        self.last_stats.update({"bits-mean-global": mean.float(), "bits-min-global": rmin.float(), "bits-max-global": rmax.float()})
        return True

    def _watch_clamp(self) -> None:
        if not self.clamp_patience or self._clamp_warned:
            return
        lo, hi = self.lam_global_range
        at = (self.lam_global <= lo) | (self.lam_global >= hi)
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
