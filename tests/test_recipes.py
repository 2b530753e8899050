import pytest
import torch

from gq_plugin.lab.config import list_recipes, load_config, resolve_recipe


def test_bundled_recipes_load_and_validate():
    names = list_recipes()
    for expected in ("tiny_cpu", "sd3_gq_0.25", "sd3_gq_0.5", "sd3_gq_1.0", "ldm_f8_gq", "taming_f16_gq"):
        assert expected in names
    bpp = {}
    for name in names:
        cfg = load_config(name)
        c = cfg.model.config
        assert c.latent_channels % cfg.quantizer.codebook_dim == 0, name
        f = 2 ** (len(c.block_out_channels) - 1)
        groups = c.latent_channels // cfg.quantizer.codebook_dim
        bpp[name] = groups * torch.tensor(float(cfg.quantizer.codebook_size)).log2().item() / (f * f)
    assert bpp["sd3_gq_0.25"] == 0.25 and bpp["sd3_gq_0.5"] == 0.5 and bpp["sd3_gq_1.0"] == 1.0
    assert bpp["ldm_f8_gq"] == 0.25 and bpp["taming_f16_gq"] == 0.0625


def test_overrides_and_validation():
    cfg = load_config("tiny_cpu", ["train.steps=7", "quantizer.codebook_size=256"])
    assert cfg.train.steps == 7 and cfg.quantizer.codebook_size == 256
    with pytest.raises(ValueError, match=r"unknown key\(s\) in train: \['stpes'\]"):
        load_config("tiny_cpu", ["train.stpes=7"])
    with pytest.raises(ValueError, match="train.steps"):
        load_config("tiny_cpu", ["train.steps=0"])
    with pytest.raises(ValueError, match="not found"):
        resolve_recipe("no_such_recipe")


def test_tiny_recipe_builds_and_runs_forward():
    pytest.importorskip("diffusers")
    from gq_plugin.lab.models import build_model

    vae, wrapper = build_model(load_config("tiny_cpu"))
    out = wrapper(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.sample.shape == (2, 3, 64, 64) and out.loss.ndim == 0
    assert vae.gq_quantizer.num_codebooks == 2 and vae.gq_quantizer.tdc.auto_step is False
    wrapper.eval()
    out = wrapper(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.indices.shape == (2, 2, 16, 16)  # diffusers host layout (B, G, h, w)


def test_every_gq_setting_in_a_recipe_reaches_the_quantizer():
    """quantizer.search_backend (and every other GQConfig name) was accepted and never forwarded."""
    pytest.importorskip("diffusers")
    from gq_plugin.lab.models import build_model

    overrides = ["quantizer.search_backend=torch", "quantizer.tolerance=0.25", "quantizer.lam_max_range=[1.0,50.0]",
                 "quantizer.logvar_range=[-10.0,5.0]", "quantizer.tile_k=512", "quantizer.tdc_hinge=0.5"]
    vae, _ = build_model(load_config("tiny_cpu", overrides))
    s = vae.gq_quantizer.settings
    assert (s.search_backend, s.tdc.tolerance, s.tdc.lam_max_range, s.logvar_range, s.tile_k, s.tdc.tdc_hinge) == (
        "torch", 0.25, (1.0, 50.0), (-10.0, 5.0), 512, 0.5)
    assert vae.gq_quantizer.tdc.hinge_bits == pytest.approx(10.0 + 0.5 * 0.25)  # K = 2^10


def test_recipe_settings_validated_by_gqconfig_and_dead_keys_gone():
    with pytest.raises(ValueError, match="quantizer: lam_factor must be finite and > 1"):
        load_config("tiny_cpu", ["quantizer.lam_factor=0.9"])
    with pytest.raises(ValueError, match=r"quantizer: tdc_hinge must be in \[0, 1\)"):
        load_config("tiny_cpu", ["quantizer.tdc_hinge=1.5"])
    with pytest.raises(ValueError, match="quantizer: search_backend must be None, 'auto' or one of"):
        load_config("tiny_cpu", ["quantizer.search_backend=gpu"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) in quantizer: \['tolerence'\]"):
        load_config("tiny_cpu", ["quantizer.tolerence=0.3"])
    # model.family and data.fetch_set were never read: they are no longer accepted
    with pytest.raises(ValueError, match=r"unknown key\(s\) in model: \['family'\]"):
        load_config("tiny_cpu", ["model.family=diffusers_autoencoder_kl"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) in data: \['fetch_set'\]"):
        load_config("tiny_cpu", ["data.fetch_set=small"])
