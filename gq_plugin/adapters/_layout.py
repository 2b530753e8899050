"""Latent layouts of image, video and audio hosts, and the 4-D view the quantizer searches in.

Hosts keep their latents channel-first, and so do their GQ indices and rates (``G`` sub-codebook
indices where the latent has its ``C`` channels):

=======  =======================  ==========================  =================
family   latent                   indices / rates             token file layout
=======  =======================  ==========================  =================
image    ``(B, C, H, W)``         ``(B, G, H, W)``            ``"B,G,H,W"``
video    ``(B, C, T, H, W)``      ``(B, G, T, H, W)``         ``"B,G,T,H,W"``
audio    ``(B, C, T)``            ``(B, G, T)``               ``"B,G,T"``
=======  =======================  ==========================  =================

``T`` is the latent time axis (latent frames of a video, latent steps of a waveform). The
:class:`~gq_plugin.GaussianQuantizer` of an adapter takes image feature maps ``(B', C, H, W)``:
:func:`fold` puts a video's time axis into the batch (``B' = B * T``, frame ``t`` of sample ``b`` at
``b * T + t``) and gives an audio latent a height of one (``(B, C, 1, T)``); :func:`unfold` undoes
it. GQ quantizes every latent position on its own, so the fold changes no index.
"""

from __future__ import annotations

import torch

#: number of dims -> (family, token-file layout) of channel-first host tensors
LAYOUTS = {4: ("image", "B,G,H,W"), 5: ("video", "B,G,T,H,W"), 3: ("audio", "B,G,T")}


def _check(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim not in LAYOUTS:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{what} must be an image (B, C, H, W), video (B, C, T, H, W) or audio (B, C, T) tensor, got {got}")


def token_layout(ndim: int) -> str:
    """The token-file layout name of host indices with ``ndim`` dims (``"B,G,T,H,W"`` for video)."""
    if ndim not in LAYOUTS:
        raise ValueError(f"no token layout for {ndim}-d indices (image: 4, video: 5, audio: 3)")
    return LAYOUTS[ndim][1]


def fold(t: torch.Tensor, what: str = "latent") -> torch.Tensor:
    """Channel-first host tensor -> ``(B', C, H, W)``: video time into the batch, audio as height 1."""
    _check(t, what)
    if t.ndim == 5:
        b, c, n, h, w = t.shape
        return t.transpose(1, 2).reshape(b * n, c, h, w)
    if t.ndim == 3:
        return t.unsqueeze(2)
    return t


def unfold(t: torch.Tensor, ndim: int, batch: int) -> torch.Tensor:
    """Inverse of :func:`fold`: ``(B', C, H, W)`` -> the ``ndim``-d host layout of ``batch`` samples."""
    if ndim == 5:
        bt, c, h, w = t.shape
        if batch < 1 or bt % batch:
            raise ValueError(f"cannot unfold {bt} frames into a batch of {batch} videos")
        return t.reshape(batch, bt // batch, c, h, w).transpose(1, 2).contiguous()
    if ndim == 3:
        return t.squeeze(2)
    return t


def to_host_layout(core: torch.Tensor, ndim: int = 4, batch: int | None = None) -> torch.Tensor:
    """Quantizer indices or rates ``(B', h, w, G)`` -> the channel-first host layout with ``ndim`` dims
    (``(B, G, h, w)``, ``(B, G, T, h, w)`` or ``(B, G, T)``); ``batch`` = B for video."""
    return unfold(core.permute(0, 3, 1, 2), ndim, core.shape[0] if batch is None else batch)


def from_host_layout(indices: torch.Tensor) -> torch.Tensor:
    """Channel-first host indices (``(B, G, h, w)``, ``(B, G, T, h, w)`` or ``(B, G, T)``) -> the
    quantizer's ``(B', h, w, G)``."""
    _check(indices, "indices")
    return fold(indices, "indices").permute(0, 2, 3, 1)
