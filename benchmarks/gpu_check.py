"""One prepared GPU check (issues #15, #28): kernel self-check, CUDA tests, search throughput, the
SD3-sized recipe, memory.

    bash benchmarks/gpu_check.sh                       # on a GPU: <= 9.5 minutes, report + JSON
    python benchmarks/gpu_check.py --cpu-dry-run --out-dir /tmp/gq   # same code, tiny shapes, CPU

Steps, in order (each written to ``gpu_check.md`` / ``gpu_check.json`` in ``--out-dir`` as soon as it
ends, so a run killed by its time limit still leaves what it measured):

0. ``kernel``: build (or load) the compiled kernel (``cuda`` on a GPU, ``cpp`` in the dry run) and
   run its first-use self-check (:mod:`gq_plugin.search.selfcheck`) first, reporting the verdict,
   the build time and any wait for another process's build lock. Own time, no budget share.
1. ``tests``: ``pytest tests/test_kernels.py tests/test_selfcheck.py -k cuda`` in a subprocess (every
   backend available for CUDA tensors against the float64 reference, exact ties, odd D, the
   self-check's problems on the CUDA kernel, the nvcc compile check), with its own time limit
   (``tests_s``), not a share of the measurement budget.
2. ``peak``: the machine's fp32 GEMM rate, a large ``torch.mm`` with TF32 off (median of runs). The
   measurement budget (``--budget-s``) starts here.
3. ``search``: tokens/s of the fused backend (``cuda`` on a GPU; ``cpp``/``torch`` in the dry run)
   and the torch tiled GEMM + argmax on the same device, for every N x K x m; GFLOP/s counted as
   ``2 * N * K * 2m``, % of the measured fp32 peak, agreement with the float64 reference on the
   first ``ref_rows`` rows (:func:`gq_plugin.search.compare_with_reference`).
4. ``sd3``: the 0.25-bpp SD3 recipe (``recipes/sd3_gq_0.25.yaml``, 256 px, batch 16, bf16 under
   accelerate) seconds per training step with TDC vs the same model with a plain KL term
   (``quantizer.name=kl``), through ``gq_plugin.lab.train.autoencoder_step``; then
   ``vae.encode_indices`` images/s vs the unpatched encoder alone.
5. memory: every timed item records ``peak_mib`` (CUDA: ``max_memory_allocated`` since the item
   began; CPU: the process's peak RSS) and ``extra_mib`` (the growth over the item).

Tests, search and sd3 run in their own processes (a CUDA fault loses one section, not the run). A
time guard (``--budget-s``) skips remaining measurement items with a note when the run is over its
share; a section process is killed only when it overruns the budget by 45 s (hung). Exit status 1
when the kernel failed its self-check (or, on a GPU, did not build), a test failed, a backend
disagreed with the reference beyond float32 near-ties, or a section crashed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from search_speed import search_data  # noqa: E402

HEADLINE = (262144, 2**16, 16)  # SD3 f8 at 1024 px, batch 16 (16 * 128^2 tokens); the 0.25-bpp recipe's K, m
GPU = {
    "gemm": 8192, "gemm_reps": 10, "search_n": (32768, 262144), "search_k": (2**16, 2**18), "search_m": (4, 8, 16),
    "headline": HEADLINE, "reps": 5, "ref_rows": 256, "budget_s": 210.0, "tests_s": 100.0, "search_until": 0.6,
    "sd3_overrides": [], "warmup_steps": 2, "timed_steps": 8, "enc_reps": 10,
}
DRY = {
    "gemm": 512, "gemm_reps": 3, "search_n": (512, 2048), "search_k": (2**8, 2**10), "search_m": (4, 8, 16),
    "headline": (2048, 2**8, 16), "reps": 3, "ref_rows": 64, "budget_s": 90.0, "tests_s": 300.0, "search_until": 0.5,
    "sd3_overrides": ["model.config.block_out_channels=[32,32]", "model.config.layers_per_block=1",
                      "model.config.down_block_types=[DownEncoderBlock2D,DownEncoderBlock2D]",
                      "model.config.up_block_types=[UpDecoderBlock2D,UpDecoderBlock2D]", "quantizer.codebook_size=256"],
    "warmup_steps": 1, "timed_steps": 2, "enc_reps": 2,
}
SD3 = {"recipe": "recipes/sd3_gq_0.25.yaml", "size": 256, "batch": 16, "dry_size": 32, "dry_batch": 2}
TEST_FILES = ("tests/test_kernels.py", "tests/test_selfcheck.py")
GOALS = {"fused_pct_of_peak": 50.0, "fused_vs_torch": 2.0, "tdc_overhead_pct": 3.0}


# ----------------------------------------------------------------------------- measuring


class Clock:
    """Wall time since the run began (``t0``, shared with the section processes) and the time guard."""

    def __init__(self, budget_s: float, t0: float | None = None) -> None:
        self.t0, self.budget = (time.time() if t0 is None else float(t0)), float(budget_s)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self, until: float = 1.0) -> float:
        return until * self.budget - self.elapsed()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Mem:
    """Peak memory of one item: CUDA allocator peak on a GPU, process peak RSS on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device) / 2**20
        else:
            self.base = _rss_mib()

    def read(self) -> dict:
        if self.device.type == "cuda":
            _sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = _rss_mib()
        return {"peak_mib": round(peak, 1), "extra_mib": round(max(0.0, peak - self.base), 1)}


