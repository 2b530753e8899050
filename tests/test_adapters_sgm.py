"""sgm (Stability-AI/generative-models) adapter.

sgm is not on PyPI: tests/_hosts.py reproduces the contract of ``AutoencodingEngine`` (manual
optimisation ``training_step``), ``GeneralLPIPSWithDiscriminator`` (``regularization_weights``)
and ``AEIntegerWrapper`` at upstream commit 0ad7de9a5cb53fd63d6d30a4f385485e72e08597, and runs it
in the real Lightning 1.9.5 ``Trainer``.
"""

import einops
import pytest
import torch
from _hosts import (
    SGM_COMMIT,
    SgmEngine,
    SgmLoss,
    fit,
    sgm_integer_roundtrip,
    steps_between,
)
from einops import rearrange
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from torch import nn

from gq_plugin import adapters
from gq_plugin.adapters import GaussianQuantRegularizer
from gq_plugin.adapters.sgm import HAS_SGM
from gq_plugin.adapters.sgm import SGM_COMMIT as ADAPTER_COMMIT


class GaussianRegularizer(nn.Module):
    """sgm's ``DiagonalGaussianRegularizer`` contract: ``(sample, {"kl_loss": sum(kl) / B})``."""

    def get_trainable_parameters(self):
        yield from ()

    def forward(self, z):
        posterior = DiagonalGaussianDistribution(z)
        kl = posterior.kl()
        return posterior.sample(), {"kl_loss": kl.sum() / kl.shape[0]}


def _engine(regularization=None, weights=None):
    return SgmEngine(regularization if regularization is not None else GaussianRegularizer(),
                     SgmLoss(regularization_weights={"kl_loss": 1.0} if weights is None else weights))


def _images(n=2):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_same_upstream_commit_as_the_adapter():
    assert ADAPTER_COMMIT == SGM_COMMIT and HAS_SGM in (True, False)


def test_tdc_moves_once_per_autoencoder_step_in_sgms_training_step():
    """sgm trains one optimizer per ``training_step`` (``batch_idx % 2``) inside
    ``opt.toggle_model()``; the regularizer runs on the discriminator steps too, yet only the
    autoencoder steps move the multipliers."""
    torch.manual_seed(0)
    reg = GaussianQuantRegularizer(dim=4, codebook_size=64, codebook_dim=2)
    engine = _engine(reg)
    tdc = reg.gq.tdc
    log = fit(engine, tdc, batches=4, key="jpg", channel_last=False)
    assert steps_between(log, int(tdc.num_steps)) == [(0, 1), (1, 0)] * 2
    assert int(tdc.num_steps) == 2 and tdc._pending is None


