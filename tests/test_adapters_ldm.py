"""ldm adapter against the real ``ldm`` package (stable-diffusion-sdkit 2.1.5): ``AutoencoderKL``,
``DiagonalGaussianDistribution``, ``LatentDiffusion`` and ldm's own ``training_step`` run by the
real Lightning 1.9.5 ``Trainer`` (see tests/_hosts.py for the loss contract)."""

import pytest
import torch
from _hosts import LDM_DDCONFIG, fit, import_host, ldm_autoencoder, steps_between
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

from gq_plugin import adapters
from gq_plugin.rate import group_rates

UNET = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": dict(image_size=4, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                       attention_resolutions=[], channel_mult=[1], num_head_channels=32)}


def _latent_diffusion(first_stage_config):
    ddpm = import_host("ldm.models.diffusion.ddpm")
    return ddpm.LatentDiffusion(first_stage_config=first_stage_config, cond_stage_config="__is_unconditional__",
                                unet_config=UNET, timesteps=10, image_size=4, channels=4, first_stage_key="image",
                                scale_factor=0.5)


def _images(n=2, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_patched_first_stage_of_a_real_latent_diffusion():
    """Patch ``LatentDiffusion.first_stage_model`` in place: ``get_first_stage_encoding`` takes the
    GQ posterior (an ldm ``DiagonalGaussianDistribution``) and returns the scaled GQ latent."""
    torch.manual_seed(0)
    first = {"target": "ldm.models.autoencoder.AutoencoderKL",
             "params": dict(ddconfig=LDM_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)}
    ld = _latent_diffusion(first)
    adapters.patch_ldm_autoencoder(ld.first_stage_model, K=2**6, m=2)
    assert not ld.first_stage_model.gq_quantizer.training  # follows the frozen first stage
    x = _images()
    with torch.no_grad():
        posterior = ld.encode_first_stage(x)
        assert isinstance(posterior, DiagonalGaussianDistribution)
        z = ld.get_first_stage_encoding(posterior)
        idx = ld.first_stage_model.encode_indices(x)
    assert idx.shape == (2, 2, 4, 4)
    torch.testing.assert_close(z, 0.5 * ld.first_stage_model.gq_quantizer.dequant(idx.permute(0, 2, 3, 1)), rtol=0, atol=0)
    ld.train()  # LatentDiffusion.train keeps the first stage (and its quantizer) in eval
    assert not ld.first_stage_model.gq_quantizer.training


def test_latent_diffusion_trains_on_a_gq_first_stage_from_its_config():
    """``first_stage_config.target: gq_plugin.adapters.ldm.GQAutoencoderKL``: ldm's own
    ``shared_step`` (encode -> GQ latent -> diffusion loss) trains the UNet; the GQ first stage
    stays frozen."""
    torch.manual_seed(0)
    first = {"target": "gq_plugin.adapters.ldm.GQAutoencoderKL",
             "params": dict(ddconfig=LDM_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4,
                            gq={"K": 2**6, "m": 4})}
    ld = _latent_diffusion(first)
    assert isinstance(ld.first_stage_model, AutoencoderKL) and adapters.is_patched(ld.first_stage_model)
    x = _images()
    loss, logs = ld.shared_step({"image": x.permute(0, 2, 3, 1)})
    loss.backward()
    assert torch.isfinite(loss) and "train/loss_simple" in logs
    grads = [p.grad for p in ld.model.parameters() if p.grad is not None]
    assert len(grads) == len(list(ld.model.parameters())) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in ld.first_stage_model.parameters())
    with torch.no_grad():
        z = ld.get_first_stage_encoding(ld.encode_first_stage(x))
        z_hat = ld.first_stage_model.gq_quantizer.dequant(ld.first_stage_model.encode_indices(x).permute(0, 2, 3, 1))
    assert torch.equal(z, 0.5 * z_hat)