def time_calls(fn, device: torch.device, reps: int, max_s: float, warmup: int = 1) -> tuple[list[float], object]:
    """Seconds of each of up to ``reps`` calls after ``warmup`` untimed ones (CUDA events on a GPU)."""
    result = None
    for _ in range(warmup):
        result = fn()
    _sync(device)
    times: list[float] = []
    start = time.monotonic()
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            result = fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t)
        if time.monotonic() - start > max_s:
            break
    return times, result


def gemm_peak(device: torch.device, size: int, reps: int) -> dict:
    """fp32 GEMM rate of ``torch.mm`` (size^3, random data, TF32 off): median and best. The TF32
    switch is restored afterwards (torch's default, off for matmul, is what the search backends see)."""
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(size, size, generator=g).to(device) for _ in range(2))
    c = torch.empty(size, size, device=device)
    mem = Mem(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        times, _ = time_calls(lambda: torch.mm(a, b, out=c), device, reps, max_s=30.0, warmup=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    flop = 2.0 * size**3
    return {"size": size, "runs": len(times), "tflops_median": flop / statistics.median(times) / 1e12,
            "tflops_best": flop / min(times) / 1e12, "tf32": False, **mem.read()}


# ----------------------------------------------------------------------------- sections


def kernel_check(device: torch.device) -> dict:
    """Build (or load) the compiled kernel for ``device`` and run its first-use self-check
    (:func:`gq_plugin.search.verify_backend`), before anything is timed; the pytest and section
    processes reuse the cached build. Records the seconds waited for another process's build lock."""
    from gq_plugin.search import kernels, select_backend, verify_backend

    name = "cuda" if device.type == "cuda" else "cpp"
    t = time.monotonic()
    built = kernels.cuda_available(device) if name == "cuda" else kernels.cpu_available(device)
    out = {"backend": name, "built": built, "build_s": round(time.monotonic() - t, 1),
           "lock_wait_s": round(sum(kernels.LOCK_WAITS.values()), 1)}
    if built:
        out["self_check"] = verify_backend(name, device).as_dict()
    out["fused"] = select_backend(device)  # the compiled kernel only if it passed
    return out


def kernel_line(k: dict) -> str:
    """One line on the compiled kernel: built?, its self-check, the build (lock) time."""
    wait = f", of which {k['lock_wait_s']:.0f} s waiting for another process's build lock" if k["lock_wait_s"] else ""
    head = f"{k['backend']} kernel: "
    if not k["built"]:
        return head + f"not built (torch backend serves; {k['build_s']:.0f} s{wait})"
    sc = k["self_check"]
    verdict = (f"self-check PASSED, {sc['cases']} cases in {1e3 * sc['seconds']:.0f} ms" if sc["passed"]
               else f"self-check FAILED ({sc['failure']}): disabled, the torch backend serves")
    return head + verdict + f"; build/load {k['build_s']:.0f} s{wait}"


def run_tests(out_dir: Path, timeout_s: float) -> dict:
    """``pytest tests/test_kernels.py -k cuda`` in a subprocess; counts from its JUnit XML."""
    import xml.etree.ElementTree as ET

    xml, log = out_dir / "gpu_check_tests.xml", out_dir / "gpu_check_tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *TEST_FILES, "-k", "cuda",
           f"--junitxml={xml}"]
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, timeout_s), check=False)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc, text = None, f"timed out after {timeout_s:.0f} s (the test step's own limit)\n{out}"
    log.write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    res = {"command": f"python -m pytest -q {' '.join(TEST_FILES)} -k cuda", "rc": rc, "timeout_s": timeout_s, "seconds": time.monotonic() - t,
           "log": log.name, "tail": "\n".join(str(text).strip().splitlines()[-12:])}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            res[key] = int(suite.get(key, 0))
        res["passed"] = res["tests"] - res["failures"] - res["errors"] - res["skipped"]
        res["failed_names"] = [tc.get("name") for tc in suite.iter("testcase")
                               if tc.find("failure") is not None or tc.find("error") is not None]
    res["ok"] = rc == 0 and res.get("failures", 1) == 0 and res.get("errors", 1) == 0
    waits = [line for line in str(text).splitlines() if line.startswith("gq_plugin: wait")]
    if waits:  # the kernels module says when it waits for another process's build lock
        res["lock_wait"] = " / ".join(waits)
    return res


