"""benchmarks/paper/pretrained.py (the from-pretrained protocol, issue #13) at --scale smoke."""

import argparse
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
    bits, own = {}, {}
    for r, sp in rows.items():
        b = own if sp.get("own_rate") else bits  # TokenBridge's own rate: a pair of its own, not at equal bits
        if sp["kind"] == "gq":
            b[r] = (C // sp["m"]) * math.log2(sp["K"])
        elif sp["kind"] == "tokenbridge":
            b[r] = sp["bits"] * C
        elif sp["kind"] == "baseline":
            q = finetunes[sp["train"]]
            b[r] = math.log2(math.prod(q["levels"])) if "levels" in q else math.log2(q["codebook_size"])
    assert set(bits.values()) == {12.0}, bits
    # item 5 at TokenBridge's own 6 bits per channel: TDC per channel with K = 2^6 against the vanilla fine-tune and
    # the pretrained VAE, every one through TokenBridge at 6 bits x 6 channels
    assert own == {r: 36.0 for r in ("tdc-tb6+gq", "tdc-ref-tb6+gq", "tokenbridge-b6-pre", "tokenbridge-b6-vanilla-fixed",
                                     "tokenbridge-b6-tdc-tb6", "tokenbridge-b6-tdc-ref-tb6")}
    ref6 = pretrained.quantizer_of(finetunes, "tdc-ref-tb6")
    assert (ref6["codebook_size"], ref6["codebook_dim"], ref6["tdc_rule"]) == (64, 1, "reference") and pretrained.lr_owner(finetunes, "tdc-ref-tb6") == "tdc-ref"
    assert [rows[f"tokenbridge-b6-{t}"]["train"] for t in ("pre", "vanilla-fixed", "tdc-tb6")] == ["pretrain", "vanilla-fixed", "tdc-tb6"]
    tb6 = pretrained.quantizer_of(finetunes, "tdc-tb6")
    assert (tb6["codebook_size"], tb6["codebook_dim"], tb6["tdc_rule"]) == (64, 1, "band") and pretrained.lr_owner(finetunes, "tdc-tb6") == "tdc"
    assert {"pre+gq", "tdc+gq", "tdc-ref+gq", "vanilla-fixed+gq", "vanilla-matched+gq", "vq", "fsq", "lfq", "bsq",
            "tokenbridge-pre", "tokenbridge-tdc", "tokenbridge-vanilla-fixed"} <= set(bits)
    # the paper's vanilla keeps the pretraining's fixed KL weight; the rate-matched one only moves lam
    assert finetunes["vanilla-fixed"] == {"name": "kl", "weight": pretrained.SCALES["tiny"]["kl_weight"]}
    assert finetunes["vanilla-matched"]["lam_max_range"] == [1.0, 1.0] and finetunes["tdc"]["tdc_rule"] == "band"
    assert finetunes["tdc"]["tdc_hinge"] == 0.0  # pinned: the rows were measured with the hinge at log2 K
    # every fine-tune has exactly one row that selects its LR, or takes another fine-tune's (calibration)
    for t in finetunes:
        n_key = sum(1 for sp in rows.values() if sp["train"] == t and sp.get("key"))
        assert n_key == (0 if "lr_of" in finetunes[t] else 1), t
    # calibration at equal total steps: TDC for steps - cal_steps, then cal_steps decoder steps on the GQ codewords
    cal = pretrained.SCALES["tiny"]["cal_steps"]
    assert cal == 200
    for t in ("tdc", "tdc-ref"):
        assert finetunes[f"{t}-precal"] == {**finetunes[t], "lr_of": t, "steps_less": cal}
        assert finetunes[f"{t}+cal"] == {"calibrate": f"{t}-precal", "cal_steps": cal, "lr_of": t}
        assert pretrained.quantizer_of(finetunes, f"{t}+cal") == finetunes[t]
        assert rows[f"{t}+gq+cal"]["train"] == f"{t}+cal" and rows[f"{t}+gq-precal"]["train"] == f"{t}-precal"
        assert bits[f"{t}+gq+cal"] == 12.0
    # item 2's candidate: charge only the rate above log2 K, library's default hinge, at the band rule's LR
    spend = pretrained.quantizer_of(finetunes, "tdc-spend+cal")
    assert spend["tdc_spend"] is True and spend["tdc_rule"] == "band" and "tdc_hinge" not in spend
    assert pretrained.lr_owner(finetunes, "tdc-spend+cal") == pretrained.lr_owner(finetunes, "tdc-spend-precal") == "tdc"
    assert rows["tdc-spend+gq+cal"]["train"] == "tdc-spend+cal" and bits["tdc-spend+gq+cal"] == 12.0
    # item 4: beta is an eval-time lever on the calibrated checkpoints; m = 3 at equal bits is a fine-tune of its own
    assert {rows[f"tdc-ref+gq+cal-beta{b}"]["beta"] for b in ("0", "0.5", "2")} == {0.0, 0.5, 2.0}
    assert rows["tdc+gq+cal-beta2"]["train"] == "tdc+cal" and bits["tdc+gq+cal-beta0"] == 12.0
    m3 = pretrained.quantizer_of(finetunes, "tdc-ref-m3+cal")
    assert (m3["codebook_size"], m3["codebook_dim"], m3["tdc_rule"]) == (64, 3, "reference")
    assert (rows["tdc-ref-m3+gq+cal"]["K"], rows["tdc-ref-m3+gq+cal"]["m"]) == (64, 3) and bits["tdc-ref-m3+gq+cal"] == 12.0
    # item 5: TDC on what TokenBridge quantizes (per channel, 2 bits each), judged by TokenBridge on that fine-tune
    tb = pretrained.quantizer_of(finetunes, "tdc-tb")
    assert (tb["codebook_size"], tb["codebook_dim"], tb["tdc_rule"]) == (4, 1, "band") and pretrained.lr_owner(finetunes, "tdc-tb") == "tdc"
    assert rows["tokenbridge-tdc-tb"]["train"] == "tdc-tb" and bits["tokenbridge-tdc-tb"] == bits["tdc-tb+gq"] == 12.0
    # and with the authors' rule, at its LR
    ref = pretrained.quantizer_of(finetunes, "tdc-ref-tb")
    assert (ref["codebook_size"], ref["codebook_dim"], ref["tdc_rule"]) == (4, 1, "reference") and pretrained.lr_owner(finetunes, "tdc-ref-tb") == "tdc-ref"
    assert rows["tokenbridge-tdc-ref-tb"]["train"] == "tdc-ref-tb" and bits["tokenbridge-tdc-ref-tb"] == bits["tdc-ref-tb+gq"] == 12.0


def test_axes_name_runs_and_results_and_keep_the_old_names(tmp_path):
    pretrained, report_pretrained = _modules()
    assert pretrained.point_tag(0, 1200, 1200) == "" and pretrained.point_tag(1, 4800, 1200) == "@ps1@steps4800"
    assert pretrained.result_path(tmp_path, "vq", 1e-4, 2) == tmp_path / "results" / "vq@lr0.0001" / "seed2.json"  # the committed files
    assert pretrained.result_path(tmp_path, "pre", None, 0, "@ps1") == tmp_path / "results" / "pre@ps1" / "seed0.json"
    args = type("A", (), {"out": str(tmp_path), "scale": "tiny"})()
    assert pretrained.run_dir(args, "pretrain", 0, 1e-3, 0, 1200).name == "pretrain"  # the layout other tools read
    assert pretrained.run_dir(args, "pretrain", 0, 1e-3, 2, 1200).name == "pretrain-ps2"
    assert pretrained.run_dir(args, "tdc+cal", 1, 3e-4, 0, 1200).name == "tdc+cal-lr0.0003-seed1"
    assert pretrained.run_dir(args, "vq", 0, 1e-4, 1, 4800).name == "vq-lr0.0001-seed0-ps1-steps4800"
    for bad in (["--pretrain-seeds", "a"], ["--steps", "100"], ["--campaign", "../x"]):
        with pytest.raises(SystemExit):
            pretrained.main(["--scale", "tiny", "--report-only", "--out", str(tmp_path), *bad])


def test_default_out_keeps_each_backbone_in_its_own_folder():
    pretrained, _ = _modules()
    here = SCRIPT.parent
    # tiny and its rate-distortion scales share one folder (one pretrained VAE, one LR grid); the headline backbone
    # must not write its LR grid into tiny's results/
    assert {pretrained.default_out(s) for s in ("tiny", "tiny-b8", "tiny-b16")} == {here / "from_pretrained"}
    assert pretrained.default_out("headline") == here / "from_pretrained_headline"
    assert pretrained.default_out("smoke") != pretrained.default_out("smoke-headline")


def test_only_tiny_protocol_reports_are_summarised_in_the_paper_results(tmp_path):
    """benchmarks/paper/RESULTS.md embeds tiny's block; a campaign or a scale in its own default folder keeps its tables."""
    from types import SimpleNamespace

    pretrained, _ = _modules()

    def args(scale, out=None, campaign=None):
        return SimpleNamespace(scale=scale, out=str(out or pretrained.default_out(scale)), campaign=campaign)

    assert pretrained.summarises(args("tiny"))
    assert not pretrained.summarises(args("tiny", campaign="h26"))
    assert not pretrained.summarises(args("tiny-b16", campaign="h26-b16"))
    assert not pretrained.summarises(args("headline"))
    assert pretrained.summarises(args("headline", out=tmp_path / "elsewhere"))


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
    best = pretrained.chosen_lr(tmp_path, finetunes, rows, s)
    assert best["fsq"] == s["lrs"][1] and best["vq"] is None and best["tdc"] is None
    for lr, psnr in zip(s["lrs"], (22.0, 21.0)):
        p = pretrained.result_path(tmp_path, "tdc+gq", lr, 0)
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps({"metrics": {"PSNR": psnr}}))
    best = pretrained.chosen_lr(tmp_path, finetunes, rows, s)
    assert best["tdc"] == best["tdc-precal"] == best["tdc+cal"] == s["lrs"][0] and best["tdc-ref+cal"] is None


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


