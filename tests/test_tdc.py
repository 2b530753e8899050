import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _gloo import finish_worker

from gq_plugin.rate import group_rates
from gq_plugin.tdc import TargetDivergenceConstraint


def test_loss_matches_definition():
    tdc = TargetDivergenceConstraint(target_bits=4.0, tolerance=0.5)
    tdc.lam_global.fill_(2.0)
    tdc.lam_max.fill_(10.0)
    tdc.lam_min.fill_(0.1)
    rates = torch.tensor([[[5.0, 4.2], [3.0, 4.5]], [[4.6, 1.0], [3.5, 4.0]]], requires_grad=True)
    w = torch.tensor([[[10.0, 1.0], [0.1, 1.0]], [[10.0, 0.1], [1.0, 1.0]]])
    expected = 2.0 * (w * rates).sum(dim=(1, 2)).mean()
    loss = tdc.loss(rates)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(rates.grad, 2.0 * w / 2)


def test_update_rule_and_clamps():
    tdc = TargetDivergenceConstraint(target_bits=4.0, tolerance=0.5, eps=0.01, auto_step=False)
    tdc.accumulate(torch.tensor([5.0, 4.6, 4.4]))  # mean above target, max above band, min inside
    assert tdc.step()
    up = 1.01
    assert tdc.lam_global.item() == pytest.approx(up)
    assert tdc.lam_max.item() == pytest.approx(up)
    assert tdc.lam_min.item() == pytest.approx(1.0)  # wanted to grow, clamped at 1
    tdc.accumulate(torch.tensor([3.0, 3.2, 4.0]))  # mean below, max inside band, min below
    tdc.step()
    assert tdc.lam_global.item() == pytest.approx(1.0)
    assert tdc.lam_max.item() == pytest.approx(1.0)  # decays again (the authors' code could not)
    assert tdc.lam_min.item() == pytest.approx(1 / up)
    assert tdc.num_steps.item() == 2
    assert not tdc.step()  # nothing accumulated: no move
    for _ in range(2000):
        tdc.accumulate(torch.tensor([100.0, 0.0]))
        tdc.step()
    assert tdc.lam_max.item() == pytest.approx(1000.0)
    assert tdc.lam_min.item() == pytest.approx(1e-3)
    assert tdc.lam_global.item() == pytest.approx(1e3)


def test_accumulated_batches_are_pooled_into_one_step():
    a = TargetDivergenceConstraint(4.0, auto_step=False)
    b = TargetDivergenceConstraint(4.0, auto_step=False)
    x, y = torch.tensor([1.0, 9.0]), torch.tensor([2.0, 2.0, 2.0])
    a.accumulate(x)
    a.accumulate(y)
    a.step()
    b.accumulate(torch.cat([x, y]))
    b.step()
    assert a.last_stats["bits-mean-global"] == b.last_stats["bits-mean-global"] == pytest.approx(16 / 5)
    assert torch.equal(a.lam_global, b.lam_global) and torch.equal(a.lam_max, b.lam_max)


def test_auto_step_only_moves_on_grad_enabled_training_forwards():
    tdc = TargetDivergenceConstraint(4.0, auto_step=True)
    r = torch.full((2, 3), 9.0)
    with torch.no_grad():
        tdc(r)  # e.g. a discriminator pass under no_grad
    assert tdc.num_steps.item() == 0
    tdc(r)
    assert tdc.num_steps.item() == 1
    tdc.eval()
    tdc(r)
    assert tdc.num_steps.item() == 1


def test_multipliers_survive_state_dict_round_trip():
    tdc = TargetDivergenceConstraint(4.0)
    for _ in range(37):
        tdc(torch.full((2, 3), 9.0))
    fresh = TargetDivergenceConstraint(4.0)
    fresh.load_state_dict(tdc.state_dict())
    for name in ("lam_global", "lam_max", "lam_min", "num_steps"):
        assert torch.equal(getattr(fresh, name), getattr(tdc, name)), name
    assert fresh.lam_global.item() == pytest.approx(1.01**37)


