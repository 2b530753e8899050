"""Learning-rate schedules of the lab's training loop (``optim.lr_schedule`` in a recipe).

The LR is a pure function of the optimizer step, so a resumed run continues on the same curve
without any scheduler state in the checkpoint.

* ``constant``: ``lr`` at every step (the default).
* ``cosine``: half a cosine from ``lr`` at step 0 to ``lr * lr_final_frac`` at the last step
  (``train.steps``). A short run that stops at a constant LR ends wherever the last few noisy
  Adam steps left it; decaying the LR lets the weights settle, so two runs that differ in one
  setting can be compared by their final checkpoints (issue #13: tiny_cpu's 600 steps).
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def check_schedule(name: str, final_frac: float) -> None:
    """``ValueError`` naming the bad setting."""
    if name not in SCHEDULES:
        raise ValueError(f"optim.lr_schedule must be one of {SCHEDULES}, got {name!r}")
    if isinstance(final_frac, bool) or not isinstance(final_frac, (int, float)) or not 0.0 <= final_frac <= 1.0:
        raise ValueError(f"optim.lr_final_frac must be a number in [0, 1], got {final_frac!r}")


def lr_at(step: int, steps: int, lr: float, schedule: str = "constant", final_frac: float = 0.1) -> float:
    """The learning rate for the optimizer step that takes the model from ``step`` to ``step + 1``."""
    check_schedule(schedule, final_frac)
    if schedule == "constant" or steps <= 1:
        return float(lr)
    t = min(max(step, 0), steps - 1) / (steps - 1)  # 0 at the first step, 1 at the last
    return float(lr) * (final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * t)))


def set_lr(optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group of ``optimizer``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
