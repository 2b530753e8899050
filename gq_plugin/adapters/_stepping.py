"""Move the TDC multipliers once per autoencoder optimizer step inside a host's own training loop.

Host loops (ldm's and taming's ``training_step(batch, batch_idx, optimizer_idx)`` under
Lightning, sgm's manual optimisation, diffusers-style scripts) run the autoencoder forward on
discriminator passes too, and ldm's loss evaluates ``posteriors.kl()`` on both passes, so a
constraint that steps on every training forward (``auto_step=True``) moves twice per
autoencoder step. :func:`step_on_optimizer` replaces that rule, without touching the loop:

* a TDC loss that is **backpropagated** arms its constraint (a gradient hook on the loss);
* the next ``torch.optim.Optimizer.step`` (torch's global step post-hook) applies one update
  from the statistics of the armed passes, then disarms it;
* a pass whose TDC loss carries no gradient -- a discriminator pass (Lightning freezes the
  autoencoder's parameters there: ``toggle_optimizer`` / ``toggle_model``), validation,
  ``torch.no_grad`` -- leaves neither a step nor statistics behind.

So the multipliers move once per optimizer step that follows a backward pass through the TDC
loss (once per autoencoder step; with gradient accumulation, once per accumulated step), and a
discriminator step alone never moves them. Under ``torch.distributed`` every rank steps its
optimizers, so every rank updates (and all-reduces) together.
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_ARMED: weakref.WeakSet = weakref.WeakSet()  # constraints backpropagated since their last step
_HOOK = None
_FLAG = "_gq_step_on_optimizer"
_BEFORE = "_gq_pending_before_forward"


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    for tdc in list(_ARMED):
        _ARMED.discard(tdc)
        tdc.step()


def _ensure_hook() -> None:
    global _HOOK
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_after_optimizer_step)


def _arm(tdc) -> None:
    _ARMED.add(tdc)


def _before_forward(tdc, args) -> None:
    tdc.__dict__[_BEFORE] = tdc._pending


def _after_forward(tdc, args, out) -> None:
    before = tdc.__dict__.pop(_BEFORE, None)
    if not (tdc.training and isinstance(out, torch.Tensor) and out.requires_grad):
        tdc._pending = before  # a pass that cannot train the encoder: drop its statistics
        return
    _ensure_hook()  # also after unpickling in another process
    out.register_hook(lambda grad, tdc=tdc: _arm(tdc))


def step_on_optimizer(tdc) -> None:
    """Make ``tdc`` (a :class:`~gq_plugin.tdc.TargetDivergenceConstraint`) step once per optimizer
    step that follows a backward pass through its loss (see the module docstring). Idempotent."""
    if tdc.__dict__.get(_FLAG):
        return
    tdc.auto_step = False
    tdc.register_forward_pre_hook(_before_forward)
    tdc.register_forward_hook(_after_forward)
    tdc.__dict__[_FLAG] = True
    _ensure_hook()


def steps_on_optimizer(tdc) -> bool:
    """True if :func:`step_on_optimizer` was applied to ``tdc``."""
    return bool(tdc.__dict__.get(_FLAG))


def configure(quantizer, gq_kwargs: dict) -> None:
    """Host adapters' default: step on the optimizer unless the caller chose ``tdc_auto_step``
    (``True``: every training forward; ``False``: call ``tdc_step()`` yourself)."""
    if "tdc_auto_step" not in gq_kwargs:
        step_on_optimizer(quantizer.tdc)
