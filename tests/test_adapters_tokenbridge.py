"""TokenBridge baseline numerics (vs an independent scipy computation) and the GQ swap."""

import math

import pytest
import torch
from _adapter_standins import TokenBridgeStandin

from gq_plugin import adapters
from gq_plugin.lab.baselines import TokenBridgeQuantizer, tokenbridge_tables


def test_tables_match_scipy_truncated_normal_means():
    scipy_stats = pytest.importorskip("scipy.stats")
    import numpy as np

    edges, centres = tokenbridge_tables(6, 3.0)
    assert edges.shape == (65,) and centres.shape == (64,)
    ref_edges = np.clip(scipy_stats.norm.ppf(np.linspace(0, 1, 65)), -3, 3)
    ref_centres = np.array([scipy_stats.truncnorm.mean(a, b) for a, b in zip(ref_edges[:-1], ref_edges[1:], strict=True)])
    np.testing.assert_allclose(edges.numpy(), ref_edges, atol=1e-9)
    np.testing.assert_allclose(centres.numpy(), ref_centres, atol=1e-9)


def test_quantize_numerics():
    q = TokenBridgeQuantizer(bits=6)
    assert q.quant_levels == 64 and q.reconstruction_values.shape == (64,) and q.boundaries.shape == (65,)
    v = q.values()
    assert abs(float(v.max()) - 4.06) < 0.01 and torch.all(v[1:] > v[:-1])  # +-4.06 latent units, sorted
    x = torch.randn(4, 256, 16)
    idx, deq = q.quantize(x)
    assert idx.shape == x.shape and idx.dtype == torch.int64 and deq.shape == x.shape
    # nearest reconstruction value, as TokenBridge's argmin
    xn = q.to_normalized(x).clamp(-3, 3)
    ref = (xn.unsqueeze(-1) - q.reconstruction_values).abs().argmin(-1)
    assert torch.equal(idx, ref)
    mse = float(((deq - x) ** 2).mean())
    assert mse < 1.5e-3  # ~6.6e-4 on N(0, 1)
    assert torch.equal(q.dequantize(idx), deq)


def test_swap_like_for_like_m1():
    torch.manual_seed(0)
    model = TokenBridgeStandin()
    original_values = model.reconstruction_values.clone()
    adapters.swap_tokenbridge_quantizer(model)  # K = quant_levels = 64, m = 1
    q = model.gq_quantizer
    assert q.codebook_size == 64 and q.codebook_dim == 1
    mean, logvar = torch.randn(2, 16, 4, 4) * 2, torch.full((2, 16, 4, 4), -3.0)
    imgs = adapters.tokenbridge_gq_inputs(mean=mean, logvar=logvar)
    assert imgs.shape == (2, 32, 4, 4)
    values, tokens = model.training_targets(imgs)  # unchanged TokenBridge.forward lines
    assert values.shape == (2, 16, 16) and tokens.shape == (2, 16, 16)
    idx, deq = model.quantize(model.patchify(imgs))
    # GQ on the raw posterior, values in TokenBridge's normalised units
    raw_idx = q.encode_indices(model.patchify(mean), model.patchify(logvar))
    assert torch.equal(idx, raw_idx)
    torch.testing.assert_close(deq, q.dequant(idx) * 0.2325)
    # the unchanged reconstruction_values[tokens] + rescale lookup now returns the GQ codewords
    torch.testing.assert_close(model.lookup(idx), deq, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.dequantize_tokens(idx), deq)
    with pytest.raises(ValueError, match="posterior"):
        model.quantize(torch.randn(2, 16, 16))
    adapters.unpatch(model)
    assert torch.equal(model.reconstruction_values, original_values) and not hasattr(model, "gq_quantizer")
    i0, _ = model.quantize(torch.randn(2, 16, 16))
    assert i0.shape == (2, 16, 16)


def test_swap_grouped_m4_and_given_quantizer():
    from _tokenbridge_standin import TokenBridgeMini

    from gq_plugin import GaussianQuantizer

    model = TokenBridgeMini()
    adapters.swap_tokenbridge_quantizer(model, gq=GaussianQuantizer(16, 2**12, 4))  # the AR head is rebuilt: no warning
    x = torch.cat([torch.randn(2, 16, 16), torch.full((2, 16, 16), -2.0)], -1)
    idx, deq = model.quantize(x)
    assert idx.shape == (2, 16, 4) and deq.shape == (2, 16, 16)
    assert torch.equal(model.dequantize_tokens(idx), deq)
    assert math.isclose(model.gq_quantizer.bits_per_token, 48.0)
    assert model.gq_ar_head.num_groups == 4 and model.gq_ar_head.codebook_size == 2**12