@needs_photos
def test_campaign_with_two_pretrained_vaes_and_calibration(tmp_path):
    """A campaign: LRs from the default campaign's grid, one VAE per pretrain seed, calibrated TDC vs VQ at equal total steps."""
    pretrained, _ = _modules()
    out = tmp_path / "fp"
    s = pretrained.SCALES["smoke"]
    for row, psnrs in (("tdc+gq", (20.0, 21.0)), ("vq", (22.0, 19.0))):  # the default campaign's seed-0 grid picks tdc 3e-4, vq 1e-4
        for lr, v in zip(s["lrs"], psnrs):
            p = pretrained.result_path(out, row, lr, 0)
            p.parent.mkdir(parents=True)
            p.write_text(json.dumps({"metrics": {"PSNR": v}}))
    cmd = [sys.executable, str(SCRIPT), "--scale", "smoke", "--out", str(out), "--campaign", "c1", "--pretrain-seeds", "0,1",
           "--only", "pre,tdc+gq-precal,tdc+gq+cal,vq,tokenbridge-b6-tdc-tb6", "--quiet"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = out / "runs" / "smoke"
    pre = {ps: json.loads((runs / d / "train.json").read_text()) for ps, d in ((0, "pretrain"), (1, "pretrain-ps1"))}
    assert pre[1]["pretrain_seed"] == 1 and pre[0]["checkpoint"] != pre[1]["checkpoint"]
    for ps, suffix in ((0, ""), (1, "-ps1")):
        precal = json.loads((runs / f"tdc-precal-lr0.0003-seed0{suffix}" / "train.json").read_text())
        cal = json.loads((runs / f"tdc+cal-lr0.0003-seed0{suffix}" / "train.json").read_text())
        assert precal["steps"] == s["steps"] - s["cal_steps"] and precal["pretrained"] == str(Path(pre[ps]["checkpoint"]) / "vae")
        assert cal["steps"] == s["steps"] and cal["calibration_steps"] == 1 and cal["calibrated"] == precal["checkpoint"]
        tag = "@ps1" if ps else ""
        res = json.loads((out / "campaigns" / "c1" / "results" / f"tdc+gq+cal@lr0.0003{tag}" / "seed0.json").read_text())
        assert (res["pretrain_seed"], res["steps"], res["calibration_steps"], res["campaign"]) == (ps, s["steps"], 1, "c1")
        vq = json.loads((out / "campaigns" / "c1" / "results" / f"vq@lr0.0001{tag}" / "seed0.json").read_text())
        assert (vq["pretrain_seed"], vq["steps"]) == (ps, s["steps"]) and math.isfinite(vq["metrics"]["PSNR"])
        # TokenBridge at its own 6 bits per channel on a per-channel TDC fine-tune with K = 2^6 (at TDC's LR)
        tb6 = json.loads((out / "campaigns" / "c1" / "results" / f"tokenbridge-b6-tdc-tb6@lr0.0003{tag}" / "seed0.json").read_text())
        assert tb6["bpp"] == pytest.approx(6 * 6 / 16) and tb6["codebook_size"] == 64 and math.isfinite(tb6["metrics"]["PSNR"])
        tinfo = json.loads((runs / f"tdc-tb6-lr0.0003-seed0{suffix}" / "train.json").read_text())
        assert (tinfo["quantizer"]["codebook_size"], tinfo["quantizer"]["codebook_dim"]) == (64, 1)
    text = (out / "campaigns" / "c1" / "RESULTS.md").read_text()
    assert "## Pretrain seed 1, 3 steps: rows at the chosen LRs" in text and "campaign `c1`" in text
    assert "Calibration (band rule): GQ + calibration beats VQ on PSNR at equal total steps: **" in text
    assert not (out / "RESULTS.md").exists() and not (out / "results" / "vq@lr0.0001" / "seed1.json").exists()


def test_headline_plan_spends_16_bits_on_every_quantized_row():
    """--scale headline: f8, 16 latent channels, K = 2^16, m = 16 (0.25 bpp); VQ with its large-codebook options, SimVQ."""
    pretrained, _ = _modules()
    s = pretrained.SCALES["headline"]
    finetunes, rows = pretrained.plan("headline")
    assert len(s["model"]["block_out_channels"]) == 4 and s["model"]["latent_channels"] == 16
    r = pretrained.rate_of(s)
    assert (r["K"], r["m"], r["bpp"], r["tb_bits"]) == (2**16, 16, 0.25, 1)
    bits = {}
    for name, sp in rows.items():
        if sp.get("own_rate"):  # TokenBridge at its own 6 bits per channel (96 bits per token), a pair of its own
            assert (sp.get("bits") or math.log2(sp["K"])) == 6, name
        elif sp["kind"] == "gq":
            bits[name] = (16 // sp["m"]) * math.log2(sp["K"])
        elif sp["kind"] == "tokenbridge":
            bits[name] = sp["bits"] * 16
        elif sp["kind"] == "baseline":
            q = finetunes[sp["train"]]
            bits[name] = math.log2(math.prod(q["levels"])) if "levels" in q else math.log2(q["codebook_size"])
    assert {"vq", "vq-plain", "simvq", "fsq", "lfq", "bsq", "tdc+gq", "tdc+gq+cal", "tokenbridge-tdc"} <= set(bits)
    assert all(b == 16.0 for n, b in bits.items() if n != "fsq") and 15.5 < bits["fsq"] <= 16  # [8,8,8,5,5,5] = 64,000 codes
    vq = finetunes["vq"]
    assert vq["lookup_dim"] == 8 and vq["use_cosine_sim"] and vq["rotation_trick"] and vq["kmeans_init"]
    # the other option set for the seed-0 choice: VQ as at 12 bits, at VQ's LR
    assert pretrained.quantizer_of(finetunes, "vq-plain") == {"name": "vq", "codebook_size": 2**16}
    assert pretrained.lr_owner(finetunes, "vq-plain") == "vq" and rows["vq-plain"]["kind"] == "baseline"
    assert pretrained.quantizer_of(finetunes, "vq-kinit") == {**pretrained.quantizer_of(finetunes, "vq"), "kmeans_init_vectors": 2**16}
    assert pretrained.lr_owner(finetunes, "vq-kinit") == "vq" and rows["vq-kinit"]["kind"] == "baseline"
    # dead-code threshold: half the expected hits per code per batch (8 crops x 8x8 tokens / 2^16 codes), which
    # vector-quantize-pytorch >= 1.34 expresses as a ratio of the mean cluster size
    if pretrained.vqp_has_dead_code_ratio():
        assert vq["dead_code_threshold_ratio"] == 0.5 and "threshold_ema_dead_code" not in vq
    else:
        assert vq["threshold_ema_dead_code"] == pytest.approx(0.5 * 8 * 64 / 2**16)
    assert pretrained.plan("tiny")[0]["vq"] == {"name": "vq", "codebook_size": 2**12}  # the committed tiny rows keep plain VQ


@needs_photos
def test_headline_smoke_end_to_end(tmp_path):
    out = tmp_path / "hl"
    cmd = [sys.executable, str(SCRIPT), "--scale", "smoke-headline", "--out", str(out), "--only", "pre+gq,tdc+gq,vq,simvq,fsq,tokenbridge-tdc",
           "--quiet"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in ("pre+gq", "tdc+gq@lr0.0001", "vq@lr0.0001", "simvq@lr0.0003", "fsq@lr0.0001", "tokenbridge-tdc@lr0.0003"):
        d = json.loads((out / "results" / row / "seed0.json").read_text())
        bpp = math.log2(8**3 * 5**3) / 64 if row.startswith("fsq") else 16 / 64  # FSQ [8,8,8,5,5,5]: 64,000 codes
        assert d["bpp"] == pytest.approx(bpp) and math.isfinite(d["metrics"]["PSNR"]), row
        if row.split("@")[0] in ("pre+gq", "tdc+gq", "vq", "simvq"):
            assert d["codebook_size"] == 2**16, row
    text = (out / "RESULTS.md").read_text()
    assert "16 bits per token" in text and "SimVQ 2^16" in text and "over budget (R_g > 16.5)" in text
    assert "Paper: GQ beats SIMVQ on PSNR: **" in text


@pytest.mark.parametrize("scale, bits", [("tiny-b8", 8), ("tiny-b16", 16)])
def test_rate_distortion_scales_share_tinys_pretrained_vae_at_other_bits(scale, bits, tmp_path):
    """Issue #26 item 6: tiny's backbone and pretrained VAE at 8 and 16 bits per token, every quantized row at that rate."""
    pretrained, _ = _modules()
    s = pretrained.SCALES[scale]
    assert s["model"] == pretrained.SCALES["tiny"]["model"] and s["pretrain_of"] == "tiny"
    finetunes, rows = pretrained.plan(scale)
    got = {}
    for name, sp in rows.items():
        if sp["kind"] == "gq":
            got[name] = (6 // sp["m"]) * math.log2(sp["K"])
        elif sp["kind"] == "baseline":
            q = finetunes[sp["train"]]
            got[name] = math.log2(math.prod(q["levels"])) if "levels" in q else math.log2(q["codebook_size"])
    assert {"tdc+gq+cal", "tdc-ref+gq+cal", "vq", "fsq"} <= set(got)
    assert all(b == bits for n, b in got.items() if n != "fsq") and bits - 0.1 < got["fsq"] <= bits, got
    assert not [r for r in rows if r.startswith("tokenbridge")]  # no whole number of bits per channel at 8 or 16 bits over 6
    assert bool(finetunes["vq"].get("lookup_dim")) == (bits == 16)  # 2^16 codes: VQ's large-codebook options
    args = argparse.Namespace(out=str(tmp_path), scale=scale)
    assert pretrained.run_dir(args, "pretrain", 0, 1e-3, 1, 1200) == tmp_path / "runs" / "tiny" / "pretrain-ps1"
    assert pretrained.run_dir(args, "vq", 0, 1e-4, 0, 1200) == tmp_path / "runs" / scale / "vq-lr0.0001-seed0"
    with pytest.raises(SystemExit, match="runs in a campaign"):
        pretrained.main(["--scale", scale, "--out", str(tmp_path), "--report-only"])


@needs_photos
def test_calibration_split_and_lr_rows_keep_equal_total_steps(tmp_path, monkeypatch):
    """Issue #26 item 3: a longer calibration starts from the precal run's checkpoint at steps - n (same total steps);
    a calibration LR row trains at a multiple of the fine-tune's LR. Both are read by the report's verdicts."""
    pretrained, report = _modules()
    s = {**pretrained.SCALES["smoke"], "steps": 4, "ckpt_every": 2, "cal_steps": 1}
    monkeypatch.setitem(pretrained.SCALES, "smoke", s)
    monkeypatch.setattr(pretrained, "CAL_SPLITS", (2, 3))  # 3: no checkpoint at step 1, so no row
    finetunes, rows = pretrained.plan("smoke")
    assert "tdc-ref+gq+cal2" in rows and "tdc-ref+gq+cal3" not in rows and "tdc-ref+gq+cal-lrx3" in rows
    assert pretrained.quantizer_of(finetunes, "tdc-ref+cal2") == pretrained.quantizer_of(finetunes, "tdc-ref")
    out = tmp_path / "fp"
    for row, psnrs in (("tdc-ref+gq", (20.0, 21.0)), ("vq", (22.0, 19.0))):  # seed-0 grid of the default campaign
        for lr, v in zip(s["lrs"], psnrs):
            p = pretrained.result_path(out, row, lr, 0)
            p.parent.mkdir(parents=True)
            p.write_text(json.dumps({"metrics": {"PSNR": v}}))
    pretrained.main(["--scale", "smoke", "--out", str(out), "--campaign", "c1", "--quiet",
                     "--only", "tdc-ref+gq+cal,tdc-ref+gq+cal2,tdc-ref+gq+cal-lrx3,tdc-ref-tol1+gq+cal,vq"])
    runs = out / "runs" / "smoke"
    precal = json.loads((runs / "tdc-ref-precal-lr0.0003-seed0" / "train.json").read_text())
    split = json.loads((runs / "tdc-ref+cal2-lr0.0003-seed0" / "train.json").read_text())
    fast = json.loads((runs / "tdc-ref+cal-lrx3-lr0.0003-seed0" / "train.json").read_text())
    assert precal["steps"] == 3
    assert split["calibrated"] == str(runs / "tdc-ref-precal-lr0.0003-seed0" / "checkpoint-2")
    assert (split["steps"], split["calibration_steps"], split["calibration_lr"]) == (4, 2, 3e-4)
    assert (fast["steps"], fast["calibration_steps"]) == (4, 1) and fast["calibration_lr"] == pytest.approx(9e-4)
    assert fast["calibrated"] == precal["checkpoint"]
    tol = json.loads((runs / "tdc-ref-tol1-precal-lr0.0003-seed0" / "train.json").read_text())
    assert tol["quantizer"]["tolerance"] == 1.0 and tol["quantizer"]["tdc_rule"] == "reference"
    tol_cfg = (runs / "tdc-ref-tol1-precal-lr0.0003-seed0" / "config.yaml").read_text()
    assert "tolerance: 1.0" in tol_cfg
    cal_meta = json.loads((runs / "tdc-ref+cal-lrx3-lr0.0003-seed0" / "calibrate.json").read_text())
    assert cal_meta["lr"] == pytest.approx(9e-4)
    res = json.loads((out / "campaigns" / "c1" / "results" / "tdc-ref+gq+cal2@lr0.0003" / "seed0.json").read_text())
    assert res["steps"] == 4 and math.isfinite(res["metrics"]["PSNR"])
    text = (out / "campaigns" / "c1" / "RESULTS.md").read_text()
    assert "Calibration for 2 of the steps vs for the default (authors' rule): **" not in text  # the report's splits are 300, 600
    assert "Calibration at 3 x LR vs at the fine-tune's LR (authors' rule): **" in text
    assert "Calibration at 0.1 x LR vs at the fine-tune's LR (band rule): *pending*" in text  # no band-rule row was run
    # a split whose checkpoint is gone is refused with the path it needs
    import shutil

    shutil.rmtree(runs / "tdc-ref+cal2-lr0.0003-seed0")
    shutil.rmtree(runs / "tdc-ref-precal-lr0.0003-seed0" / "checkpoint-2")
    shutil.rmtree(out / "campaigns" / "c1" / "results" / "tdc-ref+gq+cal2@lr0.0003")
    with pytest.raises(SystemExit, match="checkpoint-2"):
        pretrained.main(["--scale", "smoke", "--out", str(out), "--campaign", "c1", "--quiet", "--only", "tdc-ref+gq+cal2"])