def test_tdc_moves_once_per_autoencoder_step_in_ldms_training_step():
    """ldm's ``training_step(batch, batch_idx, optimizer_idx)`` under Lightning's automatic
    two-optimizer loop: the loss evaluates ``posteriors.kl()`` on both passes, yet only the
    autoencoder optimizer's steps move the multipliers."""
    torch.manual_seed(0)
    model = adapters.patch_ldm_autoencoder(ldm_autoencoder(), K=2**6, m=2)
    tdc = model.gq_quantizer.tdc
    log = fit(model, tdc, batches=3)
    moves = steps_between(log, int(tdc.num_steps))
    assert [idx for idx, _ in moves] == [0, 1, 0, 1, 0, 1]
    assert moves == [(0, 1), (1, 0)] * 3
    assert int(tdc.num_steps) == 3


@pytest.mark.parametrize("tdc_weight", [1.0, 0.1])
def test_host_kl_weight_does_not_scale_tdc(tdc_weight):
    """ldm's ``kl_weight`` (1e-6 in its configs) multiplies ``posteriors.kl()``; the adapter reads
    it from ``model.loss`` so the autoencoder loss holds ``tdc_weight * TDC`` whatever it is."""
    torch.manual_seed(0)
    model = adapters.patch_ldm_autoencoder(ldm_autoencoder(kl_weight=1e-6), K=2**6, m=2, tdc_weight=tdc_weight)
    q = model.gq_quantizer
    x = _images()
    for kl_weight in (1e-6, 1e-3, 1.0):
        model.loss.kl_weight = kl_weight  # read when kl() runs
        posterior = model.encode(x)
        kl = posterior.kl()
        host_term = model.loss.kl_weight * kl.sum() / kl.shape[0]  # LPIPSWithDiscriminator's KL term
        rates = group_rates(posterior.mean.detach().movedim(1, -1), posterior.logvar.detach().movedim(1, -1), 2)
        tdc = q.tdc.per_sample_loss(rates).mean()
        torch.testing.assert_close(host_term, tdc_weight * tdc, rtol=1e-5, atol=0)
        torch.testing.assert_close(posterior.tdc_loss(), tdc, rtol=1e-5, atol=0)
    model.loss.kl_weight = 0.0
    with pytest.raises(ValueError, match="kl_weight"):
        model.encode(x).kl()


def test_fixed_host_kl_weight_and_bad_values():
    model = adapters.patch_ldm_autoencoder(ldm_autoencoder(kl_weight=1e-6), K=2**6, m=2, host_kl_weight=1e-2)
    posterior = model.encode(_images())
    torch.testing.assert_close(1e-2 * posterior.kl().mean(), posterior.tdc_loss(), rtol=1e-5, atol=0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="host_kl_weight"):
            adapters.patch_ldm_autoencoder(ldm_autoencoder(), K=2**6, host_kl_weight=bad)
    with pytest.raises(ValueError, match="tdc_weight"):
        adapters.patch_ldm_autoencoder(ldm_autoencoder(), K=2**6, tdc_weight=-1.0)


def test_init_from_ckpt_keeps_the_gq_keys(tmp_path):
    torch.manual_seed(0)
    model = adapters.patch_ldm_autoencoder(ldm_autoencoder(), K=2**6, m=2)
    fit(model, model.gq_quantizer.tdc, batches=2)
    state = model.state_dict()
    assert int(state["gq_quantizer.tdc.num_steps"]) == 2 and float(state["gq_quantizer.tdc.lam_global"]) != 1.0
    path = tmp_path / "gq.ckpt"
    torch.save({"state_dict": state}, path)
    # ldm config route: the settings come from the checkpoint, the GQ buffers load with it
    restored = adapters.GQAutoencoderKL(LDM_DDCONFIG, {"target": "torch.nn.Identity"}, 4, ckpt_path=str(path))
    for key in ("gq_quantizer.tdc.lam_global", "gq_quantizer.tdc.lam_max", "gq_quantizer.tdc.num_steps", "gq_quantizer.gq_config"):
        assert torch.equal(restored.state_dict()[key], state[key]), key
    x = _images()
    model.eval(), restored.eval()
    with torch.no_grad():
        assert torch.equal(restored.encode_indices(x), model.encode_indices(x))
    # a patched model with other settings refuses the checkpoint instead of dropping its GQ keys
    other = adapters.patch_ldm_autoencoder(ldm_autoencoder(), K=2**8, m=2)
    with pytest.raises(ValueError, match="codebook_size"):
        other.init_from_ckpt(str(path))
    with pytest.raises(ValueError, match="codebook_size"):
        adapters.GQAutoencoderKL(LDM_DDCONFIG, {"target": "torch.nn.Identity"}, 4, ckpt_path=str(path), gq={"K": 2**8, "m": 2})
    # a pretrained (non-GQ) KL checkpoint: needs the GQ settings, loads its weights
    plain = tmp_path / "kl.ckpt"
    torch.save({"state_dict": ldm_autoencoder().state_dict()}, plain)
    with pytest.raises(ValueError, match="gq="):
        adapters.GQAutoencoderKL(LDM_DDCONFIG, {"target": "torch.nn.Identity"}, 4, ckpt_path=str(plain))
    fresh = adapters.GQAutoencoderKL(LDM_DDCONFIG, {"target": "torch.nn.Identity"}, 4, ckpt_path=str(plain), gq={"K": 2**6, "m": 4})
    assert torch.equal(fresh.quant_conv.weight, torch.load(plain)["state_dict"]["quant_conv.weight"])
    assert int(fresh.gq_quantizer.tdc.num_steps) == 0


