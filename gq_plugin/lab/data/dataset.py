"""A crop dataset of photos (or any image folder), split by photo so no photo feeds both splits."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .extract import _to_rgb
from .sources import IMAGE_EXTENSIONS, MANIFEST, default_data_dir


def list_images(root: str | os.PathLike) -> list[Path]:
    """All images under ``root`` (recursive; jpg/jpeg/png/webp/bmp, any case), sorted."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _photo_hash(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def split_by_photo(keys: Sequence[str], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic train/eval split of photos: ``(train indices, eval indices)``.

    Photos are ranked by a seeded hash of their key (path relative to the dataset root) and
    the first ``round(eval_fraction * n)`` (at least one when ``0 < eval_fraction`` and
    ``n >= 2``) go to eval. The split depends only on the keys and the seed, not on file order
    or the machine.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(keys)
    n_eval = round(eval_fraction * n)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    order = sorted(range(n), key=lambda i: (_photo_hash(keys[i], seed), keys[i]))
    ev = sorted(order[:n_eval])
    tr = sorted(order[n_eval:])
    return tr, ev


class PhotoDataset(torch.utils.data.Dataset):
    """Square crops of real photos as float tensors ``(3, size, size)`` in ``[-1, 1]``.

    Args:
        root_or_manifest: a ``manifest.json`` written by :func:`fetch_photos`, a folder holding
            one, any folder of images (searched recursively), or a list of image paths.
        split: ``"train"`` (random crops, optional horizontal flip), ``"eval"`` (fixed,
            deterministic crops) or ``"all"`` (every photo, eval-style crops).
        size: crop side in pixels.
        eval_fraction / seed: the photo-level split (:func:`split_by_photo`); no photo is in
            both splits.
        resize: if set, each photo is first resized so its short side equals ``resize``
            (e.g. ``resize=size`` makes eval crops cover the whole photo's short side).
            Photos smaller than ``size`` are always upscaled to fit.
        scale_range: train only; multiplies the (resized) short side by a random factor in
            this range before cropping, e.g. ``(0.5, 1.0)`` for scale augmentation.
        hflip: train only; random horizontal flips.
        crops_per_image: eval: number of fixed crops per photo (the first is the centre crop,
            the others at seeded positions); train: samples per photo per epoch.
        cache: keep decoded photos in memory.
    """

    def __init__(
        self,
        root_or_manifest: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        split: str = "train",
        size: int = 64,
        eval_fraction: float = 0.1,
        seed: int = 0,
        resize: int | None = None,
        scale_range: tuple[float, float] | None = None,
        hflip: bool = True,
        crops_per_image: int = 1,
        cache: bool = False,
    ):
        if split not in ("train", "eval", "all"):
            raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
        if crops_per_image < 1:
            raise ValueError("crops_per_image must be >= 1")
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.resize, self.scale_range, self.hflip = resize, scale_range, hflip
        self.crops_per_image, self.cache = int(crops_per_image), cache
        paths, keys, self.meta = self._resolve(root_or_manifest if root_or_manifest is not None else default_data_dir())
        if not paths:
            raise FileNotFoundError(
                f"no images found in {root_or_manifest!s}; fetch photos first with "
                "`python -m gq_plugin.lab.data fetch` (or `gq data fetch`)"
            )
        tr, ev = split_by_photo(keys, eval_fraction, seed)
        idx = {"train": tr, "eval": ev, "all": list(range(len(paths)))}[split]
        self.paths = [paths[i] for i in idx]
        self.keys = [keys[i] for i in idx]
        self._cache: dict[int, object] = {}

    @staticmethod
    def _resolve(src) -> tuple[list[Path], list[str], list[dict]]:
        if isinstance(src, (list, tuple)):
            paths = [Path(p) for p in src]
            return paths, [str(p) for p in paths], [{} for _ in paths]
        src = Path(src).expanduser()
        manifest = src if src.is_file() and src.suffix == ".json" else src / MANIFEST
        if manifest.is_file():
            doc = json.loads(manifest.read_text())
            base = manifest.parent
            items = [it for it in doc["items"] if (base / it["file"]).is_file()]
            return [base / it["file"] for it in items], [it["file"] for it in items], items
        if src.is_dir():
            paths = list_images(src)
            return paths, [p.relative_to(src).as_posix() for p in paths], [{} for _ in paths]
        raise FileNotFoundError(f"{src} is neither a manifest, a folder of images, nor a list of paths")

    @property
    def n_photos(self) -> int:
        """Number of distinct photos in this split."""
        return len(self.paths)

    def __len__(self) -> int:
        return len(self.paths) * self.crops_per_image

    def _load(self, i: int):
        from PIL import Image

        if i in self._cache:
            return self._cache[i]
        with Image.open(self.paths[i]) as im:
            im = _to_rgb(im)
        if self.resize:
            im = self._resize_short(im, self.resize)
        if min(im.size) < self.size:
            im = self._resize_short(im, self.size)
        if self.cache:
            self._cache[i] = im
        return im

    @staticmethod
    def _resize_short(im, short: int):
        from PIL import Image

        w, h = im.size
        s = short / min(w, h)
        if abs(s - 1.0) < 1e-9:
            return im
        return im.resize((max(short, round(w * s)), max(short, round(h * s))), Image.Resampling.BICUBIC)

    def _eval_offset(self, i: int, j: int, w: int, h: int) -> tuple[int, int]:
        if j == 0:
            return (w - self.size) // 2, (h - self.size) // 2
        rng = np.random.default_rng([self.seed, _photo_hash(self.keys[i], self.seed) % (2**32), j])
        return int(rng.integers(0, w - self.size + 1)), int(rng.integers(0, h - self.size + 1))

    def __getitem__(self, index: int | tuple[int, int]) -> torch.Tensor:
        """Crop number ``index``. ``index`` may be a pair ``(index, sample_seed)`` (what
        :class:`ResumableSampler` yields): the train crop's randomness then comes from its own
        generator seeded with ``sample_seed`` instead of the global torch RNG."""
        gen = None
        if isinstance(index, (tuple, list)):
            index, sample_seed = index
            gen = torch.Generator().manual_seed(int(sample_seed))
        if not 0 <= index < len(self):
            raise IndexError(index)
        i, j = index % len(self.paths), index // len(self.paths)
        im = self._load(i)
        flip = False
        if self.split == "train":
            if self.scale_range is not None:
                lo, hi = self.scale_range
                f = lo + (hi - lo) * torch.rand((), generator=gen).item()
                target = max(self.size, round(min(im.size) * f))
                im = self._resize_short(im, target)
            w, h = im.size
            x0 = int(torch.randint(0, w - self.size + 1, (), generator=gen).item())
            y0 = int(torch.randint(0, h - self.size + 1, (), generator=gen).item())
            flip = self.hflip and bool(torch.rand((), generator=gen) < 0.5)
        else:
            w, h = im.size
            x0, y0 = self._eval_offset(i, j, w, h)
        crop = im.crop((x0, y0, x0 + self.size, y0 + self.size))
        arr = np.array(crop, dtype=np.uint8)
        if flip:
            arr = arr[:, ::-1]
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float()
        return t / 127.5 - 1.0

    def __repr__(self) -> str:
        return (
            f"PhotoDataset(split={self.split!r}, photos={self.n_photos}, size={self.size}, "
            f"crops_per_image={self.crops_per_image})"
        )


