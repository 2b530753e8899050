"""diffusers AutoencoderKL adapter, against the real class (random init, no downloads)."""

import json

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

from gq_plugin import adapters  # noqa: E402
from gq_plugin.rate import group_rates  # noqa: E402

SD3_FULL = dict(block_out_channels=[128, 256, 512, 512], latent_channels=16)


def _tiny_kl(seed, latent_channels, **extra):
    """A small AutoencoderKL with SD's four-block layout (random init, seeded)."""
    torch.manual_seed(seed)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=latent_channels,
                         norm_num_groups=32, sample_size=32, **extra)


def tiny_sd3():  # SD3: 16 channels, no quant_conv
    return _tiny_kl(0, 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd15():  # SD1.5: 4 channels, with quant_conv
    return _tiny_kl(1, 4, scaling_factor=0.18215)


def diffusers_example_step(vae, opt, x, kl_scale=1e-3):
    """The loss of diffusers' examples/research_projects/autoencoderkl/train_autoencoderkl.py
    (without LPIPS / GAN terms), unchanged: nll + kl_scale * sum(kl) / B."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample()
    pred = vae.decode(z).sample
    rec_loss = F.l1_loss(pred.float(), x.float(), reduction="none")
    nll_loss = torch.sum(rec_loss) / rec_loss.shape[0]
    kl_loss = posterior.kl()
    kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
    loss = nll_loss + kl_scale * kl_loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    return posterior, kl_loss


def _train_and_check(vae, x, G):
    q = vae.gq_quantizer
    before = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith("gq_quantizer")}
    opt = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=1e-3)
    vae.train()
    posterior, kl = diffusers_example_step(vae, opt, x)
    assert isinstance(posterior, DiagonalGaussianDistribution)
    # kl() is per sample (B,), and its batch mean is the TDC loss; all multipliers were 1
    rates = group_rates(posterior.mean.detach().movedim(1, -1), posterior.logvar.detach().movedim(1, -1), q.codebook_dim)
    assert posterior.kl().shape == (x.shape[0],)
    torch.testing.assert_close(kl.detach(), rates.sum((1, 2, 3)).mean(), rtol=1e-5, atol=1e-4)
    # weights changed, TDC multipliers moved, exactly one TDC step
    after = vae.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert int(q.tdc.num_steps) == 1
    assert float(q.tdc.lam_global) != 1.0
    # eval: encode -> indices -> decode
    vae.eval()
    with torch.no_grad():
        idx = vae.encode_indices(x)
        h = x.shape[-1] // 8
        assert idx.shape == (x.shape[0], G, h, h) and idx.dtype == torch.int64
        post = vae.encode(x).latent_dist
        z_hat = q.dequant(idx.permute(0, 2, 3, 1))  # diffusers (B, G, h, w) -> core (B, h, w, G)
        assert torch.equal(post.mode(), z_hat) and torch.equal(post.sample(), z_hat)
        assert torch.equal(post.indices, idx)
        rec = vae.decode_indices(idx).sample
        assert rec.shape == x.shape
        assert torch.equal(vae(x).sample, rec)  # AutoencoderKL.forward goes through GQ in eval
    return idx


def test_sd3_tiny_train_eval_save_load(tmp_path):
    vae = tiny_sd3()
    adapters.patch_sd3_vae(vae, K=2**10, m=8)
    assert vae.config["gq"]["codebook_size"] == 2**10 and vae.config["gq"]["codebook_dim"] == 8
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    idx = _train_and_check(vae, x, G=2)

    vae.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["gq"]["codebook_size"] == 2**10 and cfg["gq"]["grouping"] == "contiguous"
    loaded = adapters.load_pretrained_gq_vae(str(tmp_path))
    loaded.eval()
    q0, q1 = vae.gq_quantizer, loaded.gq_quantizer
    for name in ("lam_global", "lam_max", "lam_min", "num_steps"):
        assert torch.equal(getattr(q0.tdc, name), getattr(q1.tdc, name)), name
    assert q1.fingerprint == q0.fingerprint
    with torch.no_grad():
        assert torch.equal(loaded.encode_indices(x), idx)
        assert torch.equal(loaded.decode_indices(idx).sample, vae.decode_indices(idx).sample)


def test_plain_from_pretrained_then_patch_from_config(tmp_path):
    vae = adapters.patch_sd3_vae(tiny_sd3(), K=2**8, m=16, seed=7, grouping="strided")
    vae.save_pretrained(tmp_path)
    plain = AutoencoderKL.from_pretrained(tmp_path)  # diffusers ignores the extras but keeps config["gq"]
    adapters.patch_from_config(plain)
    q = plain.gq_quantizer
    assert (q.codebook_size, q.codebook_dim, q.seed, q.grouping) == (2**8, 16, 7, "strided")


def test_load_refuses_other_codebook(tmp_path):
    vae = adapters.patch_sd3_vae(tiny_sd3(), K=2**8, m=16)
    vae.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["gq"]["seed"] = 1234
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match|fingerprint"):
        adapters.load_pretrained_gq_vae(str(tmp_path))


def test_sd15_with_quant_conv():
    vae = tiny_sd15()
    assert vae.quant_conv is not None
    adapters.patch_autoencoder_kl(vae, K=2**8, m=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _train_and_check(vae, x, G=2)


def test_invalid_m_lists_valid_values():
    vae = tiny_sd3()
    with pytest.raises(ValueError, match=r"valid m: \[1, 2, 4, 8, 16\]"):
        adapters.patch_autoencoder_kl(vae, K=2**8, m=3)
    assert not adapters.is_patched(vae)


def test_unpatch_restores_original():
    vae = tiny_sd3()
    keys = set(vae.state_dict())
    adapters.patch_sd3_vae(vae, K=2**8)
    assert any(k.startswith("gq_quantizer.") for k in vae.state_dict())
    with pytest.raises(ValueError, match="already patched"):
        adapters.patch_sd3_vae(vae, K=2**8)
    adapters.unpatch(vae)
    assert set(vae.state_dict()) == keys
    assert "gq" not in vae.config and not hasattr(vae, "encode_indices")
    post = vae.eval().encode(torch.zeros(1, 3, 16, 16)).latent_dist
    assert type(post) is DiagonalGaussianDistribution


def test_suggest_gq_settings_sd3():
    s = adapters.suggest_gq_settings(SD3_FULL, image_size=256)
    bpp = {(x.codebook_dim, x.log2_codebook_size): x.bpp for x in s}
    assert bpp[(16, 16)] == 0.25 and bpp[(8, 16)] == 0.5 and bpp[(4, 16)] == 1.0
    row = next(x for x in s if (x.codebook_dim, x.log2_codebook_size) == (16, 16))
    assert row.bits_per_token == 16 and row.tokens_per_image == 32 * 32 and row.recommended
    assert "| 16 | 2^16 |" in s.table()


def test_wrapper_routes_everything_through_forward():
    vae = adapters.patch_sd3_vae(tiny_sd3(), K=2**8, m=16)
    model = adapters.GQAutoencoderWrapper(vae).train()
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    assert out.sample.shape == x.shape and out.loss.ndim == 0 and out.indices is None
    (out.sample.abs().mean() + out.loss).backward()
    assert vae.encoder.conv_in.weight.grad is not None
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.indices.shape == (2, 1, 4, 4) and float(out.loss) == 0.0
    assert torch.equal(out.latents, vae.gq_quantizer.dequant(out.indices.permute(0, 2, 3, 1)))


def test_deepcopy_and_torch_save_of_patched_model(tmp_path):
    import copy

    vae = adapters.patch_sd3_vae(tiny_sd3(), K=2**8).eval()
    x = torch.rand(1, 3, 32, 32)
    idx = vae.encode_indices(x)
    clone = copy.deepcopy(vae)
    torch.save(vae, tmp_path / "vae.pt")
    loaded = torch.load(tmp_path / "vae.pt", weights_only=False)
    for m in (clone, loaded):
        assert m.encode.__self__ is m and m.gq_quantizer is not vae.gq_quantizer
        assert torch.equal(m.encode_indices(x), idx)
        adapters.unpatch(m)
        assert type(m.encode(x).latent_dist) is DiagonalGaussianDistribution


def test_save_load_variant_and_sharded(tmp_path):
    vae = adapters.patch_sd3_vae(tiny_sd3(), K=2**8, m=8)
    vae.gq_quantizer.tdc.lam_global.fill_(3.5)
    vae.save_pretrained(tmp_path / "v", variant="fp16")
    vae.save_pretrained(tmp_path / "s", max_shard_size="200KB")
    assert list((tmp_path / "s").glob("*.index.json"))
    for path, kw in ((tmp_path / "v", {"variant": "fp16"}), (tmp_path / "s", {})):
        loaded = adapters.load_pretrained_gq_vae(str(path), **kw)
        assert float(loaded.gq_quantizer.tdc.lam_global) == 3.5


def test_checkpoint_of_the_previous_format_still_loads(tmp_path):
    """A save_pretrained folder written by gq-plugin <= 0.1: flat config["gq"] (format 1, K/m keyed
    as codebook_size/codebook_dim, no dim) and an int64 gq_config buffer with beta's bits."""
    from safetensors.torch import load_file, save_file

    vae = adapters.patch_sd3_vae(tiny_sd3(), K=2**8, m=8, seed=7, tolerance=0.25, tdc_auto_step=False)
    vae.gq_quantizer.tdc.lam_global.fill_(3.0)
    vae.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["gq"] = {"format": 1, "codebook_size": 256, "codebook_dim": 8, "grouping": "contiguous", "codebook": "sobol",
                 "seed": 7, "beta": 1.0, "tolerance": 0.25, "lam_factor": 1.01, "tdc_auto_step": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["gq_quantizer.gq_config"] = torch.tensor([256, 8, 0, 0, 7, 16, 4607182418800017408])  # beta 1.0 bits
    save_file(state, weights)
    loaded = adapters.load_pretrained_gq_vae(str(tmp_path))
    q = loaded.gq_quantizer
    assert (q.codebook_size, q.codebook_dim, q.seed, q.tdc.tolerance, q.tdc.auto_step) == (256, 8, 7, 0.25, False)
    assert float(q.tdc.lam_global) == 3.0
    assert q.settings == vae.gq_quantizer.settings
    # a tampered old buffer is refused with the field named
    state["gq_quantizer.gq_config"] = torch.tensor([256, 8, 1, 0, 7, 16, 4607182418800017408])
    save_file(state, weights)
    with pytest.raises(ValueError, match="grouping: checkpoint 'strided' vs model 'contiguous'"):
        adapters.load_pretrained_gq_vae(str(tmp_path))