def test_patch_reads_the_hosts_regularization_weight():
    torch.manual_seed(0)
    engine = _engine(weights={"kl_loss": 1e-6})
    old = engine.regularization
    adapters.patch(engine, "sgm", K=2**6, m=2, tdc_weight=0.5)
    reg = engine.regularization
    assert isinstance(reg, GaussianQuantRegularizer) and reg.gq.dim == 4 and reg.gq.codebook_dim == 2
    x = _images()
    for w in (1e-6, 1e-2, 3.0):
        engine.loss.regularization_weights["kl_loss"] = w
        _, log = engine.encode(x, return_reg_log=True)
        # GeneralLPIPSWithDiscriminator adds w * log["kl_loss"]: TDC at its intended weight 0.5
        torch.testing.assert_close(w * log["kl_loss"], 0.5 * log["tdc_loss"], rtol=1e-5, atol=0)
    del engine.loss.regularization_weights["kl_loss"]
    with pytest.raises(ValueError, match="no 'kl_loss' entry"):
        engine.encode(x)
    assert adapters.unpatch(engine) is reg and engine.regularization is old
    with pytest.raises(ValueError, match="no 'kl_loss' entry"):
        adapters.patch(_engine(weights={"other": 1.0}), "sgm", K=2**6)
    fixed = GaussianQuantRegularizer(dim=4, codebook_size=64, host_weight=0.1, tdc_weight=2.0)
    _, log = fixed(torch.randn(2, 8, 3, 3))
    torch.testing.assert_close(0.1 * log["kl_loss"], 2.0 * log["tdc_loss"], rtol=1e-5, atol=0)
    for bad in ({"host_weight": 0.0}, {"tdc_weight": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GaussianQuantRegularizer(dim=4, codebook_size=64, **bad)


@pytest.mark.parametrize("m", [4, 2, 1])
def test_aeintegerwrapper_roundtrip_with_g_sub_codebooks(m):
    """One int64 per latent position (mixed radix over the G = 4/m sub-codebooks), so
    ``AEIntegerWrapper(model, shape=(h, w))`` encodes and decodes for every G."""
    torch.manual_seed(0)
    engine = adapters.patch(_engine(), "sgm", K=2**6, m=m).eval()
    reg, g = engine.regularization, 4 // m
    x = _images()
    with torch.no_grad():
        z_hat, log = engine.encode(x, return_reg_log=True)
        inds, dec = sgm_integer_roundtrip(engine, x, shape=(4, 4))
    assert reg.index_layout == "position" and inds.shape == (2, 16) and inds.dtype == torch.int64
    assert int(inds.max()) < 64**g
    assert torch.equal(dec, engine.decode(z_hat))
    # the packed number is sum_g i_g * K**(G-1-g) of the core's per-group indices
    core = reg.gq.encode_indices(engine.encoder(x))  # (B, H, W, G)
    packed = sum(core[..., i] * 64 ** (g - 1 - i) for i in range(g))
    assert torch.equal(log["min_encoding_indices"], packed)
    # quantizer-style call with an explicit shape
    assert torch.equal(reg.get_codebook_entry(inds.reshape(-1), (2, 4, 4, 4)), z_hat)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, "):
        reg.get_codebook_entry(torch.full((1, 2, 2), 64**g))


def test_grouped_layout_when_the_packed_index_overflows_int64():
    torch.manual_seed(0)
    reg = GaussianQuantRegularizer(dim=4, codebook_size=2**16, codebook_dim=1)  # G = 4: K**G = 2**64
    assert reg.index_layout == "grouped"
    with pytest.raises(ValueError, match="index_layout='grouped'"):
        GaussianQuantRegularizer(dim=4, codebook_size=2**16, codebook_dim=1, index_layout="position")
    engine = _engine(reg).eval()
    x = _images()
    with torch.no_grad():
        z_hat = engine.encode(x)
        inds, dec = sgm_integer_roundtrip(engine, x, shape=(4, 4 * 4))  # G tokens per position
        assert inds.shape == (2, 4 * 4 * 4) and torch.equal(dec, engine.decode(z_hat))
        with pytest.raises(einops.EinopsError):  # the wrapper's (h, w) grid holds h*w tokens, not h*w*G
            sgm_integer_roundtrip(engine, x, shape=(4, 4))


def test_train_log_and_eval_log():
    reg = GaussianQuantRegularizer(dim=8, codebook_size=256).train()
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    out, log = reg(z)
    assert out.shape == (2, 8, 4, 4)
    for k in ("kl_loss", "tdc_loss", "bits-mean", "bits-min", "bits-max", "lam", "lam-max", "lam-min"):
        assert k in log, k
    log["kl_loss"].backward()
    assert z.grad is not None and list(reg.get_trainable_parameters()) == []
    reg.eval()
    zq, log = reg(z.detach())
    idx = log["min_encoding_indices"]
    assert idx.shape == (2, 4, 4) and idx.dtype == torch.int64
    assert float(log["kl_loss"]) == 0 and "perplexity" in log and log["zhat_noquant"].shape == zq.shape
    inds = rearrange(rearrange(idx, "b ... -> b (...)"), "b (h w) -> b h w", h=4, w=4)
    assert torch.equal(rearrange(reg.get_codebook_entry(inds), "b h w c -> b c h w"), zq)
    assert torch.equal(reg.dequant(idx), zq)
    with pytest.raises(ValueError, match="index_layout must be one of"):
        GaussianQuantRegularizer(dim=8, codebook_size=256, index_layout="flat")


def test_unpatch_restores_and_copies_keep_the_patch(tmp_path):
    import copy

    torch.manual_seed(0)
    engine = _engine(weights={"kl_loss": 1e-3})
    before = {k: v.clone() for k, v in engine.state_dict().items()}
    adapters.patch(engine, "sgm", K=2**6, m=2)
    assert any(k.startswith("regularization.gq.") for k in engine.state_dict())
    path = tmp_path / "engine.pt"
    torch.save(engine, path)
    for clone in (copy.deepcopy(engine), torch.load(path, weights_only=False)):
        assert adapters.is_patched(clone) and clone.regularization is not engine.regularization
        clone.loss.regularization_weights["kl_loss"] = 0.25  # the copy reads its own loss module
        _, log = clone.encode(_images(), return_reg_log=True)
        torch.testing.assert_close(0.25 * log["kl_loss"], log["tdc_loss"], rtol=1e-5, atol=0)
    adapters.unpatch(engine)
    after = engine.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
