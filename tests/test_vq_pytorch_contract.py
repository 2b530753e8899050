"""Code written for vector-quantize-pytorch's VectorQuantize runs with GaussianQuantize (issue #12 item 5).

Against the real package (1.32.0): its constructor vocabulary, forward(mask=, lens=,
return_loss_breakdown=, freeze_codebook=), projections, Sequential registration in either import
order, the per-element TDC loss scale, and the README examples with GaussianQuantize substituted.
"""

import inspect
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

vqp = pytest.importorskip("vector_quantize_pytorch")
from vector_quantize_pytorch import VectorQuantize  # noqa: E402

from gq_plugin.adapters import GaussianQuantize  # noqa: E402
from gq_plugin.adapters.vq_pytorch import IGNORED_OPTIONS, LossBreakdown  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _post(*lead, dim, logvar=-2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(*lead, dim, generator=g), torch.full((*lead, dim), logvar)], -1)


def test_whole_constructor_vocabulary_is_accepted_with_one_warning():
    params = inspect.signature(VectorQuantize.__init__).parameters
    kwargs = {n: p.default for n, p in params.items() if n not in ("self", "dim", "codebook_size")}
    assert len(kwargs) >= 40  # the real vocabulary, not a hand-picked subset
    kwargs["codebook_dim"] = None
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gq = GaussianQuantize(dim=8, codebook_size=16, **kwargs)
    ours = [w for w in rec if "GaussianQuantize ignores" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in rec]
    msg = str(ours[0].message)
    for name in ("decay", "kmeans_init", "threshold_ema_dead_code", "use_cosine_sim", "rotation_trick", "orthogonal_reg_weight"):
        assert name in msg
    for meaningful in ("commitment_weight", "accept_3d_fmap", "freeze_codebook", "channel_last", "heads"):
        assert f" {meaningful}" not in msg.split(":", 1)[1]
    assert gq.dim == 8 and not gq.has_projections
    # everything VectorQuantize takes, GaussianQuantize takes (or knows to ignore)
    own = set(inspect.signature(GaussianQuantize.__init__).parameters)
    assert set(kwargs) <= own | set(IGNORED_OPTIONS)
    with pytest.raises(TypeError):
        GaussianQuantize(dim=8, codebook_size=16, decayy=0.9)  # typos still fail


