"""GroupARHead: a proper distribution over G K-way codes (full and factorised output), trainable, samples."""

import math

import pytest
import torch

from gq_plugin.adapters._ar_head import GroupARHead


@pytest.mark.parametrize("K,factorize_above", [(10, 4096), (10, 4), (16, 4), (64, 8)])
def test_probabilities_sum_to_one_over_all_codes(K, factorize_above):
    torch.manual_seed(0)
    head = GroupARHead(6, 2, K, width=16, depth=1, num_heads=2, factorize_above=factorize_above).eval()
    assert head.factorized == (K > factorize_above)
    cond = torch.randn(1, 6).expand(K * K, 6)
    grid = torch.stack(torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        nll = head.nll(cond, grid).sum(1)  # -log p(k1, k2)
    assert math.isclose(float(torch.exp(-nll.double()).sum()), 1.0, rel_tol=1e-4)


def test_group_order_is_respected_and_inverted():
    torch.manual_seed(0)
    order = [2, 0, 1]
    head = GroupARHead(4, 3, 8, width=16, depth=1, num_heads=2, group_order=order).eval()
    cond, t = torch.randn(5, 4), torch.randint(0, 8, (5, 3))
    nll = head.nll(cond, t)
    # group 2 is predicted first: its nll does not depend on groups 0 and 1
    t2 = t.clone()
    t2[:, 0] = (t2[:, 0] + 1) % 8
    t2[:, 1] = (t2[:, 1] + 3) % 8
    nll2 = head.nll(cond, t2)
    torch.testing.assert_close(nll[:, 2], nll2[:, 2])
    assert not torch.allclose(nll[:, 1], nll2[:, 1])
    with pytest.raises(ValueError, match="permutation"):
        GroupARHead(4, 3, 8, group_order=[0, 0, 1])


@pytest.mark.parametrize("K,factorize_above", [(16, 4096), (2**12, 256)])
def test_learns_a_conditional_code_and_samples_it(K, factorize_above):
    torch.manual_seed(0)
    head = GroupARHead(4, 3, K, width=32, depth=1, num_heads=2, factorize_above=factorize_above)
    cond = torch.eye(4)[:2]
    target = torch.tensor([[3, 7, K - 1], [K - 2, 0, 5]])
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    first = None
    for _ in range(60):
        loss = head.loss(cond, target)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * first
    head.eval()
    assert torch.equal(head.sample(cond, temperature=0), target)
    s = head.sample(cond.repeat(50, 1), temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert s.shape == (100, 3) and s.dtype == torch.int64 and int(s.min()) >= 0 and int(s.max()) < K


def test_bad_inputs():
    head = GroupARHead(4, 2, 8, width=8, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="cond"):
        head.nll(torch.randn(3, 5), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must lie"):
        head.nll(torch.randn(3, 4), torch.full((3, 2), 8))
    with pytest.raises(ValueError, match="temperature"):
        head.sample(torch.randn(1, 4), temperature=-1)
