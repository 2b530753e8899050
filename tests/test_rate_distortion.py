"""benchmarks/paper/rate_distortion.py: the curve is drawn from the campaigns' result files only."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "paper"))
import rate_distortion as rd  # noqa: E402


def _result(out, campaign, folder, seed, psnr, lpips):
    p = out / "campaigns" / campaign / "results" / folder / f"seed{seed}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"seed": seed, "metrics": {"PSNR": psnr, "LPIPS-alex": lpips}}))


def test_curve_reads_each_rates_campaign_and_keeps_pretrain_seeds_apart(tmp_path):
    for seed in range(3):
        _result(tmp_path, "c8", "vq@lr0.0001", seed, 20.0 + seed, 0.2)
        _result(tmp_path, "c12", "vq@lr0.0001", seed, 22.0 + seed, 0.15)
        _result(tmp_path, "c12", "vq@lr0.0001@ps1", seed, 99.0, 0.9)  # another pretrained VAE: not on the ps0 curve
        _result(tmp_path, "c12", "tdc-ref+gq+cal@lr0.0003", seed, 23.0, 0.1)
    _result(tmp_path, "c12", "tdc-ref+gq+cal-beta0@lr0.0003", 0, 50.0, 0.5)  # another row with the same prefix
    assert rd.main(["--point", "8=c8", "--point", "12=c12", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "rate_distortion.md").read_text()
    assert "| vq | 21.00 ± 1.00 / 0.2000 (3) | 23.00 ± 1.00 / 0.1500 (3) |" in md
    assert "| tdc-ref+gq+cal | *pending* | 23.00 / 0.1000 (3) |" in md
    assert (tmp_path / "rate_distortion.png").stat().st_size > 10_000
    res = rd.collect(tmp_path, {12: "c12"}, ["vq"], pretrain_seed=1)
    assert [r["metrics"]["PSNR"] for r in res["vq"][12]] == [99.0] * 3


def test_bad_points_get_one_clear_line(tmp_path):
    with pytest.raises(SystemExit, match="at least two rates"):
        rd.main(["--point", "8=c8", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="expected BITS=CAMPAIGN"):
        rd.main(["--point", "eight=c8", "--point", "12=c12", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no results under .* for campaign"):
        rd.main(["--point", "8=c8", "--point", "12=c12", "--out", str(tmp_path)])
