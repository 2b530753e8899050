"""Every Gaussian VAE class diffusers ships, patched with GQ (issue #29): one tiny randomly
initialised instance of each real class (``_diffusers_zoo``), checked for

* eval: ``decode_indices(encode_indices(x)) == decode(encode(x).latent_dist.mode())`` exactly,
  indices channel-first with the latent's time axis kept, ``mode() == sample() == codebook[indices]``;
* training: ``kl()`` is the per-sample TDC loss of the posterior's rates, and it trains;
* ``save_pretrained`` -> ``load_pretrained_gq_vae`` (class read from config.json) gives the same
  tokens and the same decoding, in eval at once.

The coverage test fails for a class the installed diffusers ships that neither table knows, and
regenerates ``docs/diffusers_coverage.md`` (checked against the committed file).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
import _diffusers_zoo as zoo  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

from gq_plugin import adapters  # noqa: E402
from gq_plugin.adapters import _layout  # noqa: E402
from gq_plugin.adapters.diffusers_vae import posterior_moments  # noqa: E402
from gq_plugin.rate import group_rates  # noqa: E402

COVERAGE = Path(__file__).resolve().parents[1] / "docs" / "diffusers_coverage.md"
K = 2**6


def _decode_kwargs(name):
    spec = zoo.GAUSSIAN[name]
    kw = dict(spec.decode_kwargs)
    if spec.generator_decode:
        kw["generator"] = torch.Generator().manual_seed(0)
    return kw


def _sample(out):
    return out.sample if hasattr(out, "sample") else out


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads cost more than they give, and CI runs -n 2
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", sorted(zoo.GAUSSIAN))
def test_every_gaussian_vae_round_trips_trains_and_reloads(name, tmp_path):
    vae, x = zoo.build(name)
    plain, _ = zoo.build(name)  # the same weights, never patched: the reference
    with torch.no_grad():
        ref_post = plain.encode(x).latent_dist
    mean, logvar = posterior_moments(ref_post)
    channels = mean.shape[1]
    m = channels // 2
    adapters.patch_autoencoder_kl(vae, K=K, m=m)
    q = vae.gq_quantizer
    assert q.dim == channels and not q.training  # channels from the config agree with the posterior; eval at once

    # ---- eval: indices in the latent's own layout, and the exact round trip
    with torch.no_grad():
        idx = vae.encode_indices(x)
        G = channels // m
        assert idx.dtype == torch.int64 and idx.shape == (mean.shape[0], G, *mean.shape[2:])
        post = vae.encode(x).latent_dist
        assert isinstance(post, type(ref_post))  # the host's posterior class, GQ behaviour added
        z_hat = _layout.unfold(q.dequant(_layout.from_host_layout(idx)), idx.ndim, idx.shape[0])
        assert torch.equal(post.mode(), z_hat) and torch.equal(post.sample(), z_hat) and torch.equal(post.indices, idx)
        # the same search, done here on the positions flattened by hand (no fold involved)
        flat_mean, flat_lv = (t.movedim(1, -1).reshape(-1, channels, 1, 1) for t in (mean, logvar))
        flat_idx = q.encode_indices(flat_mean, flat_lv).reshape(-1, G)
        assert torch.equal(idx.movedim(1, -1).reshape(-1, G), flat_idx)
        via_tokens = _sample(vae.decode_indices(idx, **_decode_kwargs(name)))
        via_mode = _sample(vae.decode(post.mode(), **_decode_kwargs(name)))
        assert torch.equal(via_tokens, via_mode)
        assert not torch.equal(z_hat, mean)  # GQ moved the latent: the check above is not the continuous VAE's

    # ---- training: kl() is the per-sample TDC loss, and the encoder learns from it
    vae.train()
    assert q.training
    post = vae.encode(x).latent_dist
    rates = group_rates(post.mean.detach().movedim(1, -1), post.logvar.detach().movedim(1, -1), m)
    kl = post.kl()
    assert kl.shape == (x.shape[0],)
    torch.testing.assert_close(kl.detach(), rates.flatten(1).sum(1), rtol=1e-5, atol=1e-4)  # all multipliers 1
    torch.testing.assert_close(post.rates().movedim(1, -1), rates)
    kl.mean().backward()
    assert q.tdc.num_steps == 1 and float(q.tdc.lam_global) != 1.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())

    # ---- save_pretrained / load_pretrained_gq_vae
    vae.eval()
    with torch.no_grad():
        idx = vae.encode_indices(x)
        rec = _sample(vae.decode_indices(idx, **_decode_kwargs(name)))
    vae.save_pretrained(tmp_path)
    loaded = adapters.load_pretrained_gq_vae(str(tmp_path))
    assert type(loaded) is type(vae) and not loaded.gq_quantizer.training
    if zoo.GAUSSIAN[name].tiling:
        loaded.enable_tiling()
    elif getattr(loaded, "use_tiling", False):  # on by default for some classes; off as in zoo.build
        loaded.disable_tiling()
    assert float(loaded.gq_quantizer.tdc.lam_global) == float(q.tdc.lam_global)
    with torch.no_grad():
        assert torch.equal(loaded.encode_indices(x), idx)
        assert torch.equal(_sample(loaded.decode_indices(idx, **_decode_kwargs(name))), rec)


def test_cosmos_is_refused_with_a_clear_error():
    """Cosmos' posterior is an IdentityDistribution (no variance): refused when patched, and the
    generic check refuses such a posterior at encode time too."""
    vae, x = zoo.build("AutoencoderKLCosmos")
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    with pytest.raises(ValueError, match="AutoencoderKLCosmos.encode returns a IdentityDistribution without a variance"):
        adapters.patch_autoencoder_kl(vae, K=K)
    assert not adapters.is_patched(vae)
    with pytest.raises(ValueError, match="IdentityDistribution without a variance: Gaussian Quant needs a Gaussian posterior"):
        posterior_moments(post)


def test_video_index_layout_keeps_time_and_frames_are_independent():
    """(B, G, T, h, w): frame t of video b is exactly what quantizing that latent frame alone gives."""
    vae, x = zoo.build("AutoencoderKLWan")
    x = torch.cat([x, x.flip(2)])  # two different videos
    adapters.patch_autoencoder_kl(vae, K=K, m=2)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        idx = vae.encode_indices(x)
    B, C, T, h, w = post.mean.shape
    assert idx.shape == (B, C // 2, T, h, w)
    q = vae.gq_quantizer
    for b in range(B):
        for t in range(T):
            frame = torch.cat([post.mean[b : b + 1, :, t], post.logvar[b : b + 1, :, t]], 1)
            assert torch.equal(q.encode_indices(frame)[0].permute(2, 0, 1), idx[b, :, t])
    assert not torch.equal(idx[0], idx[1])


def test_audio_index_layout_and_log_std_posterior():
    """MiniMax-H3 audio gives mean and log-std: logvar = 2 * logs, indices (B, G, T)."""
    vae, x = zoo.build("AutoencoderKLMiniMaxH3Audio")
    with torch.no_grad():
        ref = vae.encode(x).latent_dist
    adapters.patch_autoencoder_kl(vae, K=K, m=1)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        idx = vae.encode_indices(x)
    torch.testing.assert_close(post.logvar, 2 * ref.logs, rtol=0, atol=0)
    assert idx.shape == (x.shape[0], ref.mean.shape[1], ref.mean.shape[2])
    moments = torch.cat([ref.mean, 2 * ref.logs], 1)
    assert torch.equal(vae.gq_quantizer.encode_indices(moments.unsqueeze(2))[:, 0].permute(0, 2, 1), idx)


def test_extra_decode_arguments_are_needed_and_passed():
    vae, x = zoo.build("AutoencoderKLTemporalDecoder")
    adapters.patch_autoencoder_kl(vae, K=K)
    with torch.no_grad():
        idx = vae.encode_indices(x)
        with pytest.raises(TypeError, match="num_frames"):
            vae.decode_indices(idx)
        assert vae.decode_indices(idx, num_frames=2).sample.shape == x.shape
        assert isinstance(vae.decode_indices(idx, num_frames=2, return_dict=False), tuple)


def test_tiled_only_encoder_keeps_tiling_without_warning(recwarn):
    vae, x = zoo.build("AutoencoderKLAllegro")  # encode raises NotImplementedError untiled
    adapters.patch_autoencoder_kl(vae, K=K)
    with torch.no_grad():
        idx = vae.encode_indices(x)
        assert torch.equal(idx, vae.encode(x).latent_dist.indices)
    assert vae.use_tiling and not [w for w in recwarn if "enable_tiling" in str(w.message)]
    vae.disable_tiling()
    with pytest.raises(NotImplementedError):
        vae.encode_indices(x)


def test_channels_from_config_names_or_argument():
    vae, _ = zoo.build("AutoencoderKLKVAEAudio")  # its latent channels are config.codebook_dim
    adapters.patch_autoencoder_kl(vae, K=K)
    assert vae.gq_quantizer.dim == vae.config.codebook_dim == 4
    adapters.unpatch(vae)
    adapters.patch_autoencoder_kl(vae, K=K, latent_channels=4)
    adapters.unpatch(vae)
    with pytest.raises(ValueError, match="latent_channels must be a positive int"):
        adapters.patch_autoencoder_kl(vae, K=K, latent_channels=0)
    with pytest.raises(ValueError, match="latent_channels=8 disagrees with the 4 latent channels in the config of AutoencoderKLKVAEAudio"):
        adapters.patch_autoencoder_kl(vae, K=K, latent_channels=8)
    assert not adapters.is_patched(vae)
    # a config that names the channels under no known key: latent_channels= is required
    from diffusers.configuration_utils import FrozenDict

    vae._internal_dict = FrozenDict({k: v for k, v in vae.config.items() if k != "codebook_dim"})
    with pytest.raises(ValueError, match=r"cannot tell the latent channels of AutoencoderKLKVAEAudio.*pass latent_channels="):
        adapters.patch_autoencoder_kl(vae, K=K)
    adapters.patch_autoencoder_kl(vae, K=K, m=2, latent_channels=4)
    x = torch.rand(1, 1, 64) * 2 - 1
    with torch.no_grad():
        assert vae.encode_indices(x).shape == (1, 2, 16)


def test_coverage_table_is_generated_and_complete():
    """Every VAE class of the installed diffusers is in one table; the docs' table is regenerated."""
    shipped = [name for name, _ in zoo.autoencoder_classes()]
    unknown = [n for n in shipped if n not in zoo.GAUSSIAN and n not in zoo.NOT_GAUSSIAN]
    assert not unknown, (
        f"diffusers ships VAE classes the GQ coverage test does not know: {unknown}; add a tiny config to "
        "tests/_diffusers_zoo.py GAUSSIAN (or say why in NOT_GAUSSIAN)"
    )
    gone = sorted((set(zoo.GAUSSIAN) | set(zoo.NOT_GAUSSIAN)) - set(shipped))
    assert not gone, f"classes in tests/_diffusers_zoo.py that diffusers no longer ships: {gone}"
    table = zoo.coverage_markdown()
    if os.environ.get("GQ_WRITE_COVERAGE"):
        COVERAGE.write_text(table)
    assert COVERAGE.read_text() == table, "docs/diffusers_coverage.md is stale: rerun with GQ_WRITE_COVERAGE=1"


