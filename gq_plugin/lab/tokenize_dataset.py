"""``gq tokenize``: a whole image dataset -> sharded, bit-packed token files + ``manifest.json``.

MODEL is any tokenizer the library trains (:mod:`gq_plugin.lab.tokenizer`): a GQ model, or a
VQ / FSQ / LFQ / BSQ / TokenBridge baseline checkpoint of ``gq train`` (its codebook size in the
manifest, ``codebook="learned"``); the token files have one format for all of them.

What autoregressive training on GQ tokens (TokenBridge-style and others) needs first::

    gq tokenize runs/demo/final ~/photos --out tokens/ --size 256
    accelerate launch --num_processes 8 -m gq_plugin.lab.cli tokenize MODEL 'shards/{000000..000127}.tar' --out tokens/

* SOURCE: image folders (searched recursively, sorted), or webdataset-style uncompressed ``.tar``
  shards (a directory of them, a glob, or a ``{000..127}`` brace range). In a tar, the members
  ``dir/key.ext`` of one sample share ``dir/key``; the first image member of each sample is used.
* Output: ``DIR/shard-000000.gqt`` ... -- ordinary ``.gqt`` token files (:mod:`gq_plugin.tokens`:
  bit-packed at ceil(log2 K) bits, CRC-checked) holding the indices of ``shard_size`` consecutive
  images, their keys in ``header.extra["keys"]``; ``DIR/plan.json`` (written at the start: model
  fingerprint, K, m, image size, shard size, source listing digest) and ``DIR/manifest.json``
  (plan + per-shard counts, written once every shard exists).
* Resumable: each shard is written to a temporary file and ``os.replace``-d into place, so a file
  named ``shard-*.gqt`` is always complete; a re-run with the same settings skips finished shards,
  so a killed run loses at most the shard each process was working on. A re-run with different
  settings into the same DIR raises ``ValueError`` naming the differences.
* Multi-process / multi-GPU: under ``accelerate launch`` (or ``torch.distributed``), shard ``i``
  belongs to rank ``i % world_size``; no two ranks ever write the same file, and rank 0 writes the
  manifest after a barrier.

:class:`TokenDataset` reads the shards back as int64 tensors (one image's index map per item).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tokens import MAX_HEADER_BYTES, TokenHeader, dumps, load_tokens

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PLAN = "plan.json"
MANIFEST = "manifest.json"
FORMAT = "gq-token-shards"
VERSION = 1


def shard_name(i: int) -> str:
    """File name of shard ``i``."""
    return f"shard-{i:06d}.gqt"


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Item:
    """One image of the dataset: ``key`` (unique name), ``path`` (file or tar), and for a tar
    member the byte ``offset`` and ``size`` of its data."""

    key: str
    path: str
    offset: int = -1
    size: int = -1


def _expand_braces(pattern: str) -> list[str]:
    """webdataset-style ``{000..127}`` numeric ranges (zero padding kept), left to right."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    a, b = m.group(1), m.group(2)
    if int(b) < int(a):
        raise ValueError(f"source {pattern!r}: empty range {{{a}..{b}}}")
    width = len(a) if a.startswith("0") else 0
    out = []
    for i in range(int(a), int(b) + 1):
        out += _expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :])
    return out


def _tar_items(path: str) -> list[Item]:
    if path.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise ValueError(f"source {path!r}: compressed tar files are not supported (images are read by offset; "
                         "use uncompressed .tar shards, as webdataset writes them)")
    items, seen = [], set()
    try:
        with tarfile.open(path, "r:") as t:
            for m in t:
                if not m.isfile():
                    continue
                stem, dot, ext = m.name.rpartition("/")[2].partition(".")
                if not dot or "." + ext.rsplit(".", 1)[-1].lower() not in IMAGE_SUFFIXES:
                    continue
                key = f"{Path(path).name}/{m.name.rpartition('/')[0] + '/' if '/' in m.name else ''}{stem}"
                if key not in seen:  # first image member of a sample
                    seen.add(key)
                    items.append(Item(key, path, m.offset_data, m.size))
    except tarfile.TarError as e:
        raise ValueError(f"source {path!r} is not a readable tar file: {e}") from None
    return items


