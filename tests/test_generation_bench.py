"""benchmarks/generation: discovery of the protocol's tokenizers, one result file per (tokenizer, seed), resume, report."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("x_transformers")
pytest.importorskip("efficientnet_lite_pytorch")

from _tokenizers import small_photos, train_tokenizer  # noqa: E402

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "generation"
sys.path.insert(0, str(BENCH))

import report_generation as report  # noqa: E402  (unique names: benchmarks/paper has run.py and report.py)
import run_generation as gen  # noqa: E402


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    """A from-pretrained-like runs/ folder: tdc (GQ) and vq at seed 0, vq also at another LR and seed 1."""
    root = tmp_path_factory.mktemp("fp")
    photos = root / "photos"
    photos.mkdir()
    if small_photos(photos, n=12) < 10:
        pytest.skip("needs the photos shipped in scikit-image / scikit-learn / pyiqa wheels")
    runs = root / "runs" / "tiny"
    for name, q, lr, seed in (("tdc", {"name": "gq", "codebook_size": 64, "codebook_dim": 4}, 3e-4, 0),
                              ("vq", {"name": "vq", "codebook_size": 64}, 1e-4, 0), ("vq", {"name": "vq", "codebook_size": 64}, 3e-4, 0),
                              ("vq", {"name": "vq", "codebook_size": 64}, 1e-4, 1)):
        d = runs / f"{name}-lr{lr:g}-seed{seed}"
        train_tokenizer(d, photos, q)
        (d / "train.json").write_text(json.dumps({"train": name, "seed": seed, "lr": lr}))
    res = root / "results" / "vq@lr0.0003"
    res.mkdir(parents=True)
    (res / "seed0.json").write_text(json.dumps({"metrics": {"PSNR": 20.0}}))
    (root / "results" / "vq@lr0.0001").mkdir()
    (root / "results" / "vq@lr0.0001" / "seed0.json").write_text(json.dumps({"metrics": {"PSNR": 19.0}}))
    return root, runs, photos


def test_discover_picks_seed0_and_the_protocols_lr(protocol):
    root, runs, _ = protocol
    found = gen.discover(runs, ["tdc", "vq", "fsq"], 0, root / "results")
    assert sorted(found) == ["tdc+gq", "vq"]
    assert found["vq"]["lr"] == 3e-4 and found["vq"]["lr_choice"] == "best seed-0 PSNR of the protocol"
    assert gen.discover(runs, ["vq"], 0, root / "results", {"vq": "1e-4"})["vq"]["lr"] == 1e-4
    with pytest.raises(ValueError, match="no vq run at that LR"):
        gen.discover(runs, ["vq"], 0, None, {"vq": "1e-2"})


def test_benchmark_writes_results_resumes_and_reports(protocol, tmp_path):
    root, runs, photos = protocol
    argv = ["--tokenizers-root", str(runs), "--scale", "smoke", "--seeds", "2", "--out", str(tmp_path), "--data-root", str(photos), "--quiet"]
    assert gen.main(argv) == 0
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "results").glob("*/seed*.json"))
    assert files == ["results/tdc+gq/seed0.json", "results/tdc+gq/seed1.json", "results/vq/seed0.json", "results/vq/seed1.json"]
    r = json.loads((tmp_path / "results" / "vq" / "seed1.json").read_text())
    assert (r["tokenizer"], r["seed"]) == ("vq", 1)
    m = r["metrics"]
    assert set(m) == {"bits_per_image", "bits_per_token", "FD", "KID", "KID_std", "recon_FD", "recon_KID"}
    assert m["bits_per_image"] == pytest.approx(m["bits_per_token"] * 64) and r["raw_bits_per_image"] == pytest.approx(64 * 6)
    assert r["held_images"] == r["samples"] > 0 and (tmp_path / "grids" / "vq-seed1.png").is_file()
    gq = json.loads((tmp_path / "results" / "tdc+gq" / "seed0.json").read_text())
    assert gq["tokenizer_info"]["token_shape"] == [1, 8, 8] and gq["tokenizer_info"]["quantizer"] == "gq"
    # the held-out NLL is the prior's own measure on the held-out tokens
    from gq_plugin.lab.prior import evaluate_nll, load_prior
    from gq_plugin.lab.prior.train import _sequences, load_token_folder

    prior, layout, _ = load_prior(tmp_path / "runs" / "smoke" / "priors" / "vq-seed1")
    held = load_token_folder(tmp_path / "runs" / "smoke" / "tokens" / "vq" / "held")
    assert evaluate_nll(prior, _sequences(held, layout), layout)["bits_per_image"] == pytest.approx(m["bits_per_image"], rel=1e-6)

    text = (tmp_path / "RESULTS.md").read_text()
    d = gq["metrics"]["FD"] - json.loads((tmp_path / "results" / "vq" / "seed0.json").read_text())["metrics"]["FD"]
    assert f"seed 0: {d:+.2f}" in text and "tdc+gq minus vq" in text and "![vq samples](grids/vq-seed0.png)" in text
    assert "(generation.png)" in text and (tmp_path / "generation.png").stat().st_size > 10_000

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").glob("*/seed*.json")}
    assert gen.main(argv) == 0  # resumable: nothing is redone
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "results").glob("*/seed*.json")} == before
    assert report.write_report(tmp_path) and (tmp_path / "RESULTS.md").read_text() == text
