"""TDC warns once when its global multiplier sits at a clamp for ``clamp_patience`` steps."""

import warnings

import pytest
import torch

from gq_plugin.tdc import TargetDivergenceConstraint


def _run(tdc, rate, steps):
    """``steps`` updates with every group at ``rate`` bits; returns the steps (1-based) that warned."""
    warned = []
    for i in range(1, steps + 1):
        tdc(torch.full((2, 3), rate))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tdc.step()
        hits = [w for w in caught if issubclass(w.category, RuntimeWarning) and "clamp" in str(w.message)]
        warned += [(i, str(w.message)) for w in hits]
    return warned


def test_warns_once_when_the_global_multiplier_sits_at_its_upper_clamp():
    # rates 2 bits above the target: lam_global grows by 1 % a step and reaches 1.05 at step 5
    tdc = TargetDivergenceConstraint(4.0, eps=0.01, lam_global_range=(1e-3, 1.05), auto_step=False, clamp_patience=10)
    warned = _run(tdc, 6.0, 60)
    assert float(tdc.lam_global) == pytest.approx(1.05)
    # at clamp from step 5 on; checked every 10 steps: step 10 has a run of 6, step 20 a run of 16
    assert [i for i, _ in warned] == [20]
    msg = warned[0][1]
    assert "upper clamp for 16 consecutive steps" in msg and "kl_weight" in msg and "lam=1.05" in msg


def test_lower_clamp_and_no_warning_while_the_multiplier_moves():
    tdc = TargetDivergenceConstraint(4.0, eps=0.01, lam_global_range=(0.95, 1e3), auto_step=False, clamp_patience=10, rule="reference")
    warned = _run(tdc, 1.0, 30)
    assert [i for i, _ in warned] == [20] and "lower clamp" in warned[0][1]
    # the band rule: a mean rate below the target at the weakest lam is its normal state (the lift acts)
    band = TargetDivergenceConstraint(4.0, eps=0.01, lam_global_range=(0.95, 1e3), auto_step=False, clamp_patience=10)
    assert _run(band, 1.0, 30) == [] and float(band.lam_global) == pytest.approx(0.95)
    # alternating above / below the target: lam_global never reaches a clamp
    tdc = TargetDivergenceConstraint(4.0, auto_step=False, clamp_patience=5)
    warned = []
    for i in range(40):
        warned += _run(tdc, 6.0 if i % 2 else 2.0, 1)
    assert warned == [] and int(tdc._steps_at_clamp) == 0


def test_a_step_away_from_the_clamp_resets_the_run_and_zero_disables():
    tdc = TargetDivergenceConstraint(4.0, eps=0.01, lam_global_range=(1e-3, 1.05), auto_step=False, clamp_patience=10)
    assert _run(tdc, 6.0, 12) == [] and int(tdc._steps_at_clamp) == 8
    _run(tdc, 2.0, 1)  # one step below the target moves lam_global off the clamp
    assert int(tdc._steps_at_clamp) == 0
    off = TargetDivergenceConstraint(4.0, lam_global_range=(1e-3, 1.05), auto_step=False, clamp_patience=0)
    assert _run(off, 6.0, 50) == []
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="clamp_patience"):
            TargetDivergenceConstraint(4.0, clamp_patience=bad)
