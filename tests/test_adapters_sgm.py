"""sgm (generative-models) adapter: AbstractRegularizer-style GaussianQuantRegularizer.

``sgm`` is not pip-installable; the tests check the contract ``AutoencodingEngine``,
``GeneralLPIPSWithDiscriminator`` (``regularization_weights``) and ``AEIntegerWrapper`` rely on.
"""

import pytest
import torch

from gq_plugin.adapters import GaussianQuantRegularizer
from gq_plugin.adapters.sgm import HAS_SGM

rearrange = pytest.importorskip("einops").rearrange  # sgm's AEIntegerWrapper uses einops


def test_train_log_and_loss_weighting():
    reg = GaussianQuantRegularizer(dim=8, codebook_size=256).train()
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    out, log = reg(z)
    assert out.shape == (2, 8, 4, 4)
    for k in ("kl_loss", "bits-mean", "bits-min", "bits-max", "lam", "lam-max", "lam-min"):
        assert k in log, k
    # GeneralLPIPSWithDiscriminator: loss += w_k * log[k] for k in regularization_weights
    weights = {"kl_loss": 0.1}
    loss = sum(w * log[k] for k, w in weights.items() if k in log)
    loss.backward()
    assert z.grad is not None
    assert list(reg.get_trainable_parameters()) == []
    assert HAS_SGM in (True, False)


def test_eval_indices_and_aeintegerwrapper_roundtrip():
    reg = GaussianQuantRegularizer(dim=8, codebook_size=256, grouping="strided").eval()
    z = torch.randn(2, 16, 4, 4)
    zq, log = reg(z)
    idx = log["min_encoding_indices"]
    assert idx.shape == (2, 4, 4) and idx.dtype == torch.int64
    assert float(log["kl_loss"]) == 0 and "perplexity" in log and log["zhat_noquant"].shape == zq.shape
    # AEIntegerWrapper.encode / decode
    flat = rearrange(idx, "b ... -> b (...)")
    inds = rearrange(flat, "b (h w) -> b h w", h=4, w=4)
    h = rearrange(reg.get_codebook_entry(inds), "b h w c -> b c h w")
    assert torch.equal(h, zq)
    # quantizer-style shape argument
    assert torch.equal(reg.get_codebook_entry(idx.reshape(-1), (2, 4, 4, 8)), zq)


def test_several_codebooks():
    reg = GaussianQuantRegularizer(dim=8, codebook_size=64, codebook_dim=2).eval()
    zq, log = reg(torch.randn(2, 16, 3, 3))
    idx = log["min_encoding_indices"]
    assert idx.shape == (2, 3, 3, 4)
    assert torch.equal(reg.dequant(idx), zq)
    assert torch.equal(rearrange(reg.get_codebook_entry(idx), "b h w c -> b c h w"), zq)
