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

import math

import torch
import torch.distributed as dist
from torch import nn

from .rate import RateStats, rate_statistics


class TargetDivergenceConstraint(nn.Module):
    """Adaptive rate constraint on per-group rates (bits).

    Args:
        target_bits: ``T``, normally ``log2(codebook_size)``.
        tolerance: ``alpha``, half-width of the band in bits.
        eps: multiplicative step; multipliers move by ``(1 + eps)`` per :meth:`step`.
        lam_max_range / lam_min_range / lam_global_range: clamps of the multipliers.
        auto_step: if True, every forward with gradients enabled in training mode also calls
            :meth:`step` (convenient for loops you cannot edit, e.g. a diffusers training
            script). If False (recommended in your own loop), call :meth:`step` once after
            each autoencoder optimizer step.
        sync_distributed: all-reduce the batch statistics when ``torch.distributed`` is
            initialised (mean by sum/count, min by MIN, max by MAX).
    """

    def __init__(
        self,
        target_bits: float,
        tolerance: float = 0.5,
        eps: float = 0.01,
        lam_max_range: tuple[float, float] = (1.0, 1000.0),
        lam_min_range: tuple[float, float] = (1e-3, 1.0),
        lam_global_range: tuple[float, float] = (1e-3, 1e3),
        auto_step: bool = True,
        sync_distributed: bool = True,
    ) -> None:
        super().__init__()
        if not math.isfinite(target_bits) or target_bits <= 0:
            raise ValueError(f"target_bits must be a positive finite number, got {target_bits}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        for name, (lo, hi) in (("lam_max_range", lam_max_range), ("lam_min_range", lam_min_range), ("lam_global_range", lam_global_range)):
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {(lo, hi)}")
        self.target_bits = float(target_bits)
        self.tolerance = float(tolerance)
        self.eps = float(eps)
        self.lam_max_range = tuple(map(float, lam_max_range))
        self.lam_min_range = tuple(map(float, lam_min_range))
        self.lam_global_range = tuple(map(float, lam_global_range))
        self.auto_step = auto_step
        self.sync_distributed = sync_distributed
        self.register_buffer("lam_global", torch.ones(()))
        self.register_buffer("lam_max", torch.ones(()))
        self.register_buffer("lam_min", torch.ones(()))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        # Pending statistics since the last step(): [sum, count, min, max] (float64).
        self._pending: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

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
        up = 1.0 + self.eps
        t, a = self.target_bits, self.tolerance
        dev = self.lam_global.device
        f_global = torch.where(mean > t, up, 1.0 / up).to(dev, torch.float32)
        f_max = torch.where(rmax > t + a, up, 1.0 / up).to(dev, torch.float32)
        f_min = torch.where(rmin < t - a, 1.0 / up, up).to(dev, torch.float32)
        self.lam_global.mul_(f_global).clamp_(*self.lam_global_range)
        self.lam_max.mul_(f_max).clamp_(*self.lam_max_range)
        self.lam_min.mul_(f_min).clamp_(*self.lam_min_range)
        self.num_steps.add_(1)
        self.last_stats.update({"bits-mean-global": mean.float(), "bits-min-global": rmin.float(), "bits-max-global": rmax.float()})
        return True

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
