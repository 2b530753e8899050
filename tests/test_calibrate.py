"""`gq calibrate`: decoder-only fine-tuning on the GQ codewords of a trained run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from gq_plugin.adapters.diffusers_vae import load_pretrained_gq_vae  # noqa: E402
from gq_plugin.lab.calibrate import CalibrationSettings, calibrate  # noqa: E402
from gq_plugin.lab.cli import main as gq_main  # noqa: E402
from gq_plugin.lab.data import wheel_photos  # noqa: E402

MICRO = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
         "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4, "sample_size": 32,
         "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step micro GQ training run (config.yaml + final/), trained once for the module."""
    d = tmp_path_factory.mktemp("cal")
    photos = d / "photos"
    photos.mkdir()
    for key, path, _ in wheel_photos():
        shutil.copy(path, photos / f"{key}{Path(path).suffix}")
    if len(list(photos.iterdir())) < 6:
        pytest.skip("needs the photos shipped in scikit-image / scikit-learn / pyiqa wheels")
    cfg = {"name": "micro", "seed": 0, "model": {"config": MICRO}, "quantizer": {"name": "gq", "codebook_size": 256, "codebook_dim": 4},
           "loss": {"l1": 1.0, "lpips": 0.1}, "optim": {"lr": 1e-3},
           "train": {"steps": 3, "batch_size": 4, "log_every": 1, "output_dir": str(d / "run")},
           "data": {"root": str(photos), "size": 32, "resize": 64, "crops_per_image": 2, "eval_fraction": 0.3},
           "eval": {"batch_size": 8, "max_images": 8, "grid_images": 4, "distribution": False}}
    (d / "micro.yaml").write_text(yaml.safe_dump(cfg))
    assert gq_main(["train", str(d / "micro.yaml"), "--quiet"]) == 0
    return d / "run"


def _state(path):
    return load_pretrained_gq_vae(str(Path(path) / "vae")).state_dict()


def test_only_the_decoder_changes(run, tmp_path):
    out = tmp_path / "cal"
    res = calibrate(run, out, ["steps=3", "ckpt_every=2", "log_every=1"], progress=False)
    assert Path(res["checkpoint"]) == out / "checkpoint-3" and (out / "final").resolve().name == "checkpoint-3"
    before, after = _state(run / "final"), _state(out / "final")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    # encoder weights, codebook and TDC buffers are bit-identical; every decoder conv moved
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("decoder."))
    assert {k for k in before if k.startswith("decoder.") and k.endswith("conv_out.weight")} <= changed
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logs] == [1, 2, 3] and all(e["lr"] == pytest.approx(3e-4) for e in logs)  # 0.3 x the run's optim.lr
    # the reconstruction loss: per-image sum of l1 + 0.1 lpips over 3x32x32 elements
    assert logs[-1]["rec"] == pytest.approx((logs[-1]["l1"] + 0.1 * logs[-1]["lpips"]) * 3 * 32 * 32, rel=1e-4)
    meta = json.loads((out / "calibrate.json").read_text())
    assert meta["steps"] == 3 and meta["batch_size"] == 4 and meta["source"].endswith("final")