def test_eval_gq_and_indices():
    model = adapters.patch_ldm_autoencoder(ldm_autoencoder(), K=2**6, m=4).eval()
    x = _images()
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
    model = ldm_autoencoder()
    keys = set(model.state_dict())
    adapters.patch_ldm_autoencoder(model, K=2**6, tolerance=0.25, tdc_auto_step=False)
    sd = model.state_dict()
    assert {"gq_quantizer.tdc.lam_global", "gq_quantizer.codebook_fingerprint"} <= set(sd)
    settings = adapters.gq_settings_from_state_dict(sd)
    expected = {"K": 2**6, "m": 4, "grouping": "contiguous", "codebook": "sobol", "seed": 42, "beta": 1.0,
                "tolerance": 0.25, "tdc_auto_step": False}
    assert {k: settings[k] for k in expected} == expected  # the TDC and runtime settings come back too
    other = adapters.patch_ldm_autoencoder(ldm_autoencoder(), **settings)
    other.load_state_dict(sd)
    assert other.gq_quantizer.settings == model.gq_quantizer.settings
    # a checkpoint of gq-plugin <= 0.1 (int64 buffer: K, m, grouping, kind, seed, dim, beta bits)
    legacy = dict(sd, **{"gq_quantizer.gq_config": torch.tensor([64, 4, 0, 0, 42, 4, 4607182418800017408])})
    assert adapters.gq_settings_from_state_dict(legacy) == {"K": 64, "m": 4, "grouping": "contiguous", "codebook": "sobol",
                                                            "seed": 42, "beta": 1.0}
    adapters.unpatch(model)
    assert set(model.state_dict()) == keys and not hasattr(model, "gq_quantizer")
    assert type(model.encode(_images(1))) is DiagonalGaussianDistribution


def test_rejects_non_ldm_and_bad_m():
    with pytest.raises(ValueError, match="missing"):
        adapters.patch_ldm_autoencoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"valid m: \[1, 2, 4\]"):
        adapters.patch_ldm_autoencoder(ldm_autoencoder(), m=3)


def test_kl_equals_quantizer_forward_loss_with_custom_logvar_range():
    from gq_plugin import GaussianQuantizer
    from gq_plugin.adapters import GQDiagonalGaussian

    q = GaussianQuantizer(4, 64, 2, accept_image_fmap=True, logvar_range=(-4.0, 2.0), tdc_auto_step=False).train()
    params = torch.cat([torch.randn(2, 4, 3, 3), torch.full((2, 4, 3, 3), -10.0)], 1)  # logvar below the range
    post = GQDiagonalGaussian(params, q)
    _, _, loss = q(params)
    torch.testing.assert_close(post.kl().mean(), loss)


def test_wrapper_loss_is_the_unscaled_tdc_loss():
    model = adapters.patch_ldm_autoencoder(ldm_autoencoder(kl_weight=1e-6), K=2**6, m=2)
    out = adapters.GQAutoencoderWrapper(model).train()(_images())
    torch.testing.assert_close(out.loss, out.posterior.tdc_loss(), rtol=0, atol=0)
    torch.testing.assert_close(1e-6 * out.posterior.kl().mean(), out.loss, rtol=1e-5, atol=0)