def _folder_items(root: Path) -> list[Item]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [Item(p.relative_to(root).as_posix(), str(p)) for p in files]


def list_items(sources) -> list[Item]:
    """The dataset's images in a fixed order (sources as given; files sorted; tar members in order)."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    items: list[Item] = []
    for src in sources:
        src = os.path.expanduser(str(src))
        paths = []
        for pat in _expand_braces(src):
            paths += sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        if not paths:
            raise ValueError(f"source {src!r} matches no file")
        for p in paths:
            if os.path.isdir(p):
                found = _folder_items(Path(p))
                if not found:  # a directory of tar shards
                    tars = sorted(str(t) for t in Path(p).glob("*.tar"))
                    found = [it for t in tars for it in _tar_items(t)]
                if not found:
                    raise ValueError(f"source {p!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards")
                if len(sources) > 1 or len(paths) > 1:  # keep keys unique across sources
                    found = [Item(f"{Path(p).name}/{it.key}", it.path, it.offset, it.size) for it in found]
                items += found
            elif os.path.isfile(p):
                if p.lower().endswith(IMAGE_SUFFIXES):
                    items.append(Item(Path(p).name, p))
                else:
                    items += _tar_items(p)
            else:
                raise ValueError(f"source {p!r} does not exist")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"two source images share the key {dup!r}; pass sources with distinct names")
    return items


class _ImageItems(torch.utils.data.Dataset):
    """Reads, resizes and centre-crops ``items[ids[j]]``; yields ``(image (3, S, S) in [-1, 1], item id)``."""

    def __init__(self, items: list[Item], ids: list[int], size: int, multiple: int) -> None:
        self.items, self.ids, self.size, self.multiple = items, ids, size, multiple
        self._files: dict[str, object] = {}  # open tar files, per worker process

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int):
        from PIL import Image

        from .codec import image_to_tensor

        i = self.ids[j]
        it = self.items[i]
        try:
            if it.offset < 0:
                im = Image.open(it.path)
            else:
                f = self._files.get(it.path)
                if f is None:
                    f = self._files[it.path] = open(it.path, "rb")
                f.seek(it.offset)
                im = Image.open(io.BytesIO(f.read(it.size)))
            return image_to_tensor(im, self.size, self.multiple, name=it.key), i
        except (OSError, SyntaxError) as e:  # PIL raises these for broken files
            raise ValueError(f"cannot read image {it.key!r} from {it.path}: {e}") from None


# --------------------------------------------------------------------------- plan / manifest


def _listing_digest(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\0{it.size}\n".encode())
    return h.hexdigest()[:16]


def _plan(tok, model_dir, items: list[Item], size, shard_size: int, sources) -> dict:
    image_size = None if size is None else list(size) if isinstance(size, (tuple, list)) else [size, size]
    return {
        "format": FORMAT, "version": VERSION,
        "model_id": tok.model_id, **tok.describe(), "quantizer": tok.kind,
        "model_dir": None if model_dir is None else str(Path(model_dir).resolve()),
        "image_size": image_size, "shard_size": shard_size, "num_images": len(items),
        "num_shards": (len(items) + shard_size - 1) // shard_size,
        "listing_sha256": _listing_digest(items), "sources": [str(s) for s in sources],
    }


_PLAN_CHECKED = ("model_id", "fingerprint", "codebook_size", "codebook_dim", "grouping", "codebook", "seed", "image_size",
                 "shard_size", "num_images", "listing_sha256")


def _check_plan(old: dict, new: dict, out: Path) -> None:
    diffs = [f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in _PLAN_CHECKED if old.get(k) != new[k]]
    if diffs:
        raise ValueError(f"--out {str(out)!r} holds shards made with other settings ({'; '.join(diffs)}); "
                         "use another --out folder or delete it")


def _write_atomic(path: Path, data: bytes, tag: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dist() -> tuple[int, int, torch.device, object]:
    """``(rank, world_size, device, barrier)`` from accelerate (``accelerate launch``), else one process."""
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate ships with the diffusers extra
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), lambda: None
    st = PartialState(cpu=not torch.cuda.is_available())  # without CUDA, cpu=True makes a launcher's ranks use gloo
    return st.process_index, st.num_processes, st.device, st.wait_for_everyone


# --------------------------------------------------------------------------- tokenize


def tokenize(model_dir, sources, out_dir, size: int = 256, batch_size: int = 16, workers: int = 2, shard_size: int = 1000,
             progress: bool = True, rank: int | None = None, world_size: int | None = None, device=None) -> dict:
    """Tokenize every image of ``sources`` with the GQ model in ``model_dir`` into ``out_dir``.

    ``rank`` / ``world_size`` default to accelerate's process state (one process when not
    launched); pass them to split the work between independent jobs (e.g. a cluster array), in
    which case whichever job finds every shard present writes the manifest. Returns counts:
    ``num_images``, ``num_shards``, ``written_shards``, ``written_images``, ``skipped_shards``,
    ``images_per_s`` (this process) and ``manifest`` (its path, or None while shards are missing).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .tokenizer import load_tokenizer

    for name, v, lo in (("size", size, 1), ("batch_size", batch_size, 1), ("workers", workers, 0), ("shard_size", shard_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    d_rank, d_world, d_device, barrier = _dist() if rank is None or world_size is None else (0, 1, None, lambda: None)
    explicit = rank is not None and world_size is not None
    rank, world_size = (rank, world_size) if explicit else (d_rank, d_world)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    device = torch.device(device) if device is not None else (d_device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    tok = load_tokenizer(model_dir, "MODEL")
    f = tok.factor
    if size % f:
        raise ValueError(f"size={size} must be a multiple of the model's downsampling factor {f}")
    items = list_items(sources)
    if not items:
        raise ValueError("SOURCE holds no images")
    out = Path(out_dir)
    plan = _plan(tok, model_dir, items, size, shard_size, sources if not isinstance(sources, (str, os.PathLike)) else [sources])
    if (out / PLAN).is_file():
        _check_plan(json.loads((out / PLAN).read_text()), plan, out)
    barrier()  # every rank has compared against the old plan before rank 0 replaces it
    out.mkdir(parents=True, exist_ok=True)
    if (rank == 0 or explicit) and not (out / PLAN).is_file():
        _write_atomic(out / PLAN, json.dumps(plan, indent=1).encode(), "plan")
    n, num_shards = len(items), plan["num_shards"]
    mine = [s for s in range(num_shards) if s % world_size == rank]
    for stale in out.glob(f".shard-*.gqt.tmp-r{rank}-*"):  # left by a killed run of this rank
        stale.unlink()
    todo = [s for s in mine if not (out / shard_name(s)).is_file()]
    ids = [i for s in todo for i in range(s * shard_size, min(n, (s + 1) * shard_size))]

    tok.to(device)
    loader = DataLoader(_ImageItems(items, ids, size, f), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    pbar = tqdm(total=len(ids), unit="img", desc=f"tokenize{f' rank {rank}/{world_size}' if world_size > 1 else ''}",
                disable=not progress, dynamic_ncols=True)
    pending: list[torch.Tensor] = []
    pending_ids: list[int] = []
    shard_iter = iter(todo)
    cur = next(shard_iter, None)
    written, t0 = 0, time.time()
    with torch.inference_mode():
        for x, batch_ids in loader:
            idx = tok.encode(x.to(device, non_blocking=True)).cpu()
            pending.append(idx.to(torch.int32) if tok.codebook_size <= 2**31 else idx)
            pending_ids += batch_ids.tolist()
            pbar.update(len(batch_ids))
            while cur is not None:
                first, count = cur * shard_size, min(n, (cur + 1) * shard_size) - cur * shard_size
                if len(pending_ids) < count:
                    break
                block = torch.cat(pending)
                assert pending_ids[:count] == list(range(first, first + count))  # loader order = shard order
                _write_shard(out, cur, block[:count], items[first : first + count], tok, (size, size), rank, first)
                written += 1
                pending, pending_ids = [block[count:]], pending_ids[count:]
                pbar.set_postfix(shards=f"{written}/{len(todo)}")
                cur = next(shard_iter, None)
    pbar.close()
    elapsed = time.time() - t0
    barrier()
    info = {"num_images": n, "num_shards": num_shards, "written_shards": written, "written_images": len(ids),
            "skipped_shards": len(mine) - len(todo), "images_per_s": len(ids) / elapsed if ids and elapsed > 0 else 0.0,
            "elapsed_s": elapsed, "manifest": None, "rank": rank, "world_size": world_size}
    if rank == 0 or explicit:
        info["manifest"] = write_manifest(out)
    return info


def _write_shard(out: Path, s: int, indices: torch.Tensor, items: list[Item], tok, image_size, rank: int, first: int,
                 layout: str | None = None, extra: dict | None = None) -> None:
    header = tok.header(tuple(indices.shape), image_size=image_size, layout=layout,
                        extra={**(extra or {}), "shard": s, "first": first, "rank": rank, "keys": [it.key for it in items]})
    if len(header.to_json()) > MAX_HEADER_BYTES // 2:
        raise ValueError(f"shard {s}: its {len(items)} keys make the header too large; lower --shard-size")
    _write_atomic(out / shard_name(s), dumps(indices, header), f"r{rank}-{os.getpid()}")


def write_manifest(out_dir) -> str | None:
    """Write ``manifest.json`` (the plan plus every shard's file, count and first image) once every
    shard of ``plan.json`` exists; returns its path, or None while shards are missing."""
    out = Path(out_dir)
    plan = json.loads((out / PLAN).read_text())
    n, ss = plan["num_images"], plan["shard_size"]
    shards = [{"file": shard_name(s), "first": s * ss, "count": min(n, (s + 1) * ss) - s * ss} for s in range(plan["num_shards"])]
    if not all((out / sh["file"]).is_file() for sh in shards):
        return None
    _, h0 = load_tokens(out / shards[0]["file"])
    manifest = {**plan, "token_shape": list(h0.shape[1:]), "layout": h0.layout, "bits_per_index": h0.bits,
                "bytes": sum((out / sh["file"]).stat().st_size for sh in shards), "shards": shards}
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode(), f"{os.getpid()}")
    return str(out / MANIFEST)


def write_token_shards(out_dir, indices: torch.Tensor, vae, keys: list[str] | None = None, model_id: str = "",
                       shard_size: int = 1000, image_size=None, layout: str | None = None, extra: dict | None = None) -> str:
    """Write indices computed elsewhere -- e.g. video tokens ``(N, G, T, h, w)`` or audio tokens
    ``(N, G, T)`` from ``vae.encode_indices`` -- as ``gq tokenize``-style shards plus
    ``manifest.json``, which :class:`TokenDataset` reads (item ``i`` = ``indices[i]``, time axis
    kept). ``layout`` defaults by dims (5: ``"B,G,T,H,W"``; pass ``"B,G,T"`` for audio);
    ``image_size`` is the decoded image or frame size ``(H, W)``; ``extra`` goes into every
    shard's header (e.g. ``{"num_frames": F}``). Returns the manifest's path."""
    if not isinstance(indices, torch.Tensor) or indices.ndim < 2 or indices.shape[0] == 0:
        raise ValueError(f"indices must be a non-empty (N, ...) tensor, got {getattr(indices, 'shape', type(indices).__name__)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    n = indices.shape[0]
    keys = [str(i) for i in range(n)] if keys is None else [str(k) for k in keys]
    if len(keys) != n or len(set(keys)) != n:
        raise ValueError(f"keys must be {n} distinct names (one per item), got {len(keys)} ({len(set(keys))} distinct)")
    items = [Item(k, "") for k in keys]
    out = Path(out_dir)
    from .tokenizer import GQTokenizer

    tok = GQTokenizer.from_vae(vae, model_id)
    plan = _plan(tok, None, items, image_size, shard_size, [])
    if (out / PLAN).is_file():
        _check_plan(json.loads((out / PLAN).read_text()), plan, out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / PLAN, json.dumps(plan, indent=1).encode(), "plan")
    for s in range(plan["num_shards"]):
        first = s * shard_size
        block = indices[first : first + shard_size].cpu()
        _write_shard(out, s, block, items[first : first + shard_size], tok, image_size, 0, first, layout, extra)
    return write_manifest(out)


# --------------------------------------------------------------------------- reading back


class TokenDataset(torch.utils.data.Dataset):
    """The token shards of ``gq tokenize`` (or :func:`write_token_shards`) as a map-style dataset of int64 index maps.

    ``ds[i]`` is item ``i``'s indices (``manifest["token_shape"]``, int64: ``(G, h, w)`` for an
    image, ``(G, T, h, w)`` for a video, ``(G, T)`` for audio; :attr:`layout` names the shards'
    layout, e.g. ``"B,G,T,H,W"``), or ``(indices, key)``
    with ``return_keys=True``. ``in_memory=True`` loads every shard once (stored as int16/int32);
    ``in_memory=False`` reads shards on demand and keeps the last ``cache_shards`` of them (per
    DataLoader worker). Every shard is checked against the manifest (fingerprint, K, m, count).
    """

    def __init__(self, root, in_memory: bool = True, return_keys: bool = False, cache_shards: int = 2) -> None:
        self.root = Path(root)
        mf = self.root / MANIFEST
        if not mf.is_file():
            raise ValueError(f"root {str(root)!r} has no {MANIFEST} (is `gq tokenize` finished? re-run it to complete missing shards)")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{mf} is not a {FORMAT} v{VERSION} manifest")
        self.shards = self.manifest["shards"]
        self.token_shape = tuple(self.manifest["token_shape"])
        self.layout = self.manifest.get("layout", "B,G,H,W")  # of the shards: an item drops the leading B
        self.codebook_size = int(self.manifest["codebook_size"])
        self.return_keys = return_keys
        self.cache_shards = max(1, int(cache_shards))
        self._cache: dict[int, tuple[torch.Tensor, list[str]]] = {}
        self._dtype = torch.int16 if self.codebook_size <= 2**15 else (torch.int32 if self.codebook_size <= 2**31 else torch.int64)
        self._data = None
        if in_memory:
            loaded = [self._load(s) for s in range(len(self.shards))]
            self._data = torch.cat([t for t, _ in loaded])
            self._keys = [k for _, ks in loaded for k in ks]

    def _load(self, s: int) -> tuple[torch.Tensor, list[str]]:
        sh = self.shards[s]
        try:
            idx, h = load_tokens(self.root / sh["file"])
        except (ValueError, OSError) as e:  # name the shard: "checksum mismatch" alone does not say where
            raise ValueError(f"shard {sh['file']}: {e}") from None
        mf = self.manifest
        bad = [f for f, v in (("fingerprint", h.fingerprint), ("codebook_size", h.codebook_size), ("codebook_dim", h.codebook_dim),
                              ("model_id", h.model_id)) if mf[f] != v]
        if bad or idx.shape[0] != sh["count"] or tuple(idx.shape[1:]) != self.token_shape:
            raise ValueError(f"shard {sh['file']} does not match {MANIFEST} ({', '.join(bad) or 'count/shape'})")
        return idx.to(self._dtype), list(h.extra.get("keys", []))

    def __len__(self) -> int:
        return int(self.manifest["num_images"])

    def _locate(self, i: int) -> tuple[int, int]:
        ss = int(self.manifest["shard_size"])
        return i // ss, i % ss

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        if self._data is not None:
            t, key = self._data[i], (self._keys[i] if self.return_keys else None)
        else:
            s, j = self._locate(i)
            if s not in self._cache:
                if len(self._cache) >= self.cache_shards:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[s] = self._load(s)
            data, keys = self._cache[s]
            t, key = data[j], (keys[j] if self.return_keys else None)
        t = t.long()
        return (t, key) if self.return_keys else t

    @property
    def keys(self) -> list[str]:
        """Every image's key (its path in the source folder, or ``<tar name>/<sample key>``)."""
        if self._data is not None:
            return list(self._keys)
        return [k for s in range(len(self.shards)) for k in self._load(s)[1]]

    def check_compatible(self, quantizer) -> None:
        """Raise ``ValueError`` if ``quantizer`` (a GaussianQuantizer) is not the one the tokens were made with."""
        h = TokenHeader(self.codebook_size, int(self.manifest["codebook_dim"]), self.manifest["grouping"], self.manifest["codebook"],
                        int(self.manifest["seed"]), self.manifest["fingerprint"], (0,))
        h.check_compatible(quantizer)


__all__ = ["Item", "TokenDataset", "list_items", "shard_name", "tokenize", "write_manifest", "write_token_shards"]
