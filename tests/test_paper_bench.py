"""benchmarks/paper/run.py --scale smoke: a few rows end to end into a tmp dir (real trainings and evaluations)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from _photos import needs_photos

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("vector_quantize_pytorch")

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "benchmarks" / "paper" / "run.py"


@needs_photos
def test_smoke_rows_end_to_end_and_resume(tmp_path):
    out = tmp_path / "paper"
    cmd = [sys.executable, str(RUN), "--scale", "smoke", "--only", "tdc+gq,fsq,tdc+gq-beta0", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = {r: json.loads((out / "results" / r / "seed0.json").read_text()) for r in ("tdc+gq", "fsq", "tdc+gq-beta0")}
    for r, d in res.items():
        m = d["metrics"]
        assert math.isfinite(m["PSNR"]) and 0 < m["SSIM"] <= 1 and m["LPIPS-alex"] > 0, r
        assert d["bpp"] == pytest.approx(1.0, abs=0.01)  # 16 bits per 4x4 pixels (FSQ: log2 64000)
        assert 0 < d["codebook"]["usage"] <= 1 and d["train_time_s"] > 0 and d["steps"] == 3
    assert res["tdc+gq"]["codebook_size"] == 2**16 and res["fsq"]["codebook_size"] == 8 * 8 * 8 * 5 * 5 * 5
    band = res["tdc+gq"]["band"]  # 16 eval crops x 8x8 tokens x 1 group, band 16 +- 0.5
    assert (band["count"], band["target_bits"], band["tolerance"]) == (16 * 8 * 8, 16.0, 0.5)
    assert band["in_band"] + band["over_budget"] + band["under_budget"] == pytest.approx(1.0)
    assert res["tdc+gq"]["rates"]["m"] == 8 and res["tdc+gq"]["spec"]["beta"] == 1.0 and res["tdc+gq-beta0"]["spec"]["beta"] == 0.0
    # the two GQ rows share one trained model; beta changes the decoding
    assert res["tdc+gq"]["train_time_s"] == res["tdc+gq-beta0"]["train_time_s"]
    text = (out / "RESULTS.md").read_text()
    assert f"{res['tdc+gq']['metrics']['PSNR']:.2f}" in text and f"{res['fsq']['metrics']['PSNR']:.2f}" in text
    assert "*not run yet*" in text and "`vq`" in text  # unselected rows are marked
    assert f"| {100 * band['in_band']:.1f} % | {100 * band['over_budget']:.1f} % | {100 * band['under_budget']:.1f} % |" in text
    assert "27.61" in text and "FD-EffNetLite0" in text and "FID" not in text.replace("rFID", "").replace("**not FID**", "")
    assert "Paper: GQ (TDC + GQ) beats `fsq` on PSNR: **" in text
    # every result records the command that produced it, and RESULTS.md lists it
    assert all(d["command"].endswith("--only tdc+gq,fsq,tdc+gq-beta0 --out " + str(out) + " --quiet") for d in res.values())
    assert f"`{res['fsq']['command']}`" in text
    # code entropy column: the eval histogram's entropy, at most log2 of the number of eval tokens (16 crops x 8x8 tokens)
    ent = res["tdc+gq"]["codebook"]["entropy_bits"]
    assert 0 < ent <= math.log2(16 * 8 * 8) + 1e-9 and f"{ent:.2f}" in text and "code entropy (bits)" in text
    assert "Paper: GQ uses its codebook better than `fsq` (code entropy on the eval set): **" in text
    assert (out / "rates_vanilla_vs_tdc.png").stat().st_size > 1000
    # baseline checkpoints carry their trained quantizer (FSQ projections), which evaluation reloads
    assert (out / "runs" / "smoke" / "fsq-seed0" / "checkpoint-3" / "quantizer.pt").is_file()
    # a rerun skips finished (row, seed) files and trains nothing
    before = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("seed0.json")}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "results").rglob("seed0.json")} == before


def _report():
    sys.path.insert(0, str(REPO / "benchmarks" / "paper"))
    try:
        import report
    finally:
        sys.path.pop(0)
    return report


def _runs(*psnr_by_seed):
    return [{"seed": s, "metrics": {"PSNR": v}, "codebook": {"entropy_bits": v / 2}} for s, v in enumerate(psnr_by_seed)]


def test_compare_is_paired_by_seed():
    report = _report()
    # a is better on both seeds although the seed effect (2 dB) dwarfs the difference: paired -> agrees
    res = {"a": _runs(18.1, 20.1), "b": _runs(18.0, 20.0)}
    sentence, verdict = report.compare("a", "b", res)
    assert verdict is True and "same sign on all 2 seeds: +0.1, +0.1" in sentence and "unpaired: within" in sentence
    assert "paired difference +0.1" in sentence
    # signs disagree -> unresolved, even though the means differ
    res = {"a": _runs(18.5, 19.9), "b": _runs(18.0, 20.0)}
    assert report.compare("a", "b", res)[1] is None
    # lower is better (LPIPS-like) flips the verdict; paths into the result file work
    res = {"a": _runs(1.0, 2.0), "b": _runs(1.5, 2.5)}
    assert report.compare("a", "b", res, higher_better=False)[1] is True
    s, v = report.compare("a", "b", res, key=("codebook", "entropy_bits"))
    assert v is False and "on entropy_bits: 0.75 vs 1" in s
    # one common seed: the verdict follows that seed's difference (not the means: seed 1 is much easier)
    s, v = report.compare("a", "b", {"a": _runs(18.0, 20.0), "b": _runs(18.5)})
    assert v is False and "paired difference -0.5" in s and "one common seed 0, spread unknown" in s
    s, v = report.compare("a", "b", {"a": _runs(18.0), "b": [{"seed": 1, "metrics": {"PSNR": 17.0}}]})
    assert v is True and "difference of the means +1" in s and "no common seed" in s
    assert report.compare("a", "missing", res) is None


def test_conversion_gap_per_seed():
    report = _report()
    res = {"tdc": _runs(18.0, 19.0), "tdc+gq": _runs(17.9, 18.8)}
    gap = report.conversion_gap(res, "tdc")
    assert [g["seed"] for g in gap] == [0, 1]
    assert [round(g["metrics"]["PSNR"], 6) for g in gap] == [-0.1, -0.2]


def _run_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("paper_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_scale_plan_is_the_issue_protocol(tmp_path):
    """--scale full (GPU) is never trained in CI: check its plan and that every training's config builds."""
    run = _run_module()
    trains, rows = run.plan("full")
    s = run.SCALES["full"]
    assert s["size"] == 256 and s["model"]["latent_channels"] == 16 and len(s["model"]["block_out_channels"]) == 4  # f8
    # every quantized row spends 16 bits per token = 0.25 bpp at f8 (the paper's headline)
    for name, spec in rows.items():
        if spec["kind"] == "gq" and spec["group"] != "ksweep":  # the K sweep varies the bits on purpose
            groups = s["model"]["latent_channels"] // spec["m"]
            assert groups * math.log2(spec["K"]) == 16, name
    assert sorted(spec["m"] for spec in rows.values() if spec["group"] == "msweep") == [4, 8]  # + m = 16, the main row
    assert rows["tdc+gq"]["m"] == 16 and rows["tdc+gq"]["K"] == 2**16
    assert {r for r, sp in rows.items() if sp["group"] == "main"} >= {"vanilla", "vanilla+gq", "tdc", "tdc+gq", "vq", "fsq", "lfq", "bsq",
                                                                       "tokenbridge-vanilla", "tokenbridge-tdc"}
    assert {sp["K"] for r, sp in rows.items() if sp["group"] == "ksweep"} == {2**k for k in range(12, 19)}
    assert {r for r, sp in rows.items() if sp["group"] == "alpha"} == {"tdc-a0.25+gq", "tdc-a1+gq"}
    assert rows["tdc+gq-beta0"]["beta"] == 0.0
    # the committed results use the authors' TDC rule; the vanilla row only means "no per-group control" in it
    assert all(q.get("tdc_rule") == "reference" for q in trains.values() if q["name"] == "gq")
    assert trains["vanilla"]["lam_max_range"] == [1.0, 1.0] == trains["vanilla"]["lam_min_range"]
    # the configs validate (bad keys would raise here, not hours into a GPU run)
    for t, q in trains.items():
        cfg = run._load_config(run.recipe("full", q, 0, tmp_path / t, None))
        assert cfg.train.steps == s["steps"] and cfg.data.size == 256 and cfg.quantizer.name == q["name"], t