def test_issue_examples_no_longer_raise():
    with pytest.warns(UserWarning, match="decay, kmeans_init, threshold_ema_dead_code, use_cosine_sim"):
        GaussianQuantize(dim=8, codebook_size=16, decay=0.9, kmeans_init=True, threshold_ema_dead_code=2, use_cosine_sim=True,
                         commitment_weight=0.5, accept_3d_fmap=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # meaningful options only: no warning at all
        GaussianQuantize(dim=8, codebook_size=16, commitment_weight=0.25, freeze_codebook=True, accept_image_fmap=True)


@pytest.mark.parametrize("train", [False, True])
def test_mask_and_lens_as_vector_quantize(train):
    torch.manual_seed(0)
    vq = VectorQuantize(dim=8, codebook_size=32).train(train)
    gq = GaussianQuantize(dim=8, codebook_size=32, heads=2, codebook_dim=4).train(train)
    gq1 = GaussianQuantize(dim=8, codebook_size=32).train(train)
    mask = torch.tensor([[True] * 7 + [False] * 3, [True] * 10])
    lens = torch.tensor([7, 10])
    qv, iv, _ = vq(torch.randn(2, 10, 8), mask=mask)
    x = _post(2, 10, dim=8)
    q1, i1, _ = gq1(x, mask=mask)
    assert i1.shape == iv.shape == (2, 10) and torch.equal(i1 == -1, iv == -1) and q1.shape == qv.shape
    q, idx, loss = gq(x, mask=mask)
    assert idx.shape == (2, 10, 2) and bool((idx[0, 7:] == -1).all()) and bool((idx[:, :7] >= 0).all()) and bool((idx[1] >= 0).all())
    assert float(q[0, 7:].abs().max()) == 0.0  # return_zeros_for_masked_padding
    _, idx2, _ = gq(x, lens=lens)
    assert torch.equal(idx, idx2)
    if not train:
        assert float(loss) == 0.0
        # unmasked positions equal an unmasked call
        q_all, idx_all, _ = gq(x)
        assert torch.equal(idx[mask], idx_all[mask]) and torch.equal(q[mask], q_all[mask])
    keep_mean = GaussianQuantize(dim=8, codebook_size=32, return_zeros_for_masked_padding=False).eval()
    qk, _, _ = keep_mean(x, mask=mask)
    assert torch.equal(qk[0, 7:], x[0, 7:, :8])
    with pytest.raises(ValueError, match="mask or lens"):
        gq(x, mask=mask, lens=lens)
    with pytest.raises(ValueError, match="sequences"):
        GaussianQuantize(dim=8, codebook_size=32, accept_image_fmap=True)(torch.randn(1, 16, 2, 2), mask=torch.ones(1, 4, dtype=torch.bool))


def test_masked_positions_are_left_out_of_the_tdc_statistics_and_loss():
    gq = GaussianQuantize(dim=4, codebook_size=16, tdc_auto_step=False, tdc_rule="reference").train()
    x = _post(1, 6, dim=4, logvar=-1.0)
    x[0, 4:, :4] = 50.0  # padding with absurd rates
    mask = torch.tensor([[True] * 4 + [False] * 2])
    _, _, loss, bd = gq(x, mask=mask, return_loss_breakdown=True)
    ref = gq.rates(x[:, :4])  # the same quantizer on the unpadded tokens only
    assert math.isclose(float(bd.bits_max), float(ref.max()), rel_tol=1e-5)
    assert math.isclose(float(bd.bits_mean), float(ref.mean()), rel_tol=1e-5)
    w = gq.tdc.weights(ref)
    assert math.isclose(float(loss), float((w * ref).mean()) / 4, rel_tol=1e-5)  # per latent element (m = 4)
    gq.tdc_step()
    stats = gq.tdc.last_stats
    assert math.isclose(float(stats["bits-max-global"]), float(ref.max()), rel_tol=1e-5)


def test_return_loss_breakdown_is_a_named_tuple():
    vq = VectorQuantize(dim=8, codebook_size=32).train()
    *_, vbd = vq(torch.randn(2, 5, 8), return_loss_breakdown=True)
    gq = GaussianQuantize(dim=8, codebook_size=32, commitment_weight=0.5).train()
    q, idx, loss, bd = gq(_post(2, 5, dim=8), return_loss_breakdown=True)
    assert q.shape == (2, 5, 8) and idx.shape == (2, 5)
    assert isinstance(bd, LossBreakdown) and isinstance(bd, tuple)
    assert set(vbd._fields) <= set(bd._fields)  # VectorQuantize's fields all present
    torch.testing.assert_close(loss, 0.5 * bd.commitment)
    assert bd.commitment is bd.tdc and float(bd.orthogonal_reg) == 0.0 and float(bd.codebook_diversity) == 0.0
    assert float(bd.bits_min) <= float(bd.bits_mean) <= float(bd.bits_max)


def test_freeze_codebook_and_ignored_forward_options():
    gq = GaussianQuantize(dim=4, codebook_size=16, freeze_codebook=True).train()
    cb = gq.codebook.clone()
    x = _post(2, 3, dim=4)
    gq(x, freeze_codebook=True)
    gq(x, freeze_codebook=False)
    assert torch.equal(gq.codebook, cb) and gq.freeze_codebook
    with pytest.warns(UserWarning, match="ema_update_weight"):
        gq(x, ema_update_weight=torch.ones(2))
    with pytest.raises(ValueError, match="indices"):
        gq(x, indices=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="topk"):
        gq(x, topk=2)


def test_projection_attributes_present():
    for kw in ({}, {"codebook_dim": 4}):
        vq, gq = VectorQuantize(dim=8, codebook_size=16, **kw), GaussianQuantize(dim=8, codebook_size=16, **kw)
        assert gq.has_projections == vq.has_projections
        assert isinstance(gq.project_in, nn.Module) and isinstance(gq.project_out, nn.Module)
        assert isinstance(gq.project_in, nn.Identity) == isinstance(vq.project_in, nn.Identity)
    gq = GaussianQuantize(dim=8, codebook_size=16, codebook_dim=4, layernorm_after_project_in=True)
    assert isinstance(gq.project_in[1], nn.LayerNorm)
    # trainable through the projection
    gq.train()
    x = _post(2, 3, dim=8).requires_grad_()
    q, _, loss = gq(x)
    (q.square().mean() + loss).backward()
    assert gq.project_in[0].weight.grad is not None and gq.project_out.weight.grad is not None and x.grad is not None


def test_accept_3d_fmap():
    vq = VectorQuantize(dim=8, codebook_size=32, accept_3d_fmap=True).eval()
    gq = GaussianQuantize(dim=8, codebook_size=32, accept_3d_fmap=True).eval()
    qv, iv, _ = vq(torch.randn(2, 8, 3, 4, 5))
    x = torch.randn(2, 16, 3, 4, 5)
    q, idx, _ = gq(x)
    assert q.shape == qv.shape == (2, 8, 3, 4, 5) and idx.shape == iv.shape == (2, 3, 4, 5)
    assert torch.equal(gq.get_output_from_indices(idx), q)
    # the same tokens as the sequence layout
    seq = GaussianQuantize(dim=8, codebook_size=32).eval()
    _, idx_seq, _ = seq(x.flatten(2).transpose(1, 2))
    assert torch.equal(idx.flatten(1), idx_seq)


@pytest.mark.parametrize("first", ["gq_plugin", "vector_quantize_pytorch"])
def test_sequential_registration_independent_of_import_order(first):
    second = "vector_quantize_pytorch" if first == "gq_plugin" else "gq_plugin"
    imports = {"gq_plugin": "from gq_plugin.adapters import GaussianQuantize",
               "vector_quantize_pytorch": "from vector_quantize_pytorch import Sequential"}
    code = "\n".join([
        "import torch",
        imports[first],
        "gq = GaussianQuantize(dim=8, codebook_size=32)" if first == "gq_plugin" else "",
        imports[second],
        "gq = GaussianQuantize(dim=8, codebook_size=32)" if first != "gq_plugin" else "",
        "seq = Sequential(torch.nn.Linear(4, 16), gq, torch.nn.Linear(8, 4)).eval()",
        "out, idx, loss = seq(torch.randn(2, 5, 4))",
        "assert out.shape == (2, 5, 4) and idx.shape == (2, 5), (out.shape, idx.shape)",
        "print('ok')",
    ])
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_loss_is_normalised_per_element():
    """The training loss does not grow with tokens, batch or groups: bits per latent element."""
    torch.manual_seed(0)
    vals = {}
    for b, n, heads in ((1, 16, 1), (4, 256, 1), (4, 256, 4)):
        gq = GaussianQuantize(dim=16, codebook_size=2**8, heads=heads, codebook_dim=16 // heads, tdc_auto_step=False, tdc_rule="reference").train()
        x = _post(b, n, dim=16, logvar=-2.0)
        _, _, loss = gq(x)
        rates = gq.rates(x)  # (b, n, heads) bits
        torch.testing.assert_close(loss, (gq.tdc.weights(rates) * rates).mean() / (16 // heads))  # lam = 1 before any step
        vals[(b, n, heads)] = float(loss.detach())
    assert 0.5 < vals[(4, 256, 1)] / vals[(1, 16, 1)] < 2.0  # 64x more tokens: same scale (a sum: 64x)
    assert 0.5 < vals[(4, 256, 4)] / vals[(4, 256, 1)] < 2.0  # 4 groups: same scale