def search_shapes(p: dict) -> list[tuple[int, int, int]]:
    """The headline shape first, then the rest from the cheapest up (the guard trims the costliest)."""
    shapes = [(n, k, m) for n in p["search_n"] for k in p["search_k"] for m in p["search_m"]]
    shapes.sort(key=lambda s: s[0] * s[1] * s[2])
    return [p["headline"]] + [s for s in shapes if s != p["headline"]]


def run_search(p: dict, device: torch.device, clock: Clock, peak_gflops: float, record) -> list[dict]:
    """Every shape: fused backend vs torch tiled, timing, memory and float64 agreement."""
    from gq_plugin.search import argmax_inner_product, compare_with_reference, reference_scores, select_backend

    fused = select_backend(device)  # cuda on a GPU; cpp (else torch) on a CPU
    rows = []
    for n, k, m in search_shapes(p):
        if clock.left(p["search_until"]) <= 0:
            rows.append({"n": n, "k": k, "m": m, "skipped": "time budget (search share) used up"})
            record(rows)
            continue
        mean, logvar, codebook, w, f = (t.to(device) for t in search_data(n, k, m))
        r = min(n, p["ref_rows"])
        ref_s = reference_scores(mean[:r], logvar[:r], codebook, 1.0, chunk=8)
        row = {"n": n, "k": k, "m": m, "ref_rows": r, "backends": {}}
        for name in dict.fromkeys((fused, "torch")):
            mem = Mem(device)
            times, idx = time_calls(lambda: argmax_inner_product(w, f, backend=name), device, p["reps"], max_s=20.0)
            t = statistics.median(times)
            gflops = 2.0 * n * k * 2 * m / t / 1e9
            agree = compare_with_reference(idx[:r], mean[:r], logvar[:r], codebook, 1.0, ref_scores=ref_s)
            row["backends"][name] = {"seconds": t, "runs": len(times), "tokens_per_s": n / t, "gflops": gflops,
                                     "pct_of_peak": 100.0 * gflops / peak_gflops, "agreement": agree, **mem.read()}
            del idx
        bk = row["backends"]
        row["fused"] = fused
        row["fused_vs_torch"] = bk["torch"]["seconds"] / bk[fused]["seconds"]
        rows.append(row)
        del mean, logvar, codebook, w, f, ref_s
        record(rows)
    return rows


def _sd3_config(p: dict, dry: bool, variant: str):
    from gq_plugin.lab.config import load_config

    size, batch = (SD3["dry_size"], SD3["dry_batch"]) if dry else (SD3["size"], SD3["batch"])
    over = [f"data.size={size}", f"train.batch_size={batch}", "train.mixed_precision=bf16", f"quantizer.name={variant}"]
    return load_config(ROOT / SD3["recipe"], over + list(p["sd3_overrides"]))


