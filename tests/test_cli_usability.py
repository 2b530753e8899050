"""What a newcomer meets first: help texts, error messages, diagnose on patched models, table notes,
the one-time kernel build message."""

import argparse
import math

import pytest
import torch

from gq_plugin.lab.cli import build_parser
from gq_plugin.lab.cli import main as gq_main


def _subparsers(p):
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield name, sp
                for sub in _subparsers(sp):
                    yield f"{name} {sub[0]}", sub[1]


def test_every_option_and_argument_has_help():
    missing = []
    for name, sp in _subparsers(build_parser()):
        for a in sp._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not a.help:
                missing.append(f"gq {name}: {a.dest}")
    assert missing == []
    assert {n for n, _ in _subparsers(build_parser())} >= {"train", "eval", "diagnose", "data", "data fetch", "data list", "encode",
                                                           "decode", "tokenize", "recipes", "demo"}


def test_data_help_lists_fetch_and_list(capsys):
    with pytest.raises(SystemExit) as e:
        gq_main(["data", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "fetch" in out and "list" in out and "rest" not in out
    assert gq_main(["data", "list"]) == 0
    assert "small" in capsys.readouterr().out


@pytest.mark.parametrize("argv,what", [
    (["diagnose", "runs/no_such_run/final", "--quiet"], "MODEL_DIR"),
    (["eval", "tiny_cpu", "runs/no_such_run/final", "--quiet"], "CKPT"),
    (["encode", "x.png", "--model", "runs/no_such_run/final", "-o", "x.gqt"], "--model"),
    (["tokenize", "runs/no_such_run/final", ".", "--out", "tok", "--quiet"], "MODEL"),
])
def test_missing_model_errors_name_what_the_user_typed(argv, what, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gq_main(argv) == 2
    err = capsys.readouterr().err
    assert f"{what} 'runs/no_such_run/final' is not a directory" in err
    assert "runs/demo/final" in err  # where the demo's checkpoint is
    assert "model.pretrained" not in err


def test_model_dir_without_config_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert gq_main(["diagnose", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "holds no model: expected config.json" in capsys.readouterr().err


def _micro_vae():
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                         mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)


def test_diagnose_measures_a_patched_models_own_setting():
    from gq_plugin.adapters import is_patched, patch_autoencoder_kl
    from gq_plugin.lab.diagnose import diagnose, format_report
    from gq_plugin.quantizer import GaussianQuantizer
    from gq_plugin.lab.metrics import psnr

    torch.manual_seed(1)
    imgs = torch.rand(4, 3, 16, 16) * 2 - 1
    vae = _micro_vae().eval()
    plain = diagnose(vae, imgs, progress=False)
    assert plain["measured"]["setting"] == "recommended"
    assert (plain["measured"]["codebook_size"], plain["measured"]["codebook_dim"]) == (
        plain["recommended"]["codebook_size"], plain["recommended"]["codebook_dim"])
    patch_autoencoder_kl(vae, K=4, m=1)  # deliberately coarse: 2 bits per channel
    vae.gq_quantizer.tdc.lam_global.fill_(3.0)
    res = diagnose(vae, imgs, progress=False)
    assert res["measured"]["setting"] == "model"
    assert (res["measured"]["codebook_size"], res["measured"]["codebook_dim"]) == (4, 1)
    assert res["recommended"] == plain["recommended"]  # the recommendation depends on the rates only
    assert res["measured"]["psnr_continuous"] == pytest.approx(plain["measured"]["psnr_continuous"], abs=1e-4)
    # the measured GQ PSNR is that of the model's own quantizer (reference computation)
    with torch.no_grad():
        post = vae.encode(imgs).latent_dist
        q = GaussianQuantizer(4, 4, 1, accept_image_fmap=True).eval()
        z_hat, _ = q.quantize(post.mean, post.logvar)
        ref = float(psnr(imgs, vae.decode(z_hat).sample.clamp(-1, 1)).mean())
    assert res["measured"]["psnr_gq"] == pytest.approx(ref, abs=1e-4)
    assert res["measured"]["psnr_gq"] != pytest.approx(plain["measured"]["psnr_gq"], abs=1e-3)
    assert "Measured with the model's own setting: K = 2^2 (4), m = 1" in format_report(res)
    assert is_patched(vae) and vae.gq_quantizer.codebook_size == 4 and vae.gq_quantizer.tdc.lam_global.item() == 3.0


def test_table_says_why_ms_ssim_is_na():
    from gq_plugin.lab.evaluate import format_table

    row = {"PSNR": 20.0, "SSIM": 0.7, "MS-SSIM": math.nan}
    res = {"continuous": dict(row), "quantized": dict(row), "info": {"image_size": [64, 64]}}
    names = {"continuous": "continuous", "quantized": "GQ"}
    t = format_table(res, names)
    assert "| n/a |" in t
    assert t.splitlines()[-1] == "MS-SSIM n/a: it needs images of at least 161 px per side (5 scales of an 11-px window) (these are 64x64)."
    res["continuous"]["MS-SSIM"] = res["quantized"]["MS-SSIM"] = 0.9
    assert "MS-SSIM n/a" not in format_table(res, names)


def test_kernel_build_is_announced_once_per_cache(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    from gq_plugin.search import kernels

    built = []
    monkeypatch.setenv("GQ_KERNELS_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kw: built.append((name, kw["build_directory"])) or "module")
    assert kernels._build("cpu") == "module"
    name, build_dir = built[0]
    err = capsys.readouterr().err
    assert err.count("building the fused CPU search kernel, once, ~15 s") == 1 and build_dir in err
    (tmp_path / name / f"{name}.so").write_bytes(b"")  # what a finished build leaves
    assert kernels._build("cpu") == "module"
    assert capsys.readouterr().err == ""