def images_of(batch) -> torch.Tensor:
    """The image tensor of a DataLoader batch: a bare tensor, the first item of a tuple / list, or ``batch["image"]``."""
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        return batch["image"]
    return batch


def _mix(*values: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class ResumableSampler(torch.utils.data.Sampler):
    """An endless shuffled stream of dataset indices that can restart at any sample position.

    Epoch ``e`` visits every index once, in ``randperm(num_samples)`` seeded by ``(seed, e)``.
    The sample at stream position ``p`` (counted from the start of training, all ranks and
    accumulation steps together) is yielded as ``(index, sample_seed)`` with ``sample_seed``
    derived from ``(seed, p, index)``; :class:`PhotoDataset` draws that crop's randomness from
    it. So a batch depends only on its place in the stream -- not on the global RNG, nor on how
    many batches a loader (e.g. accelerate's, which fetches one batch ahead) prefetched -- and a
    resumed run (``start`` = samples consumed before the checkpoint) sees exactly the batches
    the uninterrupted run would have seen.

    The stream has no length (``len()`` raises ``TypeError``); iterate it with ``next``.
    """

    def __init__(self, num_samples: int, seed: int = 0, start: int = 0, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.num_samples, self.seed, self.start, self.shuffle = int(num_samples), int(seed), int(start), bool(shuffle)

    def epoch_order(self, epoch: int) -> list[int]:
        """The index order of epoch ``epoch``."""
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self):
        n, p = self.num_samples, self.start
        while True:
            epoch, offset = divmod(p, n)
            for i in self.epoch_order(epoch)[offset:]:
                yield (i, _mix(self.seed, p, i))
                p += 1