def _lpips_note(cfg) -> str | None:
    """Keep the recipe's LPIPS term when its weights are here; otherwise drop it, with a note."""
    if float(cfg.loss.lpips) <= 0:
        return None
    from gq_plugin.lab.metrics.lpips import LPIPSWeightsNotFound, find_lpips_checkpoint

    try:
        find_lpips_checkpoint(cfg.loss.lpips_net)
        return None
    except LPIPSWeightsNotFound:
        cfg.loss.lpips = 0.0
        return "LPIPS weights not found (carry them, docs/kernels.md): steps timed with L1 only"


def run_sd3(p: dict, device: torch.device, dry: bool, clock: Clock, record) -> dict:
    """Seconds per training step, TDC vs plain KL, then encode_indices vs the encoder alone."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from gq_plugin.lab.models import build_model, parameter_count
    from gq_plugin.lab.train import autoencoder_step, build_loss

    acc = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    out: dict = {"recipe": SD3["recipe"], "notes": [], "steps": {}}
    for variant in ("kl", "gq"):
        if clock.left(0.97) <= 0:
            out["steps"][variant] = {"skipped": "time budget used up"}
            continue
        cfg = _sd3_config(p, dry, variant)
        note = _lpips_note(cfg)
        if note and note not in out["notes"]:
            out["notes"].append(note)
        size, batch = int(cfg.data.size), int(cfg.train.batch_size)
        out.update(size=size, batch=batch, mixed_precision="bf16", lpips=float(cfg.loss.lpips))
        set_seed(int(cfg.seed))
        vae, wrapper = build_model(cfg)
        out["params"] = parameter_count(vae)
        reg_weight = float(cfg.quantizer.weight) if variant == "gq" else 1.0  # as gq_plugin.lab.train.train
        params = [q for q in wrapper.parameters() if q.requires_grad]
        opt = torch.optim.Adam(params, lr=float(cfg.optim.lr), betas=tuple(cfg.optim.betas))
        wrapper, opt = acc.prepare(wrapper, opt)
        loss_fn = build_loss(cfg.loss).to(device)
        last_layer = acc.unwrap_model(wrapper).model.decoder.conv_out.weight
        quantizer = getattr(vae, "gq_quantizer", None)
        x = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)
        wrapper.train()
        done = [0]  # steps taken (the loss sees the step number, as in training)

        def step():
            autoencoder_step(acc, wrapper, loss_fn, opt, params, x, done[0], reg_weight, cfg.optim.grad_clip, last_layer)
            if quantizer is not None:
                quantizer.tdc_step()  # once per AE optimizer step, as gq_plugin.lab.train.train
            done[0] += 1

        mem = Mem(device)
        t = time.monotonic()
        for _ in range(p["warmup_steps"]):
            step()
        _sync(device)
        per_step = (time.monotonic() - t) / max(1, p["warmup_steps"])
        n_steps = p["timed_steps"]
        fit = int(max(0.0, clock.left(0.97) - 10.0) / max(per_step, 1e-6))
        if fit < n_steps:
            n_steps = max(1, fit)
            out["notes"].append(f"{variant}: {n_steps} timed steps instead of {p['timed_steps']} (time budget)")
        times, _ = time_calls(step, device, n_steps, max_s=1e9, warmup=0)
        out["steps"][variant] = {"seconds_median": statistics.median(times), "seconds_min": min(times),
                                 "seconds_max": max(times), "steps": len(times), **mem.read()}
        if variant == "gq" and clock.left(0.97) > 0:
            out["encode"] = _encode_rates(vae, x, device, p["enc_reps"])
        record(out)
        del vae, wrapper, opt, loss_fn, params, quantizer, x, last_layer
        acc.free_memory()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    kl, gq = out["steps"].get("kl", {}), out["steps"].get("gq", {})
    if "seconds_median" in kl and "seconds_median" in gq:
        out["tdc_overhead_pct"] = 100.0 * (gq["seconds_median"] / kl["seconds_median"] - 1.0)
    return out


def _encode_rates(vae, x: torch.Tensor, device: torch.device, reps: int) -> dict:
    """images/s of ``vae.encode_indices`` vs the unpatched ``AutoencoderKL.encode`` (bf16 autocast)."""
    encoder_alone = types.MethodType(type(vae).encode, vae)  # the class's method: no GQ posterior
    vae.eval()
    res = {}
    calls = {"encoder_alone": lambda: encoder_alone(x).latent_dist.parameters, "encode_indices": lambda: vae.encode_indices(x)}
    for name, fn in calls.items():
        mem = Mem(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            times, result = time_calls(fn, device, reps, max_s=30.0)
        t = statistics.median(times)
        res[name] = {"seconds": t, "runs": len(times), "images_per_s": x.shape[0] / t, "shape": list(result.shape),
                     "dtype": str(result.dtype).replace("torch.", ""), **mem.read()}
    res["search_share_pct"] = 100.0 * (1.0 - res["encoder_alone"]["seconds"] / res["encode_indices"]["seconds"])
    return res


# ----------------------------------------------------------------------------- report


def goals(res: dict) -> dict:
    """The issue's goals at the headline shape / the recipe step; ``met`` is None where unmeasured."""
    out = {}
    head = next((r for r in res.get("search", []) if (r["n"], r["k"], r["m"]) == tuple(res["headline"]) and "fused" in r), None)
    pct = head["backends"][head["fused"]]["pct_of_peak"] if head else None
    ratio = head["fused_vs_torch"] if head else None
    tdc = res.get("sd3", {}).get("tdc_overhead_pct")
    for key, val, ok in (("fused_pct_of_peak", pct, lambda v: v >= GOALS["fused_pct_of_peak"]),
                         ("fused_vs_torch", ratio, lambda v: v >= GOALS["fused_vs_torch"]),
                         ("tdc_overhead_pct", tdc, lambda v: v < GOALS["tdc_overhead_pct"])):
        out[key] = {"value": val, "goal": GOALS[key], "met": None if val is None else bool(ok(val))}
    return out


