"""Videos <-> ``.gqt`` token files with a GQ-patched diffusers video VAE (Wan, HunyuanVideo, LTX, ...).

A video's GQ indices keep the latent time axis: ``(B, G, T, h, w)``, token-file layout
``"B,G,T,H,W"`` (:mod:`gq_plugin.adapters._layout`). :func:`encode_video` gives the indices and
their header (frame size and number of frames recorded, so the file's bits per pixel are
known); ``gq decode`` writes a video token file as one PNG per decoded frame
(:func:`decode_video_frames`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..tokens import TokenHeader

VIDEO_LAYOUT = "B,G,T,H,W"


@torch.no_grad()
def encode_video(vae, video: torch.Tensor, mid: str = "") -> tuple[torch.Tensor, TokenHeader]:
    """``(indices, header)`` for videos ``(B, C, F, H, W)`` in [-1, 1] and a patched video VAE."""
    if not isinstance(video, torch.Tensor) or video.ndim != 5:
        got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video must be a (B, C, F, H, W) tensor, got {got}")
    indices = vae.encode_indices(video)
    if indices.ndim != 5:
        raise ValueError(f"{type(vae).__name__} gives {indices.ndim}-d indices for a video, not (B, G, T, h, w): not a video VAE")
    header = TokenHeader.for_quantizer(vae.gq_quantizer, tuple(indices.shape), model_id=mid, image_size=tuple(video.shape[-2:]),
                                       layout=VIDEO_LAYOUT, extra={"num_frames": int(video.shape[2])})
    return indices, header


def frame_paths(out_path, num_videos: int, num_frames: int) -> list[list[Path]]:
    """Where :func:`decode_video_frames` writes frame ``f`` of video ``v``: ``OUT_f000.png`` for one
    video, ``OUT_<v>_f000.png`` for several (``OUT`` = ``out_path`` without its suffix)."""
    out_path = Path(out_path)
    suffix = out_path.suffix or ".png"
    stem = out_path.with_suffix("")
    tag = (lambda v: "") if num_videos == 1 else (lambda v: f"_{v}")
    return [[Path(f"{stem}{tag(v)}_f{f:03d}{suffix}") for f in range(num_frames)] for v in range(num_videos)]


@torch.no_grad()
def decode_video_frames(vae, indices: torch.Tensor, out_path, batch_size: int = 1) -> list[str]:
    """Decode video indices ``(B, G, T, h, w)`` and write every frame as a PNG (see :func:`frame_paths`);
    ``batch_size`` videos per decoder call. Returns the paths, video by video, frame by frame."""
    from tqdm.auto import tqdm

    from .plots import save_image

    if indices.ndim != 5:
        raise ValueError(f"video indices must be (B, G, T, h, w), got {tuple(indices.shape)}")
    n = indices.shape[0]
    paths: list[str] = []
    for s in tqdm(range(0, n, batch_size), desc="decode videos", unit="batch", disable=n <= batch_size):
        out = vae.decode_indices(indices[s : s + batch_size])
        video = (out.sample if hasattr(out, "sample") else out).clamp(-1, 1)
        if video.ndim != 5:
            raise ValueError(f"{type(vae).__name__}.decode gave {tuple(video.shape)}, not videos (B, C, F, H, W)")
        where = frame_paths(out_path, n, video.shape[2])
        for j in range(video.shape[0]):
            for f, p in enumerate(where[s + j]):
                save_image(video[j, :, f], p)
                paths.append(str(p))
    return paths
