"""taming adapter against the real ``taming.models.vqgan.VQModel`` (taming-transformers-rom1504
0.0.6) and its own ``training_step`` run by the real Lightning 1.9.5 ``Trainer`` (loss contract:
tests/_hosts.py)."""

import torch
from _hosts import fit, import_host, steps_between, taming_vqmodel

from gq_plugin import adapters
from gq_plugin.adapters import GaussianVectorQuantizer


def test_tdc_moves_once_per_autoencoder_step_in_tamings_training_step():
    """VQModel's ``training_step(batch, batch_idx, optimizer_idx)`` runs the quantizer on the
    discriminator pass too; only the autoencoder optimizer's steps move the multipliers, and the
    discriminator pass leaves no statistics behind."""
    torch.manual_seed(0)
    model = adapters.patch_taming_vqmodel(taming_vqmodel(), m=4)
    tdc = model.quantize.gq.tdc
    log = fit(model, tdc, batches=3)
    assert steps_between(log, int(tdc.num_steps)) == [(0, 1), (1, 0)] * 3
    assert int(tdc.num_steps) == 3 and tdc._pending is None  # the last (discriminator) pass recorded nothing


def test_real_vqmodel_patch_encode_and_decode_code():
    torch.manual_seed(0)
    VQModel = import_host("taming.models.vqgan").VQModel
    model = taming_vqmodel(n_embed=128, embed_dim=8, sane_index_shape=True)
    assert type(model) is VQModel
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        h_old = model.quant_conv(model.encoder(x))
    adapters.patch_taming_vqmodel(model, m=4)
    assert isinstance(model.quantize, GaussianVectorQuantizer) and model.quantize.n_e == 128
    with torch.no_grad():
        moments = model.quant_conv(model.encoder(x))
    torch.testing.assert_close(moments[:, :8], h_old, rtol=0, atol=1e-6)  # the mean half is the old conv
    assert torch.all(moments[:, 8:] == -6.0)
    model.eval()
    assert not model.quantize.training
    with torch.no_grad():
        quant, loss, (perplexity, _, idx) = model.encode(x)
        assert idx.shape == (2, 4, 4, 2) and float(loss) == 0 and float(perplexity) >= 1
        assert torch.equal(model.decode_code(idx), model.decode(quant))  # VQModel.decode_code -> quantize.embed_code
        dec, diff = model(x)
        assert dec.shape == x.shape and float(diff) == 0
    assert adapters.unpatch(model).n_e == 128 and type(model.quantize).__name__ == "VectorQuantizer2"