@pytest.mark.parametrize("name", sorted(zoo.REFUSED))
def test_non_gaussian_classes_return_no_posterior_with_variance(name):
    """What NOT_GAUSSIAN says, checked where a tiny instance is cheap: encode gives no variance."""
    assert name in zoo.NOT_GAUSSIAN
    vae, x = zoo.build(name)
    with torch.no_grad():
        out = vae.encode(x)
    with pytest.raises(ValueError, match="without a variance"):
        posterior_moments(out.latent_dist if hasattr(out, "latent_dist") else out)


def test_plain_diagonal_gaussian_still_maps_to_the_named_class():
    vae, x = zoo.build("AutoencoderKL")
    adapters.patch_autoencoder_kl(vae, K=K)
    post = vae.encode(x).latent_dist
    assert type(post) is adapters.GQDiagonalGaussianDistribution and isinstance(post, DiagonalGaussianDistribution)


def test_wrapper_routes_a_video_vae_through_forward():
    vae, x = zoo.build("AutoencoderKLWan")
    adapters.patch_autoencoder_kl(vae, K=K, m=2)
    model = adapters.GQAutoencoderWrapper(vae).train()
    out = model(x)
    assert out.sample.shape == x.shape and out.loss.ndim == 0 and out.indices is None
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out.indices, vae.encode_indices(x)) and out.indices.ndim == 5
        assert torch.equal(out.sample, vae.decode_indices(out.indices).sample)


@pytest.mark.parametrize("name", ["AutoencoderKL", "AutoencoderVidTok", "AutoencoderKLMiniMaxH3Audio"])
def test_return_dict_by_keyword_or_position(name):
    """encode(x, False) / encode(x, return_dict=False) give (posterior,), as the class's own encode
    does; a class whose encode takes no return_dict (VidTok) still accepts it by keyword."""
    vae, x = zoo.build(name)
    adapters.patch_autoencoder_kl(vae, K=K)
    with torch.no_grad():
        ref = vae.encode(x).latent_dist.indices
        outs = [vae.encode(x, return_dict=False)]
        if name != "AutoencoderVidTok":
            outs.append(vae.encode(x, False))
        for out in outs:
            assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0].indices, ref)