def failures(res: dict) -> list[str]:
    """What went wrong: failed tests, rows that disagree with the reference, crashed sections."""
    bad = list(res.get("errors", []))
    k = res.get("kernel")
    if k and k.get("self_check") and not k["self_check"]["passed"]:
        bad.append(f"{k['backend']} kernel self-check: {k['self_check']['failure']}")
    if k and not k["built"] and res.get("meta", {}).get("mode") == "gpu":
        bad.append(f"{k['backend']} kernel: not built on the GPU machine")
    tests = res.get("tests")
    if tests and not tests.get("ok"):
        bad.append(f"tests: rc={tests.get('rc')}, failed {tests.get('failed_names', '?')}")
    for r in res.get("search", []):
        for name, b in r.get("backends", {}).items():
            if b["agreement"]["wrong"]:
                bad.append(f"search {r['n']}x{r['k']}x{r['m']} {name}: {b['agreement']['wrong']} rows wrong")
    return bad


def _mem(d: dict) -> str:
    return f"{d['peak_mib']:,.0f} / {d['extra_mib']:,.0f}" if "peak_mib" in d else "-"


def markdown(res: dict) -> str:
    meta, dry = res["meta"], res["meta"]["mode"] != "gpu"
    mem_kind = "CUDA max_memory_allocated" if not dry else "process peak RSS (CPU)"
    lines = [f"## GPU check ({'CPU DRY RUN: tiny shapes, says nothing about GPU speed' if dry else 'GPU'})", "",
             f"Command: `{meta['command']}`  ", f"Device: {meta['device']}; torch {meta['torch']}, CUDA {meta['cuda']}; "
             f"{meta.get('when', '')}; {res.get('elapsed_s', 0):.0f} s in all; measurements {res.get('measure_s', 0):.0f} s "
             f"of a {meta['budget_s']:.0f} s budget (the kernel check and the tests run on their own time).  "]
    if "peak" in res:
        pk = res["peak"]
        lines.append(f"fp32 peak (torch.mm {pk['size']}^3, TF32 off, median of {pk['runs']}): "
                     f"**{1e3 * pk['tflops_median']:,.1f} GFLOP/s** (best {1e3 * pk['tflops_best']:,.1f}).")
    lines += ["", f"Memory columns: peak / growth over the item, MiB ({mem_kind}).", "", "### 0. Compiled kernel and its self-check", ""]
    lines.append(kernel_line(res["kernel"]) + "." if "kernel" in res else "not run")
    lines += ["", "### 1. CUDA runtime tests", ""]
    t = res.get("tests")
    if t:
        lines.append(f"`{t['command']}`: {t.get('passed', '?')} passed, {t.get('failures', '?')} failed, "
                     f"{t.get('errors', '?')} errors, {t.get('skipped', '?')} skipped ({t['seconds']:.0f} s of its own "
                     f"{t.get('timeout_s', 0):.0f} s limit, rc {t['rc']}).")
        if t.get("lock_wait"):
            lines.append(f"Build lock: {t['lock_wait']}")
        if t.get("failed_names"):
            lines.append("Failed: " + ", ".join(t["failed_names"]))
    else:
        lines.append("not run")
    lines += ["", "### 2. Search throughput (float32; fused vs torch tiled GEMM + argmax)", "",
              "| N | K | m | backend | tokens/s | GFLOP/s | % fp32 peak | fused / torch | float64 agreement (equal + near-ties / rows) | memory MiB |",
              "|---:|---:|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in res.get("search", []):
        if "skipped" in r:
            lines.append(f"| {r['n']} | {r['k']} | {r['m']} | - | skipped: {r['skipped']} | | | | | |")
            continue
        for name, b in r["backends"].items():
            a = b["agreement"]
            ratio = f"{r['fused_vs_torch']:.2f}x" if name == r["fused"] else ""
            lines.append(f"| {r['n']} | {r['k']} | {r['m']} | {name} | {b['tokens_per_s']:,.0f} | {b['gflops']:,.0f} | "
                         f"{b['pct_of_peak']:.1f} | {ratio} | {a['equal']} + {a['near_ties']} / {a['rows']}"
                         f"{' (' + str(a['wrong']) + ' WRONG)' if a['wrong'] else ''} | {_mem(b)} |")
    sd = res.get("sd3")
    lines += ["", "### 3. SD3-sized recipe (TDC vs plain KL; encode_indices vs encoder)", ""]
    if sd:
        lines.append(f"`{sd['recipe']}` at {sd.get('size')} px, batch {sd.get('batch')}, bf16, LPIPS weight {sd.get('lpips')}, "
                     f"{sd.get('params', 0) / 1e6:.1f} M parameters; random images (no data loading in the timing).")
        lines += ["", "| variant | s/step (median) | min - max | steps | memory MiB |", "|---|---:|---:|---:|---:|"]
        for v, s in sd["steps"].items():
            if "skipped" in s:
                lines.append(f"| {v} | skipped: {s['skipped']} | | | |")
            else:
                lines.append(f"| {v} | {s['seconds_median']:.4f} | {s['seconds_min']:.4f} - {s['seconds_max']:.4f} | "
                             f"{s['steps']} | {_mem(s)} |")
        if "tdc_overhead_pct" in sd:
            lines.append(f"\nTDC overhead: **{sd['tdc_overhead_pct']:+.2f} %** of a plain-KL step.")
        if "encode" in sd:
            e = sd["encode"]
            lines += ["", "| encode | images/s | output | memory MiB |", "|---|---:|---|---:|"]
            for name in ("encoder_alone", "encode_indices"):
                lines.append(f"| {name} | {e[name]['images_per_s']:,.1f} | {e[name]['dtype']} {e[name]['shape']} | {_mem(e[name])} |")
            lines.append(f"\nThe GQ search is {e['search_share_pct']:.1f} % of `encode_indices` time.")
        lines += [f"\nNote: {n}" for n in sd["notes"]]
    else:
        lines.append("not run")
    lines += ["", "### 4. Goals (issue #15)", "", "| goal | value | target | met |", "|---|---:|---:|---|"]
    for key, g in res.get("goals", {}).items():
        val = "unmeasured" if g["value"] is None else f"{g['value']:.2f}"
        lines.append(f"| {key} | {val} | {g['goal']} | {'-' if g['met'] is None else g['met']} |")
    lines += [f"\nNote: {n}" for n in res.get("notes", [])]
    lines += [f"\n**FAILED**: {b}" for b in res.get("failures", [])]
    return "\n".join(lines) + "\n"


def run_section(section: str, args, clock: Clock, peak_gflops: float) -> tuple[object, str | None]:
    """Run ``search`` or ``sd3`` in its own process, so a CUDA fault (a sticky error poisons the
    process's context) or a kill at the time limit loses that section's remaining items only. The
    child rewrites ``gpu_check_<section>.json`` after every item; returns (its content, error)."""
    part = Path(args.out_dir) / f"gpu_check_{section}.json"
    part.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", section, "--t0", repr(clock.t0),
           "--budget-s", str(clock.budget), "--peak-gflops", repr(peak_gflops), "--out-dir", str(args.out_dir)]
    cmd += ["--cpu-dry-run"] if args.cpu_dry_run else []
    err = None
    kill_s = max(90.0, clock.left(1.0) + 45.0)
    try:
        # the child skips what does not fit its budget; this kill is for a hung child only
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=kill_s, check=False)
        if proc.returncode != 0:
            err = f"{section} process exited with rc={proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-6:])
    except subprocess.TimeoutExpired:
        err = f"{section} process killed after {kill_s:.0f} s (hung?)"
    value = json.loads(part.read_text()) if part.is_file() else None
    return value, err


