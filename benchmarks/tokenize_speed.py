"""images/s of ``gq tokenize`` against the VAE encoder alone, on the same images, in one run.

    python benchmarks/tokenize_speed.py                       # tiny_cpu architecture, 256 px, 32 photos
    python benchmarks/tokenize_speed.py --model runs/demo/final
    python benchmarks/tokenize_speed.py --arch sd3 --images 8 # SD3-VAE architecture (random init), K=2^16, m=16

Rows (medians over ``--repeats`` rounds, the rounds interleaved so that load changes hit every row):

* ``gq tokenize`` -- :func:`gq_plugin.lab.tokenize_dataset.tokenize` end to end: read + resize photos
  (DataLoader workers), encoder, GQ search, bit-packing, shard files;
* ``encoder alone`` -- ``vae._encode(x)`` (the moments the search reads) on the same images, already
  resized and in memory;
* ``encode_indices`` -- encoder + search on the in-memory images (``vae.encode_indices``);
* ``GQ search alone`` -- ``vae.gq_quantizer.encode_indices(moments)`` on the encoder's output.

The search's share is ``search time / encoder time`` (goal: under 5 %). Random weights are fine here:
the cost of every row depends on the shapes only. Writes ``benchmarks/results/tokenize_speed_<arch>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SD3_VAE = {  # stabilityai/stable-diffusion-3-medium vae/config.json (architecture only)
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32,
    "sample_size": 1024, "use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0609, "scaling_factor": 1.5305,
}


def build_model(arch: str, out: Path) -> Path:
    """A GQ-patched AutoencoderKL saved under ``out`` (random init): tiny_cpu (K=2^10, m=4) or SD3 (K=2^16, m=16)."""
    from diffusers import AutoencoderKL

    from gq_plugin.adapters import patch_autoencoder_kl
    from gq_plugin.lab.config import load_config

    torch.manual_seed(0)
    if arch == "tiny_cpu":
        from omegaconf import OmegaConf

        cfg = load_config("tiny_cpu")
        vae = AutoencoderKL(**OmegaConf.to_container(cfg.model.config, resolve=True))
        patch_autoencoder_kl(vae, K=int(cfg.quantizer.codebook_size), m=int(cfg.quantizer.codebook_dim))
    elif arch == "sd3":
        vae = AutoencoderKL(**SD3_VAE)
        patch_autoencoder_kl(vae, K=2**16, m=16)
    else:
        raise ValueError(f"arch must be tiny_cpu or sd3, got {arch!r}")
    vae.save_pretrained(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="tiny_cpu", choices=["tiny_cpu", "sd3"], help="model architecture when --model is not given")
    ap.add_argument("--model", default=None, help="a GQ model dir (e.g. runs/demo/final) instead of a random-init --arch")
    ap.add_argument("--photos", default=None, help="photo folder (default: the `gq data fetch` cache)")
    ap.add_argument("--images", type=int, default=32, help="number of photos")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--batch-size", type=int, default=8, help="images per encoder call (every row)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of gq tokenize")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for tokenize_speed_<arch>.{json,md}")
    args = ap.parse_args(argv)

    from gq_plugin.lab.codec import load_image, load_model
    from gq_plugin.lab.data import default_data_dir, list_images
    from gq_plugin.lab.models import downsampling_factor
    from gq_plugin.lab.tokenize_dataset import tokenize
    from gq_plugin.search import kernels

    tmp = Path(tempfile.mkdtemp(prefix="gq_tokspeed_"))
    model_dir = Path(args.model) if args.model else build_model(args.arch, tmp / "model")
    arch = "model" if args.model else args.arch
    photos = sorted(list_images(args.photos or default_data_dir()))[: args.images]
    if len(photos) < args.images:
        raise SystemExit(f"only {len(photos)} photos found; run `gq data fetch` first")
    src = tmp / "photos"
    src.mkdir()
    for i, p in enumerate(photos):
        os.symlink(os.path.abspath(p), src / f"{i:05d}{Path(p).suffix.lower()}")

    vae = load_model(model_dir)
    q = vae.gq_quantizer
    f = downsampling_factor(vae)
    x_all = torch.stack([load_image(p, args.size, f) for p in sorted(src.iterdir())])
    batches = list(torch.split(x_all, args.batch_size))
    with torch.inference_mode():
        moments = [vae._encode(b) for b in batches]
        vae.encode_indices(batches[0])  # warm-up: builds / loads the fused kernel, first-call allocations
        q.encode_indices(moments[0])

    def t_tokenize():
        out = tmp / f"tok{time.perf_counter_ns()}"
        t0 = time.perf_counter()
        tokenize(model_dir, src, out, size=args.size, batch_size=args.batch_size, workers=args.workers,
                 shard_size=max(1, args.images // 4), progress=False, rank=0, world_size=1)
        return time.perf_counter() - t0

    def timed(fn):
        def run():
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn()
            return time.perf_counter() - t0
        return run

    rows = {
        "gq tokenize (read + resize + encoder + search + pack + write)": t_tokenize,
        "encoder alone (vae._encode, images in memory)": timed(lambda: [vae._encode(b) for b in batches]),
        "encode_indices (encoder + search, images in memory)": timed(lambda: [vae.encode_indices(b) for b in batches]),
        "GQ search alone (quantizer.encode_indices on the moments)": timed(lambda: [q.encode_indices(m) for m in moments]),
    }
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for k, fn in rows.items():
            times[k].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    n = len(x_all)
    enc = med["encoder alone (vae._encode, images in memory)"]
    search = med["GQ search alone (quantizer.encode_indices on the moments)"]
    latent = tuple(moments[0].shape[1:])
    result = {
        "command": "python benchmarks/tokenize_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "arch": arch, "model": str(model_dir) if args.model else f"random-init {args.arch}", "images": n, "size": args.size,
        "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
        "K": int(q.codebook_size), "m": int(q.codebook_dim), "moments_shape": list(latent),
        "search_backend": "cpp" if kernels.cpu_available() else "torch",
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "loadavg_after": list(os.getloadavg()),
        "seconds_median": med, "seconds_all": times, "images_per_s": {k: n / v for k, v in med.items()},
        "search_share_of_encoder": search / enc,
    }
    lines = [f"`{result['command']}` -- {n} photos at {args.size} px, batch {args.batch_size}, {result['torch_threads']} torch threads, "
             f"{result['cores']} cores (load average {result['loadavg_after'][0]:.1f} after the run), K = {result['K']}, m = {result['m']}, "
             f"moments {latent}, search backend {result['search_backend']}; medians of {args.repeats} interleaved rounds",
             "", "| what | images/s | s per image |", "|---|---|---|"]
    for k, v in med.items():
        lines.append(f"| {k} | {n / v:.2f} | {v / n:.4f} |")
    lines += ["", f"GQ search / encoder time: {100 * search / enc:.1f} %"]
    md = "\n".join(lines)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tokenize_speed_{arch}.json").write_text(json.dumps(result, indent=1))
    (out / f"tokenize_speed_{arch}.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
