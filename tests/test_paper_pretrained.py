"""benchmarks/paper/pretrained.py (the from-pretrained protocol, issue #13) at --scale smoke."""

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
SCRIPT = REPO / "benchmarks" / "paper" / "pretrained.py"


def _modules():
    sys.path.insert(0, str(REPO / "benchmarks" / "paper"))
    try:
        import pretrained
        import report_pretrained
    finally:
        sys.path.pop(0)
    return pretrained, report_pretrained


def test_plan_spends_equal_bits_on_every_quantized_row():
    pretrained, _ = _modules()
    finetunes, rows = pretrained.plan("tiny")
    C = pretrained.SCALES["tiny"]["model"]["latent_channels"]
    assert C == pretrained.C == 6 and pretrained.SCALES["tiny"]["steps"] >= 1200
    bits = {}
    for r, sp in rows.items():
        if sp["kind"] == "gq":
            bits[r] = (C // sp["m"]) * math.log2(sp["K"])
        elif sp["kind"] == "tokenbridge":
            bits[r] = sp["bits"] * C
        elif sp["kind"] == "baseline":
            q = finetunes[sp["train"]]
            bits[r] = math.log2(math.prod(q["levels"])) if "levels" in q else math.log2(q["codebook_size"])
    assert set(bits.values()) == {12.0}, bits
    assert {"pre+gq", "tdc+gq", "tdc-ref+gq", "vanilla-fixed+gq", "vanilla-matched+gq", "vq", "fsq", "lfq", "bsq",
            "tokenbridge-pre", "tokenbridge-tdc", "tokenbridge-vanilla-fixed"} <= set(bits)
    # the paper's vanilla keeps the pretraining's fixed KL weight; the rate-matched one only moves lam
    assert finetunes["vanilla-fixed"] == {"name": "kl", "weight": pretrained.SCALES["tiny"]["kl_weight"]}
    assert finetunes["vanilla-matched"]["lam_max_range"] == [1.0, 1.0] and finetunes["tdc"]["tdc_rule"] == "band"
    assert finetunes["tdc"]["tdc_hinge"] == 0.0  # pinned: the rows were measured with the hinge at log2 K
    # every fine-tune has exactly one row that selects its LR
    for t in finetunes:
        assert sum(1 for sp in rows.values() if sp["train"] == t and sp.get("key")) == 1, t


def test_chosen_lr_is_the_best_seed0_key_row_once_the_grid_is_complete(tmp_path):
    pretrained, report_pretrained = _modules()
    finetunes, rows = pretrained.plan("smoke")
    s = pretrained.SCALES["smoke"]
    for lr, psnr in zip(s["lrs"], (20.0, 21.5)):
        p = pretrained.result_path(tmp_path, "fsq", lr, 0)
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps({"metrics": {"PSNR": psnr}}))
    p = pretrained.result_path(tmp_path, "vq", s["lrs"][0], 0)
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"metrics": {"PSNR": 30.0}}))
    best = report_pretrained.chosen(tmp_path, rows, finetunes, s)
    assert best["fsq"] == s["lrs"][1] and best["vq"] is None and best["tdc"] is None
    assert pretrained.chosen_lr(tmp_path, finetunes, rows, s) == best


@needs_photos
def test_smoke_protocol_end_to_end_resume_and_budget(tmp_path):
    out = tmp_path / "fp"
    # a zero budget trains nothing and still writes the report with every row pending
    cmd0 = [sys.executable, str(SCRIPT), "--scale", "smoke", "--out", str(out), "--budget-min", "0", "--quiet"]
    proc = subprocess.run(cmd0, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "runs").exists() and "*pending*" in (out / "RESULTS.md").read_text()
    cmd = [sys.executable, str(SCRIPT), "--scale", "smoke", "--out", str(out), "--only", "pre+gq,tdc+gq,fsq", "--quiet"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pre = json.loads((out / "runs" / "smoke" / "pretrain" / "train.json").read_text())
    assert pre["quantizer"] == {"name": "kl", "weight": 1e-4} and pre["steps"] == 4
    for lr in (1e-4, 3e-4):  # the LR grid on seed 0, every fine-tune starting from the one pretrained VAE
        for t in ("tdc", "fsq"):
            info = json.loads((out / "runs" / "smoke" / f"{t}-lr{lr:g}-seed0" / "train.json").read_text())
            assert info["pretrained"] == str(Path(pre["checkpoint"]) / "vae") and info["lr"] == lr and info["steps"] == 3
    res = {r: json.loads((out / "results" / r / "seed0.json").read_text()) for r in ("pre+gq", "tdc+gq@lr0.0001", "fsq@lr0.0003")}
    for r, d in res.items():
        assert math.isfinite(d["metrics"]["PSNR"]) and d["bpp"] == pytest.approx(12 / 16), r  # 12 bits per 4x4 pixels
        assert d["protocol"] == "from-pretrained"
    band = res["pre+gq"]["band"]  # rates of the pretrained VAE at K = 2^12, m = 6: 16 crops x 8x8 tokens
    assert (band["target_bits"], band["count"]) == (12.0, 16 * 8 * 8)
    text = (out / "RESULTS.md").read_text()
    assert f"{res['pre+gq']['metrics']['PSNR']:.2f}" in text and "**chosen**" in text
    assert "| tdc-ref | *pending (grid incomplete)* |" in text and "Paper: GQ beats VQ on PSNR: *pending*" in text
    assert "Paper: GQ beats FSQ on PSNR: **" in text  # tdc+gq and fsq both have a chosen LR
    block = (out / "block.md").read_text()
    assert block.startswith("<!-- from-pretrained:begin -->") and "From-pretrained protocol (issue #13)" in block
    # a rerun skips finished trainings and result files
    def stamps():
        return {p: p.stat().st_mtime_ns for p in [*(out / "results").rglob("seed0.json"), *(out / "runs").rglob("train.json")]}

    before = stamps()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stamps() == before


@needs_photos
def test_estimate_projects_every_training():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--scale", "smoke", "--estimate", "--estimate-steps", "1"], check=False,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for name in ("pretrain", "tdc", "tdc-ref", "vanilla-fixed", "vanilla-matched", "vq", "fsq", "lfq", "bsq"):
        assert any(ln.split()[0] == name for ln in lines if ln.strip()), name
    assert "x 4 steps x 1 run(s)" in proc.stdout and "x 3 steps x 2 run(s)" in proc.stdout  # smoke: 1 seed, LR grid of 2
    assert "training total (uncontended projection from CPU time / threads)" in proc.stdout
