"""Shared test helper: tiny real tokenizers trained by `gq train` (GQ and registry baselines) on real photos."""

from pathlib import Path

import yaml

MICRO_MODEL = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "block_out_channels": [8, 16], "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 4, "sample_size": 32, "mid_block_add_attention": False,
    "use_quant_conv": False, "use_post_quant_conv": False,
}


def small_photos(d: Path, n: int = 10, short: int = 40) -> int:
    """Write ``n`` real photos (from wheels), short side ``short``, into ``d``; returns how many."""
    from PIL import Image

    from gq_plugin.lab.data import wheel_photos

    for key, path, _ in list(wheel_photos())[:n]:
        im = Image.open(path).convert("RGB")
        s = short / min(im.size)
        im.resize((max(short, round(im.size[0] * s)), max(short, round(im.size[1] * s)))).save(d / f"{key}.png")
    return len(list(d.iterdir()))


def train_tokenizer(out: Path, photos: Path, quantizer: dict, steps: int = 2) -> Path:
    """`gq train` a micro tokenizer with ``quantizer`` into ``out``; returns its ``final`` checkpoint."""
    from gq_plugin.lab.cli import main as gq_main

    cfg = {"name": "micro", "seed": 0, "model": {"config": MICRO_MODEL}, "quantizer": quantizer, "loss": {"l1": 1.0, "lpips": 0.0},
           "optim": {"lr": 1e-3}, "train": {"steps": steps, "batch_size": 4, "log_every": 1, "output_dir": str(out)},
           "data": {"root": str(photos), "size": 16, "resize": 32, "eval_fraction": 0.2}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    assert gq_main(["train", str(out / "recipe.yaml"), "--quiet"]) == 0
    return out / "final"