def _fit_toy(tdc, steps=4000, seed=0):
    """Free posteriors (32 tokens x 4 groups x 4 channels) under a distortion whose weight
    differs 1000x between groups, plus the constraint; Adam with linearly decaying LR."""
    torch.manual_seed(seed)
    groups, m, tokens = 4, 4, 32
    x = torch.randn(tokens, groups, m)
    demand = torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(1, groups, 1)
    mu = torch.zeros(tokens, groups, m, requires_grad=True)
    logvar = torch.zeros(tokens, groups, m, requires_grad=True)
    opt = torch.optim.Adam([mu, logvar], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(steps):
        distortion = (demand * ((x - mu).square() + logvar.exp())).sum() / (2 * math.log(2))
        rates = group_rates(mu.flatten(1), logvar.flatten(1), m).unsqueeze(0)  # (1, tokens, G)
        loss = distortion + tdc(rates)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return group_rates(mu.detach().flatten(1), logvar.detach().flatten(1), m)


# The piecewise weights make the band edges sliding surfaces: rates settle *on* the edges,
# up to the optimiser's last steps (measured < 0.03 bits).
EDGE_SLACK = 0.05


@pytest.fixture
def one_thread():
    """8000 tiny steps: one thread avoids OpenMP spin-wait stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tdc_pushes_rates_into_band_on_toy_problem(one_thread):
    target, alpha = 8.0, 0.5
    tdc = TargetDivergenceConstraint(target_bits=target, tolerance=alpha, eps=0.02)
    final = _fit_toy(tdc)
    assert final.min() >= target - alpha - EDGE_SLACK, final.min()
    assert final.max() <= target + alpha + EDGE_SLACK, final.max()
    assert tdc.lam_max.item() > 1.0 and tdc.lam_min.item() < 1.0
    # Control: the same problem with only the global (mean) multiplier, i.e. a KL weight tuned
    # to the same mean rate, leaves the groups far outside the band.
    mean_only = TargetDivergenceConstraint(target, alpha, eps=0.02, lam_max_range=(1.0, 1.0), lam_min_range=(1.0, 1.0))
    spread = _fit_toy(mean_only)
    assert abs(spread.mean().item() - target) < 0.5
    assert spread.min() < target - 3 and spread.max() > target + 3, (spread.min(), spread.max())


def _dist_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(1234 + rank)
    tdc = TargetDivergenceConstraint(target_bits=6.0, auto_step=True)
    for step in range(40):
        # ranks see different data: rank 1's rates are much higher
        rates = torch.rand(3, 5) * (4 + 8 * rank) + step * 0.05
        tdc(rates)
    gathered = [torch.zeros(3) for _ in range(world)]
    dist.all_gather(gathered, torch.stack([tdc.lam_global, tdc.lam_max, tdc.lam_min]))
    if rank == 0:
        torch.save(torch.stack(gathered), out_file)
    finish_worker()


def test_two_process_gloo_ranks_end_with_identical_multipliers():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "lams.pt")
        mp.spawn(_dist_worker, args=(2, os.path.join(d, "init"), out), nprocs=2, join=True)
        lams = torch.load(out)
    assert torch.equal(lams[0], lams[1])
    # and they equal one process that sees both ranks' batches pooled
    single = TargetDivergenceConstraint(target_bits=6.0, auto_step=False)
    gens = [torch.manual_seed(1234 + r) and torch.Generator().manual_seed(1234 + r) for r in range(2)]
    for step in range(40):
        for r in range(2):
            single.accumulate(torch.rand(3, 5, generator=gens[r]) * (4 + 8 * r) + step * 0.05)
        single.step()
    torch.testing.assert_close(lams[0], torch.stack([single.lam_global, single.lam_max, single.lam_min]))
    assert not torch.equal(lams[0], torch.ones(3))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(target_bits=0.0), "target_bits"),
        (dict(target_bits=4.0, tolerance=-1.0), "tolerance"),
        (dict(target_bits=4.0, eps=0.0), "eps"),
        (dict(target_bits=4.0, lam_max_range=(2.0, 1.0)), "lam_max_range"),
    ],
)
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        TargetDivergenceConstraint(**kwargs)
