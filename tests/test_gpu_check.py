"""benchmarks/gpu_check.sh --cpu-dry-run: the prepared GPU check runs end to end on a CPU (tiny shapes),
so CI proves the script a GPU session will run is not broken (issue #15)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

SECTIONS = ("### 0. Compiled kernel and its self-check", "### 1. CUDA runtime tests", "### 2. Search throughput", "### 3. SD3-sized recipe", "### 4. Goals")


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GQ_SEARCH_BACKEND")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run", *args, "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    res = json.loads((tmp_path / "gpu_check.json").read_text()) if (tmp_path / "gpu_check.json").is_file() else {}
    md = (tmp_path / "gpu_check.md").read_text() if (tmp_path / "gpu_check.md").is_file() else ""
    return proc, res, md


def _finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_mem(d: dict) -> None:
    assert _finite_pos(d["peak_mib"]) and 0 <= d["extra_mib"] <= d["peak_mib"], d


@pytest.mark.slow
def test_cpu_dry_run_writes_every_section(tmp_path):
    proc, res, md = _run(tmp_path, "--budget-s", "900")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = res["meta"]
    assert meta["mode"] == "cpu-dry-run" and meta["device"] == "CPU" and meta["torch"] == torch.__version__
    assert res["failures"] == []
    if meta["fused_backend"] != "torch":  # the note says when no compiled kernel was there
        assert res["notes"] == []
    p = gpu_check.DRY

    # kernel: built (or loaded) and self-checked first, on its own time
    k = res["kernel"]
    assert k["backend"] == "cpp" and k["fused"] == meta["fused_backend"] and k["build_s"] == meta["kernel_build_s"]
    if k["built"]:
        from gq_plugin.search.selfcheck import self_check_problems

        sc = k["self_check"]
        assert sc["passed"] and not sc["skipped"] and sc["cases"] == len(self_check_problems("cpu")) and sc["seconds"] > 0
        assert meta["fused_backend"] == "cpp"
        assert f"cpp kernel: self-check PASSED, {sc['cases']} cases in " in md
    assert 0 < res["measure_s"] <= res["elapsed_s"]

    # 0. peak
    assert res["peak"]["size"] == p["gemm"] and res["peak"]["runs"] == p["gemm_reps"] and res["peak"]["tf32"] is False
    assert _finite_pos(res["peak"]["tflops_median"]) and res["peak"]["tflops_best"] >= res["peak"]["tflops_median"]

    # 1. tests: the -k cuda selection ran (skips without a GPU, the nvcc check where nvcc exists)
    t = res["tests"]
    assert t["ok"] and t["rc"] == 0 and t["failures"] == 0 and t["errors"] == 0 and t["failed_names"] == []
    assert t["tests"] >= 41 and t["passed"] + t["skipped"] == t["tests"]
    assert (tmp_path / t["log"]).is_file()

    # 2. search: every shape, headline first, both backends, numbers that agree with each other
    shapes = [(r["n"], r["k"], r["m"]) for r in res["search"]]
    assert shapes[0] == tuple(p["headline"]) == tuple(res["headline"])
    assert sorted(shapes) == sorted((n, k, m) for n in p["search_n"] for k in p["search_k"] for m in p["search_m"])
    for r in res["search"]:
        assert "skipped" not in r, r
        fused = r["fused"]
        assert fused == meta["fused_backend"] and set(r["backends"]) == {fused, "torch"}
        for b in r["backends"].values():
            assert _finite_pos(b["seconds"]) and 1 <= b["runs"] <= p["reps"]
            assert b["tokens_per_s"] == pytest.approx(r["n"] / b["seconds"], rel=1e-9)
            assert b["gflops"] == pytest.approx(2.0 * r["n"] * r["k"] * 2 * r["m"] / b["seconds"] / 1e9, rel=1e-9)
            assert b["pct_of_peak"] == pytest.approx(100 * b["gflops"] / (1e3 * res["peak"]["tflops_median"]), rel=1e-9)
            a = b["agreement"]
            assert a["rows"] == r["ref_rows"] == min(r["n"], p["ref_rows"])
            assert a["wrong"] == 0 and a["equal"] + a["near_ties"] == a["rows"] and a["equal"] >= 0.9 * a["rows"]
            _check_mem(b)
        assert r["fused_vs_torch"] == pytest.approx(r["backends"]["torch"]["seconds"] / r["backends"][fused]["seconds"])

    # 3. SD3 recipe: both variants timed, TDC overhead derived from them, encode shapes right
    sd = res["sd3"]
    assert sd["recipe"] == "recipes/sd3_gq_0.25.yaml" and sd["mixed_precision"] == "bf16"
    assert (sd["size"], sd["batch"]) == (gpu_check.SD3["dry_size"], gpu_check.SD3["dry_batch"]) and sd["params"] > 0
    for v in ("kl", "gq"):
        s = sd["steps"][v]
        assert s["steps"] == p["timed_steps"] and 0 < s["seconds_min"] <= s["seconds_median"] <= s["seconds_max"]
        _check_mem(s)
    kl, gq = sd["steps"]["kl"]["seconds_median"], sd["steps"]["gq"]["seconds_median"]
    assert sd["tdc_overhead_pct"] == pytest.approx(100 * (gq / kl - 1))
    e = sd["encode"]
    side = gpu_check.SD3["dry_size"] // 2  # two down blocks: f2
    assert e["encode_indices"]["shape"] == [2, 1, side, side] and e["encode_indices"]["dtype"] == "int64"
    assert e["encoder_alone"]["shape"] == [2, 32, side, side]  # mean + logvar of 16 latent channels
    for name in ("encode_indices", "encoder_alone"):
        assert e[name]["images_per_s"] == pytest.approx(2 / e[name]["seconds"]) and e[name]["runs"] >= 1
        _check_mem(e[name])

    # 4. goals computed from the rows above; the report holds every section and says it is a dry run
    head = res["search"][0]
    assert res["goals"]["fused_pct_of_peak"]["value"] == pytest.approx(head["backends"][head["fused"]]["pct_of_peak"])
    assert res["goals"]["fused_vs_torch"]["value"] == pytest.approx(head["fused_vs_torch"])
    assert res["goals"]["tdc_overhead_pct"]["value"] == pytest.approx(sd["tdc_overhead_pct"])
    assert "CPU DRY RUN" in md and all(s in md for s in SECTIONS), md
    assert md.count(f"| {head['n']} | {head['k']} | {head['m']} | ") == 2 and "TDC overhead:" in md
    assert "unmeasured" not in md and "skipped: " not in md


def test_time_guard_skips_with_a_note(tmp_path):
    """A zero measurement budget skips every measurement, but not the kernel check or the tests:
    they run on their own time (issue #28: the tests once timed out on a share of the budget)."""
    proc, res, md = _run(tmp_path, "--budget-s", "0", "--only", "tests", "search")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(res["search"]) == 12 and all(r["skipped"].startswith("time budget") for r in res["search"])
    assert res["tests"]["ok"] and res["tests"]["timeout_s"] == gpu_check.DRY["tests_s"]
    assert res["tests"]["passed"] + res["tests"]["skipped"] == res["tests"]["tests"] >= 43
    assert "kernel" in res and "sd3" not in res and res["failures"] == []
    assert all(g["value"] is None and g["met"] is None for g in res["goals"].values())
    assert md.count("skipped: time budget") == 12 and all(s in md for s in SECTIONS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_to_run_without_gpu_unless_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--cpu-dry-run" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_headline_first_then_cheapest():
    shapes = gpu_check.search_shapes(gpu_check.GPU)
    assert shapes[0] == gpu_check.HEADLINE == (262144, 65536, 16) and len(shapes) == len(set(shapes)) == 12
    costs = [n * k * m for n, k, m in shapes[1:]]
    assert costs == sorted(costs)


def test_failures_flag_wrong_rows_and_failed_tests():
    row = {"n": 4, "k": 8, "m": 2, "backends": {"cuda": {"agreement": {"wrong": 3}}, "torch": {"agreement": {"wrong": 0}}}}
    res = {"tests": {"ok": False, "rc": 1, "failed_names": ["test_x"]}, "search": [row]}
    assert gpu_check.failures(res) == ["tests: rc=1, failed ['test_x']", "search 4x8x2 cuda: 3 rows wrong"]
    assert gpu_check.failures({"tests": {"ok": True}, "search": [{"n": 1, "k": 1, "m": 1, "skipped": "x"}]}) == []
    bad_kernel = {"backend": "cuda", "built": True, "self_check": {"passed": False, "failure": "case 'x': 3 of 9 rows wrong"}}
    assert gpu_check.failures({"kernel": bad_kernel}) == ["cuda kernel self-check: case 'x': 3 of 9 rows wrong"]
    unbuilt = {"backend": "cuda", "built": False}
    assert gpu_check.failures({"kernel": unbuilt, "meta": {"mode": "gpu"}}) == ["cuda kernel: not built on the GPU machine"]
    assert gpu_check.failures({"kernel": {**unbuilt, "backend": "cpp"}, "meta": {"mode": "cpu-dry-run"}}) == []


def test_kernel_line_reports_verdict_and_lock_wait():
    ok = {"backend": "cuda", "built": True, "build_s": 61.2, "lock_wait_s": 0.0,
          "self_check": {"passed": True, "cases": 15, "seconds": 0.0123, "failure": None}}
    assert gpu_check.kernel_line(ok) == "cuda kernel: self-check PASSED, 15 cases in 12 ms; build/load 61 s"
    waited = {**ok, "lock_wait_s": 40.4}
    assert gpu_check.kernel_line(waited).endswith("build/load 61 s, of which 40 s waiting for another process's build lock")
    bad = {**ok, "self_check": {"passed": False, "cases": 15, "seconds": 0.01, "failure": "case 'y': raised X"}}
    assert gpu_check.kernel_line(bad) == ("cuda kernel: self-check FAILED (case 'y': raised X): disabled, the torch backend "
                                          "serves; build/load 61 s")
    assert gpu_check.kernel_line({"backend": "cpp", "built": False, "build_s": 3.0, "lock_wait_s": 0.0}) == \
        "cpp kernel: not built (torch backend serves; 3 s)"


def test_crashed_section_is_reported(tmp_path, monkeypatch):
    """A section runs in its own process: its crash becomes an error of the run, not a lost report."""
    import argparse

    monkeypatch.setenv("GQ_SEARCH_BACKEND", "no-such-backend")  # the child's select_backend raises
    args = argparse.Namespace(out_dir=str(tmp_path), cpu_dry_run=True)
    value, err = gpu_check.run_section("search", args, gpu_check.Clock(600.0), peak_gflops=1.0)
    assert value is None and err.startswith("search process exited with rc=1: ")
    assert "backend must be one of" in err
    assert gpu_check.failures({"errors": [err]}) == [err]