def test_tokens_are_those_of_the_source(run, tmp_path):
    """The GQ indices of the calibrated model equal the source's on the same images (encoder and codebook frozen)."""
    calibrate(run, tmp_path / "cal", ["steps=2", "ckpt_every=0"], progress=False)
    a, b = (load_pretrained_gq_vae(str(p / "vae")).eval() for p in (run / "final", tmp_path / "cal" / "final"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ia, ib = a.encode(x).latent_dist.quantize()[1], b.encode(x).latent_dist.quantize()[1]
        assert torch.equal(ia, ib)
        assert not torch.equal(a.decode(a.encode(x).latent_dist.quantize()[0]).sample, b.decode(b.encode(x).latent_dist.quantize()[0]).sample)


def test_resume_matches_an_uninterrupted_run(run, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    calibrate(run, full, ["steps=4", "ckpt_every=2"], progress=False)
    calibrate(run, part, ["steps=4", "ckpt_every=2"], progress=False)
    shutil.rmtree(part / "checkpoint-4")  # as if killed after the step-2 checkpoint
    (part / "final").unlink()
    with pytest.raises(ValueError, match="already holds checkpoint-2: pass --resume latest"):
        calibrate(run, part, ["steps=4", "ckpt_every=2"], progress=False)
    calibrate(run, part, ["steps=4", "ckpt_every=2"], resume="latest", progress=False)
    a, b = _state(full / "final"), _state(part / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"other settings \(lr differ\)"):
        calibrate(run, part, ["steps=6", "lr=1e-2"], resume="latest", progress=False)


def test_the_result_is_a_run_other_commands_accept(run, tmp_path):
    out = tmp_path / "cal"
    assert gq_main(["calibrate", str(run / "final"), "--out", str(out), "steps=1", "--quiet"]) == 0  # a checkpoint dir as RUN
    assert gq_main(["eval", str(out / "config.yaml"), str(out / "final"), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["info"]["n_images"] >= 1 and ev["quantized"]["PSNR"] > 5 and ev["info"]["bpp"] == pytest.approx(2.0)
    img = tmp_path / "img.png"
    shutil.copy(next(p for p in (run.parent / "photos").iterdir() if p.suffix in (".png", ".jpg")), img)
    assert gq_main(["encode", str(img), "--model", str(out / "final"), "-o", str(tmp_path / "t.gqt"), "--size", "32"]) == 0


@pytest.mark.parametrize("args, message", [
    (["steps=0"], "steps must be >= 1"),
    (["lr=-1"], "lr must be > 0"),
    (["stepz=3"], "unknown calibration setting 'stepz'"),
    (["steps"], "is not key=value"),
    (["steps=2.5"], "steps=.2.5. is not a whole number"),
    (["lr_scale=0"], "lr_scale must be finite and > 0"),
    (["lr_scale=x"], "lr_scale=.x. is not a number"),
])
def test_bad_settings_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        CalibrationSettings.from_overrides(args)


def test_bad_runs_are_refused(run, tmp_path, capsys):
    assert gq_main(["calibrate", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gq calibrate: error: RUN") and "is not a directory" in err
    with pytest.raises(ValueError, match="is not a directory"):
        calibrate(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no config.yaml"):
        calibrate(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(ValueError, match="must differ from RUN"):
        calibrate(run, run)
    vq = tmp_path / "vq"
    shutil.copytree(run, vq, symlinks=True)
    cfg = yaml.safe_load((vq / "config.yaml").read_text())
    cfg["quantizer"]["name"] = "vq"
    (vq / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="trained with quantizer 'vq': calibration needs a GQ model"):
        calibrate(vq, tmp_path / "o")


def test_cli_takes_key_values_after_options_and_refuses_other_extras(tmp_path, capsys):
    # key=value after --out joins the overrides (a bad one is then named by the settings check)
    assert gq_main(["calibrate", str(tmp_path), "--out", str(tmp_path / "o"), "stepz=3"]) == 2
    assert "unknown calibration setting 'stepz'" in capsys.readouterr().err
    for argv in (["calibrate", str(tmp_path), "--out", str(tmp_path / "o"), "--bogus"], ["data", "list", "a=b"]):
        with pytest.raises(SystemExit) as e:
            gq_main(argv)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_lr_is_a_fraction_of_the_runs_unless_given(run, tmp_path):
    """lr defaults to lr_scale (0.3) x the run's optim.lr (1e-3 here); an explicit lr wins over lr_scale."""
    for args, want in ((["lr_scale=0.5"], 5e-4), (["lr=2e-4", "lr_scale=0.5"], 2e-4)):
        out = tmp_path / f"cal{want:g}"
        calibrate(run, out, ["steps=1", "ckpt_every=0", *args], progress=False)
        assert json.loads((out / "calibrate.json").read_text())["lr"] == pytest.approx(want)
