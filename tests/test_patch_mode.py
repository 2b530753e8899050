"""A quantizer patched into a model follows the model's train/eval mode (issue #29 item 1).

A new ``nn.Module`` starts in training mode; attached to a model that is already in eval mode
(a loaded checkpoint, a frozen host), it would keep the GQ bottleneck continuous until the user
happened to call ``eval()`` again. Every adapter is checked: patched in eval -> GQ at once;
``train()`` / ``eval()`` afterwards switch both.
"""

import torch
from _adapter_standins import TokenBridgeStandin
from _hosts import SgmEngine, SgmLoss, ldm_autoencoder, taming_vqmodel
from test_adapters_diffusers import tiny_sd3
from test_adapters_sgm import GaussianRegularizer

from gq_plugin import adapters
from gq_plugin.adapters import GQAutoencoderWrapper
from gq_plugin.adapters._patch import quantizer_of


def _modes(model):
    return model.training, quantizer_of(model).training


def _check_follows(model):
    """Patched while in eval: the quantizer is in eval; train()/eval() then switch both."""
    assert _modes(model) == (False, False)
    model.train()
    assert _modes(model) == (True, True)
    model.eval()
    assert _modes(model) == (False, False)


def _x(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_diffusers_patched_in_eval_is_gq_without_a_second_eval():
    vae = tiny_sd3().eval()
    adapters.patch_sd3_vae(vae, K=2**8, m=4)
    x = _x()
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        assert torch.equal(post.mode(), post.sample()) and not torch.equal(post.mode(), post.mean)  # GQ codewords
        ref = vae.decode_indices(vae.encode_indices(x)).sample
        assert torch.equal(vae.decode(post.mode()).sample, ref) and torch.equal(vae(x).sample, ref)
    _check_follows(vae)


def test_diffusers_patched_in_train_stays_in_train():
    vae = tiny_sd3().train()
    adapters.patch_sd3_vae(vae, K=2**8, m=4)
    assert _modes(vae) == (True, True)


def test_loaded_gq_vae_is_gq_without_a_second_eval(tmp_path):
    vae = adapters.patch_sd3_vae(tiny_sd3(), K=2**8, m=4)
    vae.save_pretrained(tmp_path)
    loaded = adapters.load_pretrained_gq_vae(str(tmp_path))
    assert _modes(loaded) == (False, False)
    x = _x(seed=1)
    with torch.no_grad():
        out = loaded(x).sample
        ref = loaded.decode_indices(loaded.encode_indices(x)).sample
        continuous = loaded.decode(loaded.encode(x).latent_dist.mean).sample
    assert torch.equal(out, ref) and not torch.equal(out, continuous)
    _check_follows(loaded)


def test_ldm_patched_in_eval():
    model = ldm_autoencoder().eval()
    adapters.patch_ldm_autoencoder(model, K=2**8, m=4)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        assert torch.equal(posterior.mode(), posterior.sample()) and not torch.equal(posterior.mode(), posterior.mean)
        assert torch.equal(model.decode(posterior.mode()), model.decode_indices(model.encode_indices(x)))
    _check_follows(model)


def test_sgm_patched_in_eval():
    engine = SgmEngine(GaussianRegularizer(), SgmLoss(regularization_weights={"kl_loss": 1.0})).eval()
    adapters.patch_sgm_autoencoder(engine, K=2**8, m=4)
    assert engine.regularization.gq.training is False
    _check_follows(engine)


def test_taming_patched_in_eval():
    model = taming_vqmodel(n_embed=128, embed_dim=8).eval()
    adapters.patch_taming_vqmodel(model, m=4)
    assert model.quantize.gq.training is False and model.quant_conv.training is False
    with torch.no_grad():
        _, loss, _ = model.encode(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert float(loss) == 0  # the eval (GQ) branch: no TDC loss
    _check_follows(model)


def test_tokenbridge_swapped_in_eval():
    model = TokenBridgeStandin().eval()
    adapters.swap_tokenbridge_quantizer(model)  # m = 1, like for like
    _check_follows(model)


def test_tokenbridge_grouped_swap_in_eval_puts_the_ar_head_in_eval_too():
    from _tokenbridge_standin import TokenBridgeMini

    model = TokenBridgeMini().eval()
    adapters.swap_tokenbridge_quantizer(model, K=2**8, m=4)
    assert model.gq_ar_head.training is False
    _check_follows(model)
    model.train()
    assert model.gq_ar_head.training is True


def test_wrapper_of_an_eval_model_is_gq():
    vae = adapters.patch_sd3_vae(tiny_sd3(), K=2**8, m=4).eval()
    wrapper = GQAutoencoderWrapper(vae)
    assert wrapper.training is False
    x = _x(seed=2)
    with torch.no_grad():
        out = wrapper(x)
    assert out.indices is not None and float(out.loss) == 0
    assert torch.equal(out.sample, vae.decode_indices(out.indices).sample)
    wrapper.train()
    assert _modes(vae) == (True, True)


def test_unpatch_leaves_the_host_mode_alone():
    vae = tiny_sd3().eval()
    adapters.patch_sd3_vae(vae, K=2**8, m=4)
    q = adapters.unpatch(vae)
    assert vae.training is False and q.training is False
