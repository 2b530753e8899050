"""The paper authors' released UNet GQ tokenizers loaded into diffusers (gq_plugin.adapters.authors):
exact agreement with their model, their file formats, and one clear error for every bad input."""

import json
import pickle
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("scipy")
pytest.importorskip("ldm")

from _authors import (BPP_GROUP, RELEASED, SMALL, authors_codebook, authors_dequant, authors_gq, authors_unet,  # noqa: E402
                      authors_yaml, lightning_checkpoint, lightning_state)

from gq_plugin import adapters  # noqa: E402
from gq_plugin.adapters.authors import authors_vae_config, convert_authors_state_dict  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "authors_sd3unet_gq_keys.json"


def _images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _write(tmp_path, state, config_text, name="model.ckpt", lightning=True):
    ckpt, cfg = tmp_path / name, tmp_path / "config.yaml"
    torch.save(lightning_checkpoint(state) if lightning else state, ckpt)
    cfg.write_text(config_text)
    return ckpt, cfg


def _assert_equal_but_for_ties(idx, ref_idx, scores):
    """Indices equal to the reference's, but where two codewords tie in float32: a differing index
    must score within float32 rounding (1e-5 of the score scale) of the best, in their float64 scores."""
    assert idx.shape == ref_idx.shape
    rows, ref_rows = (i.permute(0, 2, 3, 1).reshape(-1, 1) for i in (idx, ref_idx))
    gap = scores.gather(1, ref_rows) - scores.gather(1, rows)
    assert (idx == ref_idx).float().mean() >= 0.99 and float(gap.max()) <= 1e-5 * float(scores.abs().max())


@pytest.fixture(scope="module")
def small_unet():
    return authors_unet(SMALL, seed=0)


