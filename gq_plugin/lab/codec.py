"""Images <-> ``.gqt`` token files with a GQ-patched diffusers VAE (the ``gq encode/decode`` API)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..rate import real_bpp
from ..tokens import TokenHeader, load_tokens, save_tokens
from .video_tokens import VIDEO_LAYOUT, decode_video_frames

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def model_id(model_dir: str | os.PathLike, what: str = "--model") -> str:
    """``<dir name>:<sha256[:12] of its weights file>``: identifies the decoder tokens were made for."""
    from .models import resolve_model_dir

    vae_dir = Path(resolve_model_dir(model_dir, what))
    weights = sorted(vae_dir.glob("*.safetensors")) or sorted(vae_dir.glob("*.bin"))
    if not weights:
        raise ValueError(f"no weights (*.safetensors / *.bin) in {vae_dir}")
    h = hashlib.sha256()
    with open(weights[0], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return f"{vae_dir.resolve().name}:{h.hexdigest()[:12]}"


def load_model(model_dir: str | os.PathLike, what: str = "--model"):
    """A GQ-patched VAE from a ``save_pretrained`` dir (or a training checkpoint dir with ``vae/``);
    errors name ``what`` (the command-line argument) and the path."""
    from ..adapters.diffusers_vae import gq_config, load_pretrained_gq_vae
    from .models import resolve_model_dir

    vae_dir = resolve_model_dir(model_dir, what)
    vae = load_pretrained_gq_vae(vae_dir)
    if gq_config(vae) is None:  # pragma: no cover - load_pretrained_gq_vae raises before
        raise ValueError(f"{vae_dir} is not a GQ model")
    return vae.eval()


def load_image(path: str | os.PathLike, size: int | None, multiple: int) -> torch.Tensor:
    """RGB image -> (3, H, W) in [-1, 1]; resized (short side) + centre-cropped to ``size``, or
    cropped to a multiple of ``multiple`` when ``size`` is None."""
    from PIL import Image

    return image_to_tensor(Image.open(path), size, multiple, name=str(path))


def image_to_tensor(im, size: int | None, multiple: int, name: str = "image") -> torch.Tensor:
    """A PIL image -> (3, H, W) in [-1, 1], as :func:`load_image` (``name`` appears in errors)."""
    from PIL import Image

    im = im.convert("RGB")
    if size is not None:
        if size % multiple:
            raise ValueError(f"size={size} must be a multiple of the model's downsampling factor {multiple}")
        s = size / min(im.size)
        im = im.resize((max(size, round(im.size[0] * s)), max(size, round(im.size[1] * s))), Image.BICUBIC)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
    else:
        w, h = im.size[0] // multiple * multiple, im.size[1] // multiple * multiple
        if w == 0 or h == 0:
            raise ValueError(f"{name}: image smaller than the downsampling factor {multiple}")
        im = im.crop((0, 0, w, h))
    a = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)
    return a / 127.5 - 1.0


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, mid: str = "") -> tuple[torch.Tensor, TokenHeader]:
    """``(indices, header)`` for a batch (N, 3, H, W) in [-1, 1]."""
    indices = vae.encode_indices(images)
    header = TokenHeader.for_quantizer(vae.gq_quantizer, tuple(indices.shape), model_id=mid, image_size=tuple(images.shape[-2:]))
    return indices, header


@torch.no_grad()
def decode_indices(vae, indices: torch.Tensor) -> torch.Tensor:
    """Reconstruction (N, 3, H, W) in [-1, 1] (clamped) from GQ indices."""
    return vae.decode_indices(indices).sample.clamp(-1, 1)


def encode_files(model_dir, image_paths: list, out_file, size: int | None = 256) -> dict:
    """Encode images into one ``.gqt`` file; returns sizes and bpp (nominal and real)."""
    from .models import downsampling_factor

    vae = load_model(model_dir)
    f = downsampling_factor(vae)
    imgs = [load_image(p, size, f) for p in image_paths]
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) != 1:
        raise ValueError(f"all images must have the same size in one token file; got {sorted(shapes)} (pass --size)")
    x = torch.stack(imgs)
    indices, header = encode_images(vae, x, model_id(model_dir))
    header.extra["sources"] = [Path(p).name for p in image_paths]
    nbytes = save_tokens(out_file, indices, header)
    return {"file": str(out_file), "bytes": nbytes, "nominal_bpp": header.nominal_bpp(), "real_bpp": real_bpp(nbytes, header.num_pixels),
            "shape": list(indices.shape), "images": len(imgs)}


def decode_file(model_dir, token_file, out_path, force: bool = False, max_images: int | None = None, batch_size: int = 16) -> list[str]:
    """Decode a ``.gqt`` file (from ``gq encode``, or one shard of ``gq tokenize``) to PNG(s), at most
    ``batch_size`` images per decoder call; refuses a model whose codebook (or, unless ``force``,
    weights) differ from the ones the file was made with. A video token file (layout
    ``"B,G,T,H,W"``) is written as one PNG per frame (:func:`~gq_plugin.lab.video_tokens.frame_paths`;
    ``max_images`` / ``batch_size`` count videos)."""
    from .plots import save_image

    from .models import downsampling_factor

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vae = load_model(model_dir)
    indices, header = load_tokens(token_file, quantizer=vae.gq_quantizer)  # header checked before the payload is read
    video = header.layout == VIDEO_LAYOUT
    if header.layout != "B,G,H,W" and not video:
        raise ValueError(f"token file layout {header.layout!r} is not an image token grid 'B,G,H,W' or a video 'B,G,T,H,W'")
    if not video:
        f = downsampling_factor(vae)
        grid = (header.shape[2] * f, header.shape[3] * f)
        if header.image_size is not None and tuple(header.image_size) != grid:
            raise ValueError(
                f"token file image_size {list(header.image_size)} does not match its {header.shape[2]}x{header.shape[3]} token grid "
                f"at this model's factor {f} (expected {list(grid)}; permuted H/W?)"
            )
    mid = model_id(model_dir)
    if header.model_id and header.model_id != mid and not force:
        raise ValueError(f"token file was made with model {header.model_id!r}, not {mid!r} (pass force=True / --force to decode anyway)")
    n = indices.shape[0] if max_images is None else min(indices.shape[0], max_images)
    if video:  # one PNG per decoded frame
        return decode_video_frames(vae, indices[:n], out_path, batch_size=batch_size)
    out_path = Path(out_path)
    paths = []
    for s in range(0, n, batch_size):
        x = decode_indices(vae, indices[s : min(n, s + batch_size)])
        for j in range(x.shape[0]):
            p = out_path if indices.shape[0] == 1 else out_path.with_name(f"{out_path.stem}_{s + j}{out_path.suffix or '.png'}")
            save_image(x[j], p)
            paths.append(str(p))
    return paths
