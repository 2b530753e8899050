"""The first-use kernel self-check's cost next to one encoder call, measured in the same run (issue #28).

    python benchmarks/self_check_cost.py                 # CPU (+ CUDA when present), 7 interleaved rounds
    python benchmarks/self_check_cost.py --rounds 3 --arch tiny_cpu

Rows (medians over ``--rounds`` rounds; each round runs every row once, interleaved, so load changes
on a shared machine hit every row alike):

* ``self-check <backend> on <device>``: :func:`gq_plugin.search.selfcheck.run_self_check` end to end
  (build the problems on the device, run the compiled kernel and the torch backend on each, judge),
  i.e. what the first search on a device pays once per process. The first (cold) call is reported
  separately.
* ``encoder <arch>``: one ``AutoencoderKL.encode`` call on one 256 x 256 image (batch 1, random
  weights: the cost depends on the shapes only): the ``tiny_cpu`` recipe's architecture and the
  SD3 VAE's (``recipes/sd3_gq_0.25.yaml``).

The check must not be noticeable next to one encoder call: the ratio columns are check / encoder,
in wall time and in the process's CPU time (``time.process_time``, all threads): on a shared machine
wall time also counts the waits for the scheduler.
Writes ``benchmarks/results/self_check_cost.{json,md}`` (``--out-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARCHS = {"tiny_cpu": "tiny_cpu", "sd3": "recipes/sd3_gq_0.25.yaml"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_call(arch: str, device: torch.device, size: int = 256):
    """A zero-argument callable: one ``encode`` of one random ``size`` px image (random init)."""
    from diffusers import AutoencoderKL
    from omegaconf import OmegaConf

    from gq_plugin.lab.config import load_config

    torch.manual_seed(0)
    cfg = load_config(ARCHS[arch])
    vae = AutoencoderKL(**OmegaConf.to_container(cfg.model.config, resolve=True)).to(device).eval()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1

    def call():
        with torch.no_grad():
            vae.encode(x).latent_dist.mean.sum().item()  # .item(): the call has finished (also on CUDA)

    return call


def self_check_call(device: torch.device):
    """A zero-argument callable running the compiled kernel's self-check on ``device`` (uncached),
    or None when no kernel is built for it."""
    from gq_plugin import search
    from gq_plugin.search import kernels
    from gq_plugin.search.selfcheck import run_self_check

    name = "cuda" if device.type == "cuda" else "cpp"
    built = kernels.cuda_available(device) if name == "cuda" else kernels.cpu_available(device)
    if not built:
        return name, None
    max_features = search.CUDA_MAX_FEATURES if name == "cuda" else None

    def call():
        res = run_self_check(name, search._BACKENDS[name], device, max_features)
        if not res.passed:
            raise RuntimeError(f"the {name} kernel failed its self-check: {res.failure}")
        return res

    return name, call


def measure(rounds: int, archs: list[str], devices: list[torch.device]) -> dict:
    from tqdm import tqdm

    rows: dict[str, dict] = {}
    calls = {}
    for device in devices:
        name, call = self_check_call(device)
        if call is None:
            print(f"no {name} kernel for {device}: skipped", file=sys.stderr)
            continue
        t = time.perf_counter()
        res = call()
        _sync(device)
        key = f"self-check {name} on {device}"
        rows[key] = {"kind": "self-check", "device": str(device), "cold_s": time.perf_counter() - t, "cases": res.cases}
        calls[key] = (call, device)
        for arch in archs:
            key = f"encoder {arch} on {device}"
            enc = encoder_call(arch, device)
            enc()  # warm-up (allocations, oneDNN / cuDNN algorithm choice)
            rows[key] = {"kind": "encoder", "device": str(device), "arch": arch}
            calls[key] = (enc, device)
    times: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in tqdm(range(rounds), desc="rounds"):
        for key, (fn, device) in calls.items():
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
    for key, ts in times.items():
        rows[key].update(median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts), runs=len(ts),
                         cpu_median_s=statistics.median(cpu[key]))
    for key, row in rows.items():
        if row["kind"] != "self-check":
            continue
        encoders = [r for r in rows.values() if r["kind"] == "encoder" and r["device"] == row["device"]]
        row["vs_encoder"] = {r["arch"]: row["median_s"] / r["median_s"] for r in encoders}
        row["cpu_vs_encoder"] = {r["arch"]: row["cpu_median_s"] / r["cpu_median_s"] for r in encoders}
    return rows


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["## Kernel self-check cost vs one encoder call", "",
             f"Command: `{m['command']}`  ", f"Machine: {m['machine']}, {m['threads']} torch threads, load average "
             f"{m['load_before']} before / {m['load_after']} after; torch {m['torch']}; {m['when']}.", "",
             "| row | device | median ms | min - max ms | runs | cold ms | check / encoder | CPU ms (median) | CPU: check / encoder |",
             "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for key, r in res["rows"].items():
        ratio = ", ".join(f"{100 * v:.2f} % of {a}" for a, v in r.get("vs_encoder", {}).items())
        cpu_ratio = ", ".join(f"{100 * v:.2f} % of {a}" for a, v in r.get("cpu_vs_encoder", {}).items())
        cold = f"{1e3 * r['cold_s']:.1f}" if "cold_s" in r else ""
        lines.append(f"| {key} | {r['device']} | {1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f} - {1e3 * r['max_s']:.1f} | "
                     f"{r['runs']} | {cold} | {ratio} | {1e3 * r['cpu_median_s']:.1f} | {cpu_ratio} |")
    lines += ["", "The self-check runs once per process and device, before the compiled kernel's first search; "
              "the encoder row is one `AutoencoderKL.encode` of one 256 px image (random weights). Wall time on a "
              "shared machine includes waiting for the scheduler; CPU time is the process's (all its threads, "
              "OpenMP spin-waits included)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS))
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    rows = measure(args.rounds, list(args.arch), devices)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    res = {"meta": {"command": "python benchmarks/self_check_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": f"{cpu}, {os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_before": load_before, "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
                    "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
           "rows": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "self_check_cost.json").write_text(json.dumps(res, indent=1))
    (out / "self_check_cost.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
