"""``gq import-authors CKPT --config YAML --out DIR``: one of the paper authors' released tokenizers
(e.g. ``sd3unet_gq_0.25.ckpt`` with their ``configs/sd3unet_gq_0.25.yaml``) -> a diffusers
``save_pretrained`` folder that :func:`gq_plugin.adapters.load_pretrained_gq_vae` loads, so every
``gq`` command (eval, encode, decode, tokenize, diagnose, train with ``model.pretrained=DIR``)
works on it. The conversion is :func:`gq_plugin.adapters.load_authors_checkpoint`; this module
only writes the folder and checks that it loads back identically.
"""

from __future__ import annotations

from pathlib import Path


def import_authors(ckpt, config, out_dir, *, force: bool = False) -> dict:
    """Convert ``ckpt`` (with its authors' ``config``) and ``save_pretrained`` it into ``out_dir``.

    ``out_dir`` must not hold a model already unless ``force``. The written folder is loaded back
    with :func:`~gq_plugin.adapters.load_pretrained_gq_vae` and compared tensor by tensor with the
    converted model. Returns a summary: ``out_dir``, ``codebook_size``, ``codebook_dim``,
    ``codebooks_per_token``, ``downsampling``, ``bpp``, ``parameters``.
    """
    import torch

    from ..adapters import load_authors_checkpoint, load_pretrained_gq_vae

    out = Path(out_dir)
    if out.is_file() or ((out / "config.json").exists() and not force):
        raise ValueError(f"--out {str(out)!r} already holds a file or a model (pass --force to overwrite)")
    vae = load_authors_checkpoint(ckpt, config)  # every check before anything is written
    vae.save_pretrained(out)
    back = load_pretrained_gq_vae(str(out)).state_dict()
    mine = vae.state_dict()
    differ = [k for k in mine if k not in back or not torch.equal(mine[k], back[k])]
    if differ or back.keys() != mine.keys():
        raise RuntimeError(f"{out} does not load back identically: {differ[:3]}")
    q = vae.gq_quantizer
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return {"out_dir": str(out), "codebook_size": q.codebook_size, "codebook_dim": q.codebook_dim,
            "codebooks_per_token": q.num_codebooks, "downsampling": f, "bpp": q.bits_per_pixel(f * f),
            "parameters": sum(p.numel() for p in vae.parameters())}


def format_summary(info: dict) -> str:
    """One paragraph for the command line."""
    return (f"wrote {info['out_dir']}: GQ K = {info['codebook_size']}, m = {info['codebook_dim']} "
            f"({info['codebooks_per_token']} codebook(s) per token, f{info['downsampling']}: {info['bpp']:g} bpp), "
            f"{info['parameters'] / 1e6:.1f} M parameters; load it with gq_plugin.adapters.load_pretrained_gq_vae("
            f"{info['out_dir']!r}) or pass it to gq eval / encode / tokenize / diagnose")


def _run(args) -> int:
    print(format_summary(import_authors(args.ckpt, args.config, args.out, force=args.force)))
    return 0


def add_import_authors_command(sub) -> None:
    """Register ``gq import-authors`` on the ``gq`` subparsers."""
    ia = sub.add_parser("import-authors", help="the paper authors' released tokenizer (.ckpt + their config) -> a GQ diffusers folder",
                        description="Convert one of the authors' UNet GQ checkpoints (tongdaxu/VQ-VAE-from-Gaussian-VAE, e.g. "
                                    "sd3unet_gq_0.25.ckpt) into a diffusers save_pretrained folder for every other gq command.")
    ia.add_argument("ckpt", metavar="CKPT", help="their Lightning .ckpt, a bare state dict or a .safetensors file")
    ia.add_argument("--config", required=True, help="the matching config of their repository, e.g. configs/sd3unet_gq_0.25.yaml")
    ia.add_argument("--out", required=True, help="output folder (diffusers save_pretrained layout)")
    ia.add_argument("--force", action="store_true", help="overwrite a model already in --out")
    ia.set_defaults(func=_run)