@pytest.mark.parametrize("bpp", sorted(BPP_GROUP))
def test_loaded_model_computes_what_the_authors_model_computes(tmp_path, small_unet, bpp):
    """Each released UNet GQ config (m = 16 / 8 / 4, K = 2^16), on a small random UNet of the same
    layout: moments, indices, quantized latents and decodes equal their model's and formulas'."""
    enc, dec = small_unet
    m = BPP_GROUP[bpp]
    ckpt, cfg = _write(tmp_path, lightning_state(enc, dec), authors_yaml(SMALL, group=m))
    vae = adapters.load_authors_checkpoint(ckpt, cfg)
    assert not vae.training and vae.gq_quantizer.codebook_dim == m and vae.gq_quantizer.codebook_size == 2**16
    x = _images()
    with torch.no_grad():
        moments_ref = enc(x)
        ref_idx, ref_z, scores = authors_gq(moments_ref, authors_codebook(2**16, m))
        posterior = vae.encode(x).latent_dist
        idx = vae.encode_indices(x)
        torch.testing.assert_close(posterior.parameters, moments_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.gq_quantizer.codebook, authors_codebook(2**16, m), rtol=0, atol=0)
        assert idx.shape == ref_idx.shape == (2, 16 // m, 4, 4)
        _assert_equal_but_for_ties(idx, ref_idx, scores)
        ours_z = authors_dequant(idx, authors_codebook(2**16, m))  # == ref_z where the indices agree
        torch.testing.assert_close(posterior.mode(), ours_z, rtol=0, atol=0)
        torch.testing.assert_close(vae.decode_indices(ref_idx).sample, dec(ref_z), rtol=1e-4, atol=1e-4)
        z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(vae.decode(z).sample, dec(z), rtol=1e-4, atol=1e-4)
    assert vae.gq_quantizer.bits_per_pixel(16) == pytest.approx(16 // m * 16 / 16)  # (C/m) log2 K bits per f x f pixels


def test_attention_at_every_configured_level(tmp_path):
    """``attn_resolutions`` placing attention at two levels (not only the lowest) converts too."""
    unet = dict(SMALL, attn_resolutions=[16, 8])
    enc, dec = authors_unet(unet, seed=3)
    ckpt, cfg = _write(tmp_path, lightning_state(enc, dec), authors_yaml(unet, group=8))
    vae = adapters.load_authors_checkpoint(ckpt, cfg)
    assert vae.config.down_block_types == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    x = _images(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(x).latent_dist.parameters, enc(x), rtol=1e-5, atol=1e-5)
        z = torch.randn(2, 16, 4, 4)
        torch.testing.assert_close(vae.decode(z).sample, dec(z), rtol=1e-4, atol=1e-4)


def test_bare_state_dict_and_safetensors_load_the_same_model(tmp_path, small_unet):
    from safetensors.torch import save_file

    state = lightning_state(*small_unet)
    config = authors_yaml(SMALL, group=8)
    ckpt, cfg = _write(tmp_path, state, config)
    bare, _ = _write(tmp_path, state, config, name="bare.pt", lightning=False)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    ref = adapters.load_authors_checkpoint(ckpt, cfg).state_dict()
    for path in (bare, tmp_path / "model.safetensors"):
        got = adapters.load_authors_checkpoint(path, cfg).state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


class _Hostile:
    """Unpickling this object opens (creates) a file: what a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_file_that_needs_unpickling_code_is_refused_not_run(tmp_path, small_unet, capsys):
    marker = tmp_path / "was_executed"
    ckpt = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": lightning_state(*small_unet), "callbacks": _Hostile(marker)}, ckpt)
    (tmp_path / "c.yaml").write_text(authors_yaml())
    with pytest.raises(ValueError, match=r"hostile.ckpt is not a plain weights file, refusing to load it \(UnpicklingError"):
        adapters.load_authors_checkpoint(ckpt, tmp_path / "c.yaml")
    from gq_plugin.lab.cli import main

    assert main(["import-authors", str(ckpt), "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gq import-authors: error: ") and "refusing" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    with pytest.raises(OSError):  # the payload is real: a plain unpickler would have run it
        pickle.loads(pickle.dumps(_Hostile(tmp_path / "no_dir" / "x")))


def _error(tmp_path, state, config_text, lightning=True) -> str:
    ckpt, cfg = _write(tmp_path, state, config_text, lightning=lightning)
    with pytest.raises(ValueError) as info:
        adapters.load_authors_checkpoint(ckpt, cfg)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unexpected_keys_are_named(tmp_path, small_unet):
    state = lightning_state(*small_unet)
    msg = _error(tmp_path, {**state, "latent_mean": torch.zeros(1, 16, 1, 1)}, authors_yaml())
    assert msg.startswith("unexpected key(s) in the checkpoint: latent_mean")
    msg = _error(tmp_path, {**state, "encoder.down.0.extra.weight": torch.zeros(3)}, authors_yaml())
    assert msg == "unexpected key(s) in the checkpoint: encoder.down.0.extra.weight (not part of the configured UNet)"
    msg = _error(tmp_path, {**state, "decoder.mid.attn_1.q.weight": torch.zeros(64, 64, 1, 1)}, authors_yaml())
    assert "mid-block attention (mid.attn_1.*): the authors' UNet has none" in msg
    del state["decoder.up.1.block.0.norm2.bias"]
    msg = _error(tmp_path, state, authors_yaml())
    assert msg == ("checkpoint lacks weights of the configured UNet: decoder.up_blocks.1.resnets.0.norm2.bias (diffusers names)")


def test_config_that_disagrees_with_the_checkpoint_names_the_setting(tmp_path, small_unet):
    state = lightning_state(*small_unet)
    msg = _error(tmp_path, state, authors_yaml(dict(SMALL, z_channels=8), group=8))
    assert msg.startswith("config and checkpoint disagree on z_channels: config gives z_channels = 8, the checkpoint 16 "
                          "(encoder.conv_out.weight (32, 64, 3, 3)")
    msg = _error(tmp_path, state, authors_yaml(dict(SMALL, attn_resolutions=[16])))
    assert msg.startswith("config and checkpoint disagree on attn_resolutions (with resolution): config gives attention levels = [1], "
                          "the checkpoint [2]")
    assert "num_res_blocks" in _error(tmp_path, state, authors_yaml(dict(SMALL, num_res_blocks=2)))
    assert "ch / ch_mult" in _error(tmp_path, state, authors_yaml(dict(SMALL, ch_mult=[1, 2, 4])))
    assert _error(tmp_path, state, authors_yaml(group=5)).startswith("config sets group=5: the codebook dimension m must divide z_channels=16")
    assert "n_samples=1000" in _error(tmp_path, state, authors_yaml(n_samples=1000))
    assert "['temperature']" in _error(tmp_path, state, authors_yaml(reg_extra={"temperature": 1.0}))
    assert "dropout=0.1" in _error(tmp_path, state, authors_yaml(dict(SMALL, dropout=0.1)))


def test_configurations_we_do_not_convert_say_so(tmp_path, small_unet):
    state = lightning_state(*small_unet)
    vit = authors_yaml(encoder="pit.modules.vit.TransformerEncoder", decoder="pit.modules.vit.TransformerDecoder",
                       reg_extra={"format": "blc"})
    assert "ViT tokenizers (bsqvit_*" in _error(tmp_path, state, vit)
    vf = authors_yaml(engine_extra={"use_vf": "dinov2", "reverse_proj": "true"})
    assert _error(tmp_path, state, vf).startswith("config trains with visual-foundation alignment (use_vf='dinov2', the *_vf configs): not converted")
    gq2 = authors_yaml(regularizer="pit.quantization.gaussian.GaussianQuantRegularizer2")
    assert "GaussianQuantRegularizer2" in _error(tmp_path, state, gq2)
    fsq = authors_yaml(regularizer="pit.quantization.fsq.FSQRegularizer")
    assert "only the authors' pit.quantization.gaussian.GaussianQuantRegularizer" in _error(tmp_path, state, fsq)
    assert _error(tmp_path, state, "model: {target: x}\n").startswith("config has no model.params.encoder_config")


def test_other_file_contents_get_one_clear_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(authors_yaml())
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds neither a Lightning checkpoint"):
        adapters.load_authors_checkpoint(tmp_path / "list.pt", cfg)
    (tmp_path / "torn.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        adapters.load_authors_checkpoint(tmp_path / "torn.safetensors", cfg)
    with pytest.raises(ValueError, match="is not a file"):
        adapters.load_authors_checkpoint(tmp_path / "missing.ckpt", cfg)


# --------------------------------------------------------------------------- the released checkpoints' structure


def _released_keys() -> dict:
    data = json.loads(FIXTURE.read_text())
    assert len(data["keys"]) == 274
    return data["keys"]


@pytest.mark.parametrize("bpp", sorted(BPP_GROUP))
def test_released_checkpoint_keys_convert_to_the_diffusers_model(bpp):
    """The 274 ``encoder.*``/``decoder.*`` names and shapes of the released sd3unet_gq checkpoints
    (tests/fixtures, see its ``source``) convert, without allocating them, onto exactly the
    diffusers model of each released config; the GQ settings are theirs."""
    m = BPP_GROUP[bpp]
    diffusers_config, gq = authors_vae_config(_yaml_config(RELEASED, m))
    assert diffusers_config == {
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32,
        "sample_size": 256, "scaling_factor": 1.0, "use_quant_conv": False, "use_post_quant_conv": False,
        "mid_block_add_attention": False}
    assert gq == {"codebook_size": 65536, "codebook_dim": m, "seed": 42, "beta": 1.0, "logvar_range": (-30.0, 20.0),
                  "tolerance": 0.5, "lam_factor": 1.01, "grouping": "strided", "codebook": "sobol", "tdc_rule": "reference"}
    state = {k: torch.empty(shape, device="meta") for k, shape in _released_keys().items()}
    state["loss.logvar"] = torch.empty((), device="meta")
    out = convert_authors_state_dict(state, diffusers_config)
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        own = AutoencoderKL(**diffusers_config).state_dict()
    assert len(out) == 274 and {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in own.items()}
    assert sum(v.numel() for v in out.values()) == 86_974_627
    assert out["encoder.down_blocks.3.attentions.0.to_q.weight"].shape == (512, 512)  # conv 1x1 -> linear


def _yaml_config(unet, m):
    return _omegaconf(authors_yaml(unet, group=m))


def _omegaconf(text):
    from omegaconf import OmegaConf

    return OmegaConf.create(text)


def test_fixture_is_the_authors_architecture():
    """The fixture equals their Encoder/Decoder at the released config (ldm's classes, mid-block
    attention removed, built on the meta device): 274 keys, 50 of them attention inside down/up blocks."""
    enc, dec = authors_unet(RELEASED, device="meta")
    keys = {k: list(v.shape) for k, v in lightning_state(enc, dec).items() if not k.startswith("loss.")}
    assert keys == _released_keys()
    assert sum(".attn." in k for k in keys) == 50 and not any("mid.attn" in k for k in keys)


# --------------------------------------------------------------------------- gq import-authors, the recipe


def test_import_authors_writes_a_folder_every_gq_command_loads(tmp_path, small_unet, capsys):
    from PIL import Image

    from gq_plugin.lab.cli import main
    from gq_plugin.lab.codec import decode_file, encode_files

    enc, dec = small_unet
    ckpt, cfg = _write(tmp_path, lightning_state(enc, dec), authors_yaml(SMALL, group=8))
    out = tmp_path / "authors_0.50"
    assert main(["import-authors", str(ckpt), "--config", str(cfg), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"wrote {out}: GQ K = 65536, m = 8 (2 codebook(s) per token, f4: 2 bpp)")
    direct = adapters.load_authors_checkpoint(ckpt, cfg)
    loaded = adapters.load_pretrained_gq_vae(str(out))
    assert loaded.gq_quantizer.settings == direct.gq_quantizer.settings and loaded.gq_quantizer.settings.grouping == "strided"
    x = _images(seed=5)
    torch.testing.assert_close(loaded.encode_indices(x), direct.encode_indices(x), rtol=0, atol=0)
    # a gq command on the folder: images -> token file -> images, the tokens being the authors' indices
    Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(tmp_path / "a.png")
    info = encode_files(out, [tmp_path / "a.png"], tmp_path / "a.gqt", size=16)
    assert info["shape"] == [1, 2, 4, 4] and decode_file(out, tmp_path / "a.gqt", tmp_path / "a_out.png")
    assert main(["import-authors", str(ckpt), "--config", str(cfg), "--out", str(out)]) == 2  # no silent overwrite
    assert "already holds a file or a model (pass --force" in capsys.readouterr().err
    assert main(["import-authors", str(ckpt), "--config", str(cfg), "--out", str(out), "--force"]) == 0


def test_gq_train_fine_tunes_an_imported_folder(tmp_path, small_unet, capsys):
    """``gq train authors_unet_gq_0.25 model.pretrained=DIR``: the imported GQ settings (m = 8,
    strided, the reference TDC rule) are the ones trained, for two steps on real photos."""
    import shutil

    from gq_plugin.lab.cli import main
    from gq_plugin.lab.data import wheel_photos

    photos = tmp_path / "photos"
    photos.mkdir()
    for key, path, _ in list(wheel_photos())[:4]:
        shutil.copy(path, photos / f"{key}{Path(path).suffix}")
    if len(list(photos.iterdir())) < 4:
        pytest.skip("needs the photos shipped in scikit-image / scikit-learn / pyiqa wheels")
    ckpt, cfg = _write(tmp_path, lightning_state(*small_unet), authors_yaml(SMALL, group=8))
    assert main(["import-authors", str(ckpt), "--config", str(cfg), "--out", str(tmp_path / "imported")]) == 0
    run = tmp_path / "run"
    assert main(["train", "authors_unet_gq_0.25", f"model.pretrained={tmp_path / 'imported'}", "train.steps=2", "train.batch_size=2",
                 "data.size=32", f"data.root={photos}", "loss.lpips=0", "loss.disc.enabled=false", "train.cpu=true",
                 "train.num_workers=0", f"train.output_dir={run}", "train.ckpt_every=0", "--quiet"]) == 0
    capsys.readouterr()
    tuned = adapters.load_pretrained_gq_vae(str(run / "final" / "vae"))
    s = tuned.gq_quantizer.settings
    assert (s.codebook_dim, s.grouping, s.tdc.tdc_rule) == (8, "strided", "reference")
    assert int(tuned.gq_quantizer.tdc.num_steps) == 2  # the TDC stepped with the optimizer
    before = adapters.load_pretrained_gq_vae(str(tmp_path / "imported")).state_dict()
    assert not torch.equal(tuned.state_dict()["encoder.conv_in.weight"], before["encoder.conv_in.weight"])


def test_recipe_is_the_authors_architecture_and_settings():
    """recipes/authors_unet_gq_0.25.yaml trains (from scratch or from an imported folder) the model
    and GQ settings of configs/sd3unet_gq_0.25.yaml."""
    from gq_plugin.lab.config import load_config
    from gq_plugin.lab.models import _as_dict

    diffusers_config, gq = authors_vae_config(_yaml_config(RELEASED, 16))
    cfg = load_config("authors_unet_gq_0.25")
    assert _as_dict(cfg.model.config) == diffusers_config
    q = _as_dict(cfg.quantizer)
    assert {k: tuple(q[k]) if k == "logvar_range" else q[k] for k in gq} == gq
    assert q["weight"] == 0.1  # their regularization_weights.kl_loss


def test_runtime_settings_pass_through_but_the_tokens_stay_the_authors(tmp_path, small_unet):
    ckpt, cfg = _write(tmp_path, lightning_state(*small_unet), authors_yaml(SMALL, group=8))
    vae = adapters.load_authors_checkpoint(ckpt, cfg, search_backend="torch", tile_k=1024)
    assert (vae.gq_quantizer.search_backend, vae.gq_quantizer.tile_k) == ("torch", 1024)
    with pytest.raises(ValueError, match=r"\['grouping', 'm'\] are set by the authors' config"):
        adapters.load_authors_checkpoint(ckpt, cfg, m=4, grouping="contiguous")


@pytest.mark.slow
def test_full_size_released_architecture(tmp_path):
    """The released architecture itself (87 M parameters, random weights, perturbed norms) through a
    Lightning checkpoint with the 1.00 bpp config (m = 4, strided): moments, indices and decodes."""
    enc, dec = authors_unet(RELEASED, seed=7)
    ckpt, cfg = _write(tmp_path, lightning_state(enc, dec), authors_yaml(RELEASED, group=4))
    vae = adapters.load_authors_checkpoint(ckpt, cfg)
    x = _images(n=1, size=64, seed=8)
    with torch.no_grad():
        moments = enc(x)
        ref_idx, ref_z, scores = authors_gq(moments, authors_codebook(2**16, 4))
        torch.testing.assert_close(vae.encode(x).latent_dist.parameters, moments, rtol=1e-5, atol=1e-5)
        _assert_equal_but_for_ties(vae.encode_indices(x), ref_idx, scores)
        torch.testing.assert_close(vae.decode_indices(ref_idx).sample, dec(ref_z), rtol=1e-4, atol=1e-4)


def test_a_config_that_is_not_theirs_gets_one_clear_line(tmp_path):
    torch.save({"a": torch.zeros(3)}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match=r"^config does not read as OmegaConf YAML \(UnicodeDecodeError"):
        authors_vae_config(tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match=r"^config's encoder_config.params must be a mapping, got 'x'"):
        authors_vae_config({"model": {"params": {"encoder_config": {"target": "pit.modules.unet.Encoder", "params": "x"},
                                                 "decoder_config": {"target": "pit.modules.unet.Decoder"}, "regularizer_config": {}}}})
    with pytest.raises(ValueError, match=r"^config has no model.params.encoder_config / decoder_config / regularizer_config"):
        authors_vae_config({"model": {"params": {"encoder_config": "x", "decoder_config": {}, "regularizer_config": 3}}})
    with pytest.raises(ValueError, match=r"is not a file"):
        authors_vae_config(tmp_path / "missing.yaml")
    # their full files also hold lightning / data sections; only model.params is resolved
    full = authors_yaml() + "data:\n  params:\n    root: ${oc.env:GQ_TEST_UNSET_DATA_ROOT}\n"
    assert authors_vae_config(_omegaconf(full))[1]["codebook_dim"] == 16
