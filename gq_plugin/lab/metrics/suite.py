"""Streaming evaluation of (original, reconstruction) pairs.

>>> suite = MetricSuite()                                  # doctest: +SKIP
>>> for x, x_hat in pairs:                                 # NCHW in [-1, 1]
...     suite.update(x, x_hat)                             # doctest: +SKIP
>>> suite.compute()                                        # doctest: +SKIP
{'PSNR': 27.1, 'SSIM': 0.81, 'MS-SSIM': 0.93, 'LPIPS-alex': 0.09,
 'FD-EffNetLite0': 12.3, 'KID-EffNetLite0': 0.004, 'KID-EffNetLite0-std': 0.001, 'n_images': 500}

Per-image metrics are averaged over images. The distribution metrics compare the set of
originals with the set of reconstructions and are reported only from ``min_images_fd``
images on (they are meaningless on a handful of samples; FD in particular is biased at small
N). Heavy extractors (LPIPS, EfficientNet-Lite0) are loaded lazily; a missing optional
dependency turns its metric off with a warning instead of failing the whole evaluation,
unless ``strict=True``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch

from .features import FD_NAME, KID_NAME, EffNetLite0Features, FeatureStats, frechet_distance, kernel_inception_distance
from .image import MS_SSIM_MIN_SIZE, ms_ssim, psnr, ssim
from .lpips import LPIPS

__all__ = ["MetricSuite", "evaluate_pairs"]


class MetricSuite:
    """Accumulates PSNR / SSIM / MS-SSIM / LPIPS per image and FD / KID on EffNet-Lite0 features.

    Args:
        lpips_nets: LPIPS variants to report (``"alex"``, ``"vgg"``); empty to skip.
        ssim / ms_ssim: report SSIM / MS-SSIM (MS-SSIM is NaN below 161 px; see
            :mod:`gq_plugin.lab.metrics.image`).
        distribution: report ``FD-EffNetLite0`` and ``KID-EffNetLite0``.
        features / feature_name: another frozen feature extractor (``[-1, 1]`` NCHW images ->
            ``(N, D)``) for the distribution metrics, reported as ``FD-<feature_name>`` /
            ``KID-<feature_name>`` (never "FID": only InceptionV3 features give FID).
        min_images_fd: minimum number of images for the distribution metrics.
        kid_subset_size: subset size of KID (capped at the number of images).
        device: where the networks run (default: the device of the first batch).
        strict: raise instead of warning when an optional metric cannot be computed.
        cache_reference_features: keep the feature rows of each batch of originals (keyed by the
            batch's exact bytes) across :meth:`reset`, so scoring many reconstructions of the same
            originals (one row per bottleneck) runs the feature network on them once. Bounded by
            ``max_cached_batches`` (the cache is emptied when full).
    """

    def __init__(
        self,
        lpips_nets: Iterable[str] = ("alex",),
        ssim: bool = True,
        ms_ssim: bool = True,
        distribution: bool = True,
        features: torch.nn.Module | None = None,
        feature_name: str | None = None,
        min_images_fd: int = 50,
        kid_subset_size: int = 100,
        device: torch.device | str | None = None,
        strict: bool = False,
        cache_reference_features: bool = False,
        max_cached_batches: int = 4096,
    ):
        self.lpips_nets = tuple(lpips_nets)
        self.use_ssim = ssim
        self.use_ms_ssim = ms_ssim
        self.distribution = distribution
        self.min_images_fd = min_images_fd
        self.kid_subset_size = kid_subset_size
        self.device = torch.device(device) if device is not None else None
        self.strict = strict
        self._lpips: dict[str, LPIPS | None] = {}
        self._feat: torch.nn.Module | None | bool = features  # None = load lazily, False = unavailable
        if features is not None:
            name = feature_name or type(features).__name__
            self.fd_name, self.kid_name = f"FD-{name}", f"KID-{name}"
        else:
            self.fd_name, self.kid_name = FD_NAME, KID_NAME
        self.notes: list[str] = []
        self.cache_reference_features = cache_reference_features
        self.max_cached_batches = int(max_cached_batches)
        self._ref_cache: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        """Forget all accumulated values (networks and cached reference features stay)."""
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._real = FeatureStats()
        self._fake = FeatureStats()
        self.n_images = 0

    # ------------------------------------------------------------------ helpers
    def _fail(self, what: str, err: Exception) -> None:
        if self.strict:
            raise err
        msg = f"{what} disabled: {err}"
        if msg not in self.notes:
            self.notes.append(msg)
            warnings.warn(msg, stacklevel=3)

    def _add(self, name: str, values: torch.Tensor) -> None:
        v = values.detach().double().cpu()
        v = v[~torch.isnan(v)]
        if v.numel():
            self._sums[name] = self._sums.get(name, 0.0) + float(v.sum())
            self._counts[name] = self._counts.get(name, 0) + v.numel()

    def _lpips_model(self, net: str, device: torch.device) -> LPIPS | None:
        if net not in self._lpips:
            try:
                self._lpips[net] = LPIPS(net).to(device)
            except (FileNotFoundError, ImportError) as e:
                self._lpips[net] = None
                self._fail(f"LPIPS-{net}", e)
        return self._lpips[net]

    def _features(self, device: torch.device) -> torch.nn.Module | None:
        if self._feat is None:
            try:
                self._feat = EffNetLite0Features().to(device)
            except (FileNotFoundError, ImportError) as e:
                self._feat = False
                self._fail(f"{self.fd_name}/{self.kid_name}", e)
        return self._feat.to(device) if self._feat else None

    def _reference_features(self, fe, x: torch.Tensor) -> torch.Tensor:
        if not self.cache_reference_features:
            return fe(x)
        import hashlib

        key = hashlib.blake2b(x.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()
        key += str(tuple(x.shape))
        if key not in self._ref_cache:
            if len(self._ref_cache) >= self.max_cached_batches:
                self._ref_cache.clear()
            self._ref_cache[key] = fe(x)
        return self._ref_cache[key]

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Add a batch of pairs (NCHW, RGB, in ``[-1, 1]``)."""
        if originals.shape != reconstructions.shape or originals.dim() != 4:
            raise ValueError(f"expected NCHW batches of equal shape, got {tuple(originals.shape)} / {tuple(reconstructions.shape)}")
        device = self.device or originals.device
        x = originals.to(device).float().clamp(-1, 1)
        y = reconstructions.to(device).float().clamp(-1, 1)
        self.n_images += x.shape[0]
        self._add("PSNR", psnr(x, y))
        if self.use_ssim:
            try:
                self._add("SSIM", ssim(x, y))
            except ImportError as e:
                self.use_ssim = False
                self._fail("SSIM", e)
        if self.use_ms_ssim:
            if min(x.shape[-2:]) < MS_SSIM_MIN_SIZE:
                note = f"MS-SSIM skipped for images below {MS_SSIM_MIN_SIZE} px (got {tuple(x.shape[-2:])})"
                if note not in self.notes:
                    self.notes.append(note)
            else:
                try:
                    self._add("MS-SSIM", ms_ssim(x, y))
                except ImportError as e:
                    self.use_ms_ssim = False
                    self._fail("MS-SSIM", e)
        for net in self.lpips_nets:
            model = self._lpips_model(net, device)
            if model is not None:
                self._add(f"LPIPS-{net}", model(x, y))
        if self.distribution:
            fe = self._features(device)
            if fe is not None:
                self._real.update(self._reference_features(fe, x))
                self._fake.update(fe(y))

    def compute(self) -> dict[str, float]:
        """Means of the per-image metrics, distribution metrics, and ``n_images``."""
        out = {k: self._sums[k] / self._counts[k] for k in self._sums}
        if self.use_ms_ssim and "MS-SSIM" not in out and self.n_images:
            out["MS-SSIM"] = math.nan
        if self.distribution and self._feat and self.n_images >= self.min_images_fd:
            fr, ff = self._real.features, self._fake.features
            out[self.fd_name] = frechet_distance(fr, ff)
            kid, kid_std = kernel_inception_distance(fr, ff, subset_size=self.kid_subset_size)
            out[self.kid_name] = kid
            out[f"{self.kid_name}-std"] = kid_std
        elif self.distribution and self._feat and self.n_images:
            note = f"{self.fd_name}/{self.kid_name} need >= {self.min_images_fd} images (got {self.n_images})"
            if note not in self.notes:
                self.notes.append(note)
        out["n_images"] = self.n_images
        return out


def _batches(originals, reconstructions, batch_size: int):
    if isinstance(originals, torch.Tensor):
        if not isinstance(reconstructions, torch.Tensor):
            raise TypeError("originals and reconstructions must both be tensors or both be iterables")
        for i in range(0, len(originals), batch_size):
            yield originals[i : i + batch_size], reconstructions[i : i + batch_size]
    else:
        yield from zip(originals, reconstructions, strict=True)


def evaluate_pairs(
    originals,
    reconstructions,
    batch_size: int = 16,
    progress: bool = True,
    suite: MetricSuite | None = None,
    **suite_kwargs,
) -> dict[str, float]:
    """Evaluate pairs given as two NCHW tensors or two iterables of batches; returns means.

    Extra keyword arguments configure the :class:`MetricSuite` (ignored when ``suite`` is given).
    """
    suite = suite or MetricSuite(**suite_kwargs)
    total = None
    if isinstance(originals, torch.Tensor):
        total = math.ceil(len(originals) / batch_size)
    elif hasattr(originals, "__len__"):
        total = len(originals)
    it = _batches(originals, reconstructions, batch_size)
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(it, total=total, desc="metrics", unit="batch", leave=False)
        except ImportError:
            pass
    for x, y in it:
        suite.update(x, y)
    return suite.compute()
