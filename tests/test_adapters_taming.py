"""taming adapter: GaussianVectorQuantizer vs VectorQuantizer2's contract, and VQModel patching.

Uses taming's real ``VectorQuantizer2`` when ``taming.modules.vqvae.quantize`` imports
(``pip install --no-deps taming-transformers-rom1504``), else a stand-in written to its
interface. ``taming.models.vqgan.VQModel`` needs pytorch-lightning + torchvision, so the model is a
stand-in with VQModel's encode/decode/forward/decode_code structure.
"""

import pytest
import torch
from _adapter_standins import TamingVQModel, taming_vector_quantizer2

from gq_plugin import adapters
from gq_plugin.adapters import GaussianVectorQuantizer, patch_taming_vqmodel

VQ2, SOURCE = taming_vector_quantizer2()


def test_source_reported():
    assert SOURCE in ("taming", "standin")


@pytest.mark.parametrize("sane", [False, True])
def test_forward_contract_matches_vectorquantizer2(sane):
    C, K = 8, 64
    ref = VQ2(K, C, beta=0.25, sane_index_shape=sane).eval()
    gq = GaussianVectorQuantizer(K, C, beta=0.25, sane_index_shape=sane).eval()
    z = torch.randn(2, C, 5, 4)
    zq1, loss1, info1 = ref(z)
    zq2, loss2, info2 = gq(torch.cat([z, torch.full_like(z, -4.0)], 1))
    assert zq1.shape == zq2.shape and loss1.shape == loss2.shape == ()
    assert len(info1) == len(info2) == 3
    assert info1[2].shape == info2[2].shape and info2[2].dtype == torch.int64
    assert info2[1] is None and float(info2[0]) > 0  # perplexity in eval
    # get_codebook_entry(indices, shape=(B, H, W, C)) -> (B, C, H, W), equal to the forward output
    shape = (2, 5, 4, C)
    assert ref.get_codebook_entry(info1[2].reshape(-1), shape).shape == gq.get_codebook_entry(info2[2], shape).shape
    assert torch.equal(gq.get_codebook_entry(info2[2].reshape(-1), shape), zq2)
    assert gq.get_codebook_entry(info2[2].reshape(-1), None).shape == (40, C)


def test_several_codebooks_per_position():
    gq = GaussianVectorQuantizer(32, 8, codebook_dim=2, sane_index_shape=True).eval()
    z = torch.randn(2, 16, 3, 3)
    zq, _, (_, _, idx) = gq(z)
    assert idx.shape == (2, 3, 3, 4)
    assert torch.equal(gq.get_codebook_entry(idx, (2, 3, 3, 8)), zq)
    assert torch.equal(gq.embed_code(idx), zq)


def test_train_mode_returns_tdc_loss_and_sample():
    gq = GaussianVectorQuantizer(64, 8).train()
    z = torch.randn(2, 16, 4, 4, requires_grad=True)
    zq, loss, (perp, enc, idx) = gq(z)
    assert zq.shape == (2, 8, 4, 4) and loss.requires_grad and idx is None and perp is None
    loss.backward()
    assert z.grad is not None


def test_patch_vqmodel():
    torch.manual_seed(0)
    model = TamingVQModel(VQ2(128, 8, beta=0.25, sane_index_shape=True))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        h_old = model.quant_conv(model.encoder(x))
    patch_taming_vqmodel(model, m=4)
    assert model.quant_conv.out_channels == 16 and isinstance(model.quantize, GaussianVectorQuantizer)
    assert model.quantize.n_e == 128 and model.quantize.gq.codebook_dim == 4
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(x))
    assert torch.allclose(moments[:, :8], h_old, atol=1e-6)  # mean half = the old conv
    assert torch.all(moments[:, 8:] == -6.0)  # logvar half starts constant
    # training step through the unchanged VQModel.forward; diff = TDC loss
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    dec, diff = model(x)
    assert dec.shape == x.shape and diff.ndim == 0
    ((dec - x).abs().mean() + 1e-3 * diff).backward()
    opt.step()
    # eval: indices -> decode_code
    model.eval()
    with torch.no_grad():
        quant, _, (_, _, idx) = model.encode(x)
        assert idx.shape == (2, 4, 4, 2)
        assert torch.equal(model.decode_code(idx), model.decode(quant))
    # unpatch: the trained mean head goes back into the original-shaped conv
    mean_w = model.quant_conv.weight[:8].clone()
    adapters.unpatch(model)
    assert model.quant_conv.out_channels == 8 and isinstance(model.quantize, VQ2)
    assert torch.equal(model.quant_conv.weight, mean_w)
