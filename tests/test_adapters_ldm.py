"""ldm adapter, against a stand-in written to ldm's published AutoencoderKL interface (ldm itself
cannot be pip-installed)."""

import pytest
import torch
from _adapter_standins import LdmAutoencoderKL, ldm_kl_term

from gq_plugin import adapters
from gq_plugin.rate import group_rates


def test_posterior_interface_and_training_step():
    torch.manual_seed(0)
    model = LdmAutoencoderKL(z_channels=4, embed_dim=4)
    adapters.patch_ldm_autoencoder(model, K=2**8, m=2)
    x = torch.rand(2, 3, 16, 16)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    w0 = model.encoder[0].weight.clone()
    dec, posterior = model(x)  # unchanged ldm forward(sample_posterior=True)
    for attr in ("mean", "logvar", "std", "var", "parameters"):
        assert isinstance(getattr(posterior, attr), torch.Tensor), attr
    assert posterior.nll(posterior.sample()).shape == (2,)
    kl = ldm_kl_term(posterior)  # LPIPSWithDiscriminator's reduction
    rates = group_rates(posterior.mean.detach().movedim(1, -1), posterior.logvar.detach().movedim(1, -1), 2)
    torch.testing.assert_close(kl.detach(), rates.sum((1, 2, 3)).mean(), rtol=1e-5, atol=1e-4)
    ((dec - x).abs().mean() + 1e-3 * kl).backward()
    opt.step()
    assert not torch.equal(w0, model.encoder[0].weight)
    assert int(model.gq_quantizer.tdc.num_steps) == 1


def test_eval_gq_and_indices():
    model = adapters.patch_ldm_autoencoder(LdmAutoencoderKL(), K=2**6, m=4).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        idx = model.encode_indices(x)
        assert idx.shape == (2, 1, 4, 4)
        post = model.encode(x)
        assert torch.equal(post.sample(), post.mode()) and torch.equal(post.mode(), model.gq_quantizer.dequant(idx.permute(0, 2, 3, 1)))
        dec, _ = model(x)
        assert torch.equal(dec, model.decode_indices(idx))
    wrapped = adapters.GQAutoencoderWrapper(model).eval()
    with torch.no_grad():
        out = wrapped(x)
    assert torch.equal(out.indices, idx) and torch.equal(out.sample, dec)


def test_state_dict_and_unpatch():
    model = LdmAutoencoderKL()
    keys = set(model.state_dict())
    adapters.patch_ldm_autoencoder(model, K=2**6)
    sd = model.state_dict()
    assert {"gq_quantizer.tdc.lam_global", "gq_quantizer.codebook_fingerprint"} <= set(sd)
    settings = adapters.gq_settings_from_state_dict(sd)
    assert settings == {"K": 2**6, "m": 4, "grouping": "contiguous", "codebook": "sobol", "seed": 42, "beta": 1.0}
    other = adapters.patch_ldm_autoencoder(LdmAutoencoderKL(), **settings)
    other.load_state_dict(sd)
    adapters.unpatch(model)
    assert set(model.state_dict()) == keys and not hasattr(model, "gq_quantizer")
    assert type(model.encode(torch.rand(1, 3, 8, 8))).__name__ == "LdmDiagonalGaussianDistribution"


def test_rejects_non_ldm_and_bad_m():
    with pytest.raises(ValueError, match="missing"):
        adapters.patch_ldm_autoencoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"valid m: \[1, 2, 4\]"):
        adapters.patch_ldm_autoencoder(LdmAutoencoderKL(), m=3)


def test_kl_equals_quantizer_forward_loss_with_custom_logvar_range():
    from gq_plugin import GaussianQuantizer
    from gq_plugin.adapters import GQDiagonalGaussian

    q = GaussianQuantizer(4, 64, 2, accept_image_fmap=True, logvar_range=(-4.0, 2.0), tdc_auto_step=False).train()
    params = torch.cat([torch.randn(2, 4, 3, 3), torch.full((2, 4, 3, 3), -10.0)], 1)  # logvar below the range
    post = GQDiagonalGaussian(params, q)
    _, _, loss = q(params)
    torch.testing.assert_close(post.kl().mean(), loss)
