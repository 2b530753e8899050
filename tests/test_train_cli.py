"""End-to-end: recipe training (accelerate, 1 and 2 processes), evaluation, diagnose, encode/decode."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from gq_plugin.lab.cli import main as gq_main  # noqa: E402
from gq_plugin.lab.data import wheel_photos  # noqa: E402

MICRO_MODEL = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 32,
    "mid_block_add_attention": False,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    for key, path, _ in wheel_photos():
        shutil.copy(path, d / f"{key}{Path(path).suffix}")
    if len(list(d.iterdir())) < 6:
        pytest.skip("needs the photos shipped in scikit-image / scikit-learn / pyiqa wheels")
    return d


def write_recipe(path, photo_dir, out_dir, **extra):
    cfg = {
        "name": "micro",
        "seed": 0,
        "model": {"config": MICRO_MODEL},
        "quantizer": {"name": "gq", "codebook_size": 256, "codebook_dim": 4, "weight": 0.1},
        "loss": {"l1": 1.0, "lpips": 0.1},
        "optim": {"lr": 1e-3},
        "train": {"steps": 6, "batch_size": 4, "log_every": 2, "ckpt_every": 3, "output_dir": str(out_dir)},
        "data": {"root": str(photo_dir), "size": 32, "resize": 64, "crops_per_image": 2, "eval_fraction": 0.3},
        "eval": {"batch_size": 8, "max_images": 8, "grid_images": 4, "distribution": False},
    }
    for k, v in extra.items():
        cfg[k].update(v)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory, photo_dir):
    d = tmp_path_factory.mktemp("run")
    recipe = write_recipe(d / "micro.yaml", photo_dir, d / "out")
    assert gq_main(["train", str(recipe), "--quiet"]) == 0
    return recipe, d / "out"


def test_train_writes_checkpoints_logs_and_plots(trained):
    recipe, out = trained
    assert (out / "checkpoint-3" / "vae" / "config.json").is_file()
    assert (out / "final").resolve().name == "checkpoint-6"
    assert (out / "rates_hist.png").stat().st_size > 1000
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logs] == [2, 4, 6]
    assert all(k in logs[-1] for k in ("rec", "bits-mean", "bits-max", "lam", "lam-max", "lam-min", "lpips"))
    # the progress bar shows per-element values: rec is a per-image sum over 3*32*32 elements of l1 + 0.1*lpips
    last = logs[-1]
    assert last["rec_per_elem"] == pytest.approx(last["rec"] / (3 * 32 * 32), rel=1e-6)
    assert last["rec_per_elem"] == pytest.approx(last["l1"] + 0.1 * last["lpips"], rel=1e-4)
    for e in logs:  # band statistics of the logged batch: shares sum to 1, quantiles ordered, q100 = max
        assert e["band-in"] + e["band-over"] + e["band-under"] == pytest.approx(1.0)
        assert e["bits-q01"] <= e["bits-q05"] <= e["bits-q50"] <= e["bits-q95"] <= e["bits-q99"] <= e["bits-max"]
    cfg = json.loads((out / "final" / "vae" / "config.json").read_text())
    assert cfg["gq"]["codebook_size"] == 256 and cfg["gq"]["codebook_dim"] == 4


def test_checkpoint_restores_tdc_multipliers(trained):
    from gq_plugin.adapters.diffusers_vae import load_pretrained_gq_vae

    _, out = trained
    vae = load_pretrained_gq_vae(str(out / "final" / "vae"))
    tdc = vae.gq_quantizer.tdc
    assert tdc.num_steps.item() == 6  # one multiplier step per optimizer step
    assert tdc.lam_global.item() == pytest.approx(1.01 ** round(np.log(tdc.lam_global.item()) / np.log(1.01)), rel=1e-4)


def test_resume_continues_from_checkpoint(trained, tmp_path):
    recipe, out = trained
    out2 = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-3", out2 / "checkpoint-3")
    assert gq_main(["train", str(recipe), f"train.output_dir={out2}", "train.steps=5", "--resume", "latest", "--quiet"]) == 0
    from gq_plugin.adapters.diffusers_vae import load_pretrained_gq_vae

    vae = load_pretrained_gq_vae(str(out2 / "final" / "vae"))
    assert (out2 / "final").resolve().name == "checkpoint-5"
    assert vae.gq_quantizer.tdc.num_steps.item() == 5  # 3 restored + 2 new


def test_eval_prints_continuous_and_gq_rows(trained, tmp_path, capsys):
    recipe, out = trained
    assert gq_main(["eval", str(recipe), str(out / "final"), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| continuous VAE (decode(mean)) |" in table and "| GQ (decode(z_hat)) |" in table
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    for key in ("continuous", "quantized"):
        assert np.isfinite(res[key]["PSNR"]) and 0 < res[key]["SSIM"] <= 1 and res[key]["LPIPS-alex"] > 0
    info = res["info"]
    assert 0 < info["codebook"]["usage"] <= 1 and info["bpp"] == pytest.approx(1 * 8 / 4)  # 8 bits per 2x2 pixels
    assert not info["converted_from_vanilla"]
    band = info["band"]  # eval images x (32/2)^2 tokens x 1 group of m=4, band log2(256) +- 0.5
    assert band["count"] == info["n_images"] * 16 * 16 and (band["target_bits"], band["tolerance"]) == (8.0, 0.5)
    assert band["in_band"] + band["over_budget"] + band["under_budget"] == pytest.approx(1.0)
    assert band["min"] <= band["quantiles"]["q01"] <= band["quantiles"]["q99"] <= band["max"]
    row = f"| {band['count']} rates, band 7.5-8.5 | {100 * band['in_band']:.1f}% | {100 * band['over_budget']:.1f}% | {100 * band['under_budget']:.1f}% |"
    assert row in table and row in (tmp_path / "ev" / "eval.md").read_text()
    assert (tmp_path / "ev" / "recon_grid.png").stat().st_size > 1000


def test_vanilla_vae_is_converted_at_eval(photo_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "kl.yaml", photo_dir, tmp_path / "out", quantizer={"name": "kl", "weight": 1e-3},
                          train={"steps": 2, "ckpt_every": 0, "log_every": 1})
    assert gq_main(["train", str(recipe), "--quiet"]) == 0
    assert gq_main(["eval", str(recipe), str(tmp_path / "out" / "final"), "quantizer.codebook_size=256", "--quiet"]) == 0
    res = json.loads((tmp_path / "out" / "eval" / "eval.json").read_text())
    assert res["info"]["converted_from_vanilla"] is True


def test_diagnose_recommends_and_measures(trained, photo_dir, tmp_path, capsys):
    _, out = trained
    imgs = sorted(str(p) for p in photo_dir.iterdir())[:4]
    assert gq_main(["diagnose", str(out / "final"), "--images", *imgs, "--size", "32", "--out", str(tmp_path), "--quiet"]) == 0
    res = json.loads((tmp_path / "diagnose.json").read_text())
    assert res["recommended"]["codebook_dim"] in (1, 2, 4)
    assert res["recommended"]["codebook_size"] == 2 ** res["recommended"]["log2_codebook_size"]
    assert np.isfinite(res["measured"]["psnr_gq"])
    assert (tmp_path / "diagnose_rates.png").is_file()
    printed = capsys.readouterr().out
    assert "Recommended: K = 2^" in printed
    rec, own = res["band"]["recommended"], res["band"]["model"]
    # one formula: the predicted over-budget share is the band statistics' share at the setting measured,
    # which for this GQ-patched model is its own K = 256, m = 4 (not the recommendation)
    assert res["measured"]["setting"] == "model" and (res["measured"]["codebook_size"], res["measured"]["codebook_dim"]) == (256, 4)
    assert own["over_budget"] == res["predicted"]["frac_groups_over_budget"]
    assert "Measured with the model's own setting: K = 2^8 (256), m = 4" in printed
    assert rec["target_bits"] == res["recommended"]["log2_codebook_size"]
    assert (own["codebook_size"], own["codebook_dim"], own["target_bits"]) == (256, 4, 8.0)
    assert own["count"] == 4 * 16 * 16  # 4 images x 16x16 tokens x 1 group
    assert "Band statistics at the model's own K = 256, m = 4" in printed
    assert f"| {100 * own['over_budget']:.1f}% |" in printed


def test_encode_decode_cli_reproduces_decode_indices(trained, photo_dir, tmp_path, capsys):
    from PIL import Image

    from gq_plugin.lab.codec import decode_indices, load_image, load_model
    from gq_plugin.lab.plots import to_uint8

    _, out = trained
    img = sorted(photo_dir.iterdir())[0]
    tok = tmp_path / "x.gqt"
    assert gq_main(["encode", str(img), "--model", str(out / "final"), "-o", str(tok), "--size", "32"]) == 0
    msg = capsys.readouterr().out
    assert "real" in msg and "nominal 2.0000 bpp" in msg
    assert gq_main(["decode", str(tok), "--model", str(out / "final"), "-o", str(tmp_path / "x.png")]) == 0
    decoded = np.asarray(Image.open(tmp_path / "x.png"))
    vae = load_model(out / "final")
    x = load_image(img, 32, 2).unsqueeze(0)
    expected = to_uint8(decode_indices(vae, vae.encode_indices(x))[0])
    assert np.array_equal(decoded, expected)
    # a model with another codebook refuses the file
    other = tmp_path / "other"
    vae.gq_quantizer  # noqa: B018
    from gq_plugin.adapters import patch_autoencoder_kl, unpatch

    unpatch(vae)
    patch_autoencoder_kl(vae, K=512, m=4)
    vae.save_pretrained(other)
    assert gq_main(["decode", str(tok), "--model", str(other), "-o", str(tmp_path / "y.png")]) == 2
    assert "codebook_size: file 256 vs model 512" in capsys.readouterr().err


def test_two_process_accelerate_ranks_stay_identical(photo_dir, tmp_path):
    recipe = write_recipe(tmp_path / "ddp.yaml", photo_dir, tmp_path / "out",
                          train={"steps": 3, "ckpt_every": 0, "log_every": 1, "save_rank_states": True})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no GPU: accelerate falls back to gloo on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gq_plugin.lab.cli", "train", str(recipe), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "out" / "rank0.pt")
    r1 = torch.load(tmp_path / "out" / "rank1.pt")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert r0["gq_quantizer.tdc.num_steps"].item() == 3
    assert r0["gq_quantizer.tdc.lam_global"].item() != 1.0


def test_vanilla_kl_training_logs_group_rates(tmp_path, photo_dir):
    """The vanilla (quantizer.name=kl) trainer logs the rates it computes (last_rates was never read)."""
    out = tmp_path / "kl"
    recipe = write_recipe(tmp_path / "kl.yaml", photo_dir, out, quantizer={"name": "kl", "weight": 1e-6},
                          train={"steps": 2, "log_every": 1, "ckpt_every": 0}, loss={"lpips": 0.0})
    assert gq_main(["train", str(recipe), "--quiet"]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logs] == [1, 2]
    for e in logs:
        assert 0 < e["bits-min"] <= e["bits-mean"] <= e["bits-max"]
    assert (out / "rates_hist.png").stat().st_size > 1000