def section_main(args) -> int:
    """Child process of :func:`run_section`: one section, its JSON rewritten after every item."""
    dry = args.cpu_dry_run
    p, clock = dict(DRY if dry else GPU), Clock(args.budget_s, t0=args.t0)
    device = torch.device("cpu" if dry else "cuda")
    part = Path(args.out_dir) / f"gpu_check_{args.section}.json"

    def put(value) -> None:
        part.write_text(json.dumps(value, indent=1, default=str))

    if args.section == "search":
        put(run_search(p, device, clock, args.peak_gflops, put))
    else:
        put(run_sd3(p, device, dry, clock, put))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same code at tiny shapes on the CPU")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--budget-s", type=float, default=None, help="measurement time guard in seconds (default 210 on a GPU, 90 dry)")
    ap.add_argument("--only", nargs="+", choices=("tests", "search", "sd3"), default=("tests", "search", "sd3"))
    ap.add_argument("--section", choices=("search", "sd3"), help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--peak-gflops", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if args.section:
        return section_main(args)
    if not dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --cpu-dry-run")
    p = dict(DRY if dry else GPU)
    budget = args.budget_s if args.budget_s is not None else p["budget_s"]
    t_run = time.time()
    device = torch.device("cpu" if dry else "cuda")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name += f" (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    res: dict = {"meta": {"mode": "cpu-dry-run" if dry else "gpu", "device": name, "torch": torch.__version__,
                          "cuda": torch.version.cuda, "budget_s": budget, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])},
                 "headline": list(p["headline"]), "notes": []}
    clock: Clock | None = None  # the measurement budget starts after the kernel check and the tests

    def save() -> None:
        res["elapsed_s"] = time.time() - t_run
        res["measure_s"] = clock.elapsed() if clock is not None else 0.0
        res["goals"], res["failures"] = goals(res), failures(res)
        (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str))
        (out_dir / "gpu_check.md").write_text(markdown(res))

    def record(section: str):
        def put(value):
            res[section] = value
            save()
        return put

    # first: build (or load) the compiled kernel and run its self-check, on its own time
    record("kernel")(kernel_check(device))
    k = res["kernel"]
    res["meta"]["fused_backend"], res["meta"]["kernel_build_s"] = k["fused"], k["build_s"]
    print(f"[gpu_check] {kernel_line(k)} ({time.time() - t_run:.0f} s)", flush=True)
    if k["fused"] == "torch":
        res["notes"].append(f"no trusted compiled kernel for {device.type}: the 'fused' rows are the torch backend")
    if "tests" in args.only:  # its own time limit, not a share of the measurement budget
        record("tests")(run_tests(out_dir, p["tests_s"]))
        print(f"[gpu_check] tests ok={res['tests']['ok']} ({time.time() - t_run:.0f} s)", flush=True)
    clock = Clock(budget)
    record("peak")(gemm_peak(device, p["gemm"], p["gemm_reps"]))
    print(f"[gpu_check] fp32 peak {1e3 * res['peak']['tflops_median']:.1f} GFLOP/s ({time.time() - t_run:.0f} s)", flush=True)
    for section in ("search", "sd3"):
        if section in args.only:
            value, err = run_section(section, args, clock, res["peak"]["tflops_median"] * 1e3)
            if value is not None:
                res[section] = value
            if err:
                res.setdefault("errors", []).append(err)
            save()
            print(f"[gpu_check] {section} done ({time.time() - t_run:.0f} s){' ERROR ' + err if err else ''}", flush=True)
    print(markdown(res))
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
