"""The ``.gqt`` token file: GQ indices bit-packed at ``ceil(log2 K)`` bits each.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic  b"GQT\\x00"
    4       2     format version (1)
    6       4     header length H (bytes, <= 1 MiB)
    10      H     header: UTF-8 JSON object (see TokenHeader)
    10+H    P     payload: indices, row-major, each as ``bits`` bits, LSB first, zero padded
                  to a whole byte; P = ceil(n * bits / 8), n = prod(shape)
    10+H+P  4     CRC-32 of every byte before it

The header records everything needed to refuse a wrong decoder: codebook size K, codebook
dimension m, grouping, codebook kind + seed + fingerprint, the index tensor's shape and
layout, the model id, the image size (for the real bits per pixel) and free-form ``extra``.

Layouts (:data:`LAYOUTS`): image token grids ``"B,G,H,W"``, video ``"B,G,T,H,W"`` (``T`` latent
frames; ``image_size`` is the frame size, ``extra["num_frames"]`` the decoded frames when known),
audio ``"B,G,T"``, sequences ``"B,N,G"`` and single tokens ``"B,G"``.
Readers validate every field, the lengths and the CRC, so truncated or corrupt files raise
``ValueError`` instead of decoding garbage.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import numpy as np
import torch

from .codebook import CODEBOOK_KINDS, GROUPINGS, as_index_tensor

#: ``codebook`` of a header whose indices address a trained codebook (VQ / FSQ / LFQ / BSQ /
#: TokenBridge baselines) rather than a GQ codebook generated from a seed; its ``fingerprint`` then
#: identifies the trained codebook's weights
LEARNED_CODEBOOK = "learned"
MAGIC = b"GQT\x00"
VERSION = 1
MAX_HEADER_BYTES = 1 << 20
MAX_CODEBOOK_SIZE = 1 << 31
MAX_DIM = 2**31 - 1
MAX_INDICES = 1 << 40
LAYOUTS = {"B,G,H,W": 4, "B,G,T,H,W": 5, "B,G,T": 3, "B,N,G": 3, "B,G": 2}  # layout -> number of dims
_GRID_AXES = {"B,G,H,W": (2, 3), "B,G,T,H,W": (3, 4)}  # layouts with a spatial token grid -> its (H, W) axes
_PRE = struct.Struct("<4sHI")


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"corrupt token file header: duplicate key(s) {dup}")
    return dict(pairs)


def bits_per_index(codebook_size: int) -> int:
    """``ceil(log2 K)`` (at least 1)."""
    if codebook_size < 2:
        raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
    return max(1, (int(codebook_size) - 1).bit_length())


@dataclass
class TokenHeader:
    """Metadata stored in front of the packed indices."""

    codebook_size: int
    codebook_dim: int
    grouping: str
    codebook: str
    seed: int
    fingerprint: str
    shape: tuple[int, ...]
    layout: str = "B,G,H,W"
    model_id: str = ""
    image_size: tuple[int, int] | None = None  # (H, W) of the decoded images
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_quantizer(cls, quantizer, shape, model_id: str = "", image_size=None, layout: str | None = None, extra=None) -> "TokenHeader":
        """Header describing ``quantizer``'s discrete representation (a GaussianQuantizer)."""
        if layout is None:
            layout = {5: "B,G,T,H,W", 4: "B,G,H,W", 3: "B,N,G"}.get(len(shape), "B,G")
        return cls(
            codebook_size=quantizer.codebook_size,
            codebook_dim=quantizer.codebook_dim,
            grouping=quantizer.grouping,
            codebook=quantizer.codebook_kind,
            seed=quantizer.seed,
            fingerprint=quantizer.fingerprint,
            shape=tuple(int(s) for s in shape),
            layout=layout,
            model_id=model_id,
            image_size=None if image_size is None else (int(image_size[0]), int(image_size[1])),
            extra=dict(extra or {}),
        )

    @property
    def num_indices(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int:
        return bits_per_index(self.codebook_size)

    @property
    def num_pixels(self) -> int | None:
        """Decoded pixels of the whole batch (None if the image size -- for video also
        ``extra["num_frames"]`` -- is unknown)."""
        if not self.image_size:
            return None
        frames = 1
        if self.layout == "B,G,T,H,W":
            frames = self.extra.get("num_frames")
            if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
                return None
        return (self.shape[0] if self.shape else 1) * frames * self.image_size[0] * self.image_size[1]

    def nominal_bpp(self) -> float | None:
        """``n * log2 K / pixels`` (None if the image size is unknown)."""
        return None if self.num_pixels is None else self.num_indices * math.log2(self.codebook_size) / self.num_pixels

    def check_compatible(self, quantizer) -> None:
        """Raise ``ValueError`` naming every setting where the file and ``quantizer`` differ."""
        diffs = []
        for name, mine in (
            ("codebook_size", quantizer.codebook_size),
            ("codebook_dim", quantizer.codebook_dim),
            ("grouping", quantizer.grouping),
            ("codebook", quantizer.codebook_kind),
            ("seed", quantizer.seed),
            ("fingerprint", quantizer.fingerprint),
        ):
            theirs = getattr(self, name)
            if theirs != mine:
                diffs.append(f"{name}: file {theirs!r} vs model {mine!r}")
        groups = getattr(quantizer, "num_codebooks", None)
        g_axis = self.layout.split(",").index("G") if self.layout in LAYOUTS else None
        if groups is not None and g_axis is not None and len(self.shape) > g_axis and self.shape[g_axis] != groups:
            diffs.append(f"sub-codebooks per token (G in layout {self.layout}): file {self.shape[g_axis]} vs model {groups}")
        if diffs:
            raise ValueError("token file does not match the model's codebook: " + "; ".join(diffs))

    # ---------------------------------------------------------------- (de)serialisation

    def to_json(self) -> bytes:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["image_size"] = None if self.image_size is None else list(self.image_size)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> "TokenHeader":
        try:
            d = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt token file header: {e}") from None
        except RecursionError:
            raise ValueError("corrupt token file header: JSON nested too deeply") from None
        if not isinstance(d, dict):
            raise ValueError("corrupt token file header: not a JSON object")
        expected = {f for f in cls.__dataclass_fields__}
        if set(d) != expected:
            raise ValueError(f"corrupt token file header: fields {sorted(d)} != {sorted(expected)}")

        def _int(name, lo, hi):
            v = d[name]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"corrupt token file header: {name}={v!r} not an int in [{lo}, {hi}]")
            return v

        k = _int("codebook_size", 2, MAX_CODEBOOK_SIZE)
        m = _int("codebook_dim", 1, 1 << 16)
        seed = _int("seed", -(2**63), 2**63 - 1)
        if d["grouping"] not in GROUPINGS:
            raise ValueError(f"corrupt token file header: grouping={d['grouping']!r}")
        if d["codebook"] not in (*CODEBOOK_KINDS, LEARNED_CODEBOOK):
            raise ValueError(f"corrupt token file header: codebook={d['codebook']!r}")
        for name in ("fingerprint", "layout", "model_id"):
            if not isinstance(d[name], str):
                raise ValueError(f"corrupt token file header: {name} must be a string")
        shape = d["shape"]
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= 8
            or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_DIM for s in shape)
            or math.prod(shape) > MAX_INDICES
        ):
            raise ValueError(f"corrupt token file header: shape={shape!r} (at most 8 dims of <= 2**31 - 1, <= 2**40 indices)")
        layout = d["layout"]
        if LAYOUTS.get(layout) != len(shape):
            raise ValueError(f"corrupt token file header: layout={layout!r} does not describe a {len(shape)}-d shape (valid: {sorted(LAYOUTS)})")
        img = d["image_size"]
        if img is not None and (not isinstance(img, list) or len(img) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or not 0 < s <= MAX_DIM for s in img)):
            raise ValueError(f"corrupt token file header: image_size={img!r}")
        if img is not None and layout in _GRID_AXES:  # both sides downsampled by the same factor
            h, w = (shape[a] for a in _GRID_AXES[layout])
            if h == 0 or w == 0 or img[0] % h or img[1] % w or img[0] // h != img[1] // w:
                raise ValueError(
                    f"corrupt token file header: image_size={img} is not the token grid (H, W)=({h}, {w}) times one factor "
                    "(permuted H/W?)"
                )
        if not isinstance(d["extra"], dict):
            raise ValueError("corrupt token file header: extra must be an object")
        return cls(k, m, d["grouping"], d["codebook"], seed, d["fingerprint"], tuple(shape), layout, d["model_id"], None if img is None else tuple(img), d["extra"])


# --------------------------------------------------------------------------- bit packing


def pack_indices(indices: np.ndarray | torch.Tensor, bits: int) -> bytes:
    """Pack non-negative integers < 2**bits into a little-endian bitstream."""
    a = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    a = a.reshape(-1).astype(np.uint64, copy=False)
    if not 1 <= bits <= 63:
        raise ValueError(f"bits must be in [1, 63], got {bits}")
    if a.size and int(a.max()) >> bits:
        raise ValueError(f"indices do not fit in {bits} bits (max {int(a.max())})")
    out = bytearray()
    chunk = max(1, (1 << 22) // bits)  # bound the temporary bit matrix
    shifts = np.arange(bits, dtype=np.uint64)
    pending = np.zeros(0, dtype=np.uint8)
    for s in range(0, a.size, chunk):
        bitmat = ((a[s : s + chunk, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)
        bitmat = np.concatenate([pending, bitmat])
        whole = bitmat.size - bitmat.size % 8
        out += np.packbits(bitmat[:whole], bitorder="little").tobytes()
        pending = bitmat[whole:]
    if pending.size:
        out += np.packbits(pending, bitorder="little").tobytes()
    return bytes(out)


def unpack_indices(payload: bytes, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_indices`: ``count`` integers (int64)."""
    need = (count * bits + 7) // 8
    if len(payload) != need:
        raise ValueError(f"payload has {len(payload)} bytes, expected {need} for {count} indices of {bits} bits")
    raw = np.frombuffer(payload, dtype=np.uint8)
    out = np.empty(count, dtype=np.int64)
    weights = (np.uint64(1) << np.arange(bits, dtype=np.uint64)).astype(np.uint64)
    chunk = max(8, ((1 << 22) // bits) // 8 * 8)  # multiple of 8 so chunks start on a byte
    for s in range(0, count, chunk):
        n = min(chunk, count - s)
        b0, b1 = s * bits, (s + n) * bits
        bits_arr = np.unpackbits(raw[b0 // 8 : (b1 + 7) // 8], bitorder="little")[b0 % 8 : b0 % 8 + n * bits]
        out[s : s + n] = (bits_arr.reshape(n, bits).astype(np.uint64) @ weights).astype(np.int64)
    return out


# --------------------------------------------------------------------------- files


def dumps(indices: torch.Tensor, header: TokenHeader) -> bytes:
    """Serialise ``indices`` (shape ``header.shape``) with ``header`` to bytes."""
    if tuple(indices.shape) != tuple(header.shape):
        raise ValueError(f"indices shape {tuple(indices.shape)} != header shape {tuple(header.shape)}")
    indices = as_index_tensor(indices)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= header.codebook_size):
        raise ValueError(f"indices must lie in [0, {header.codebook_size})")
    hjson = header.to_json()
    body = _PRE.pack(MAGIC, VERSION, len(hjson)) + hjson + pack_indices(indices, header.bits)
    return body + struct.pack("<I", zlib.crc32(body))


def loads(data: bytes, quantizer=None) -> tuple[torch.Tensor, TokenHeader]:
    """Parse bytes from :func:`dumps`; raises ``ValueError`` on any inconsistency (see
    :func:`load_tokens`)."""
    return _read(io.BytesIO(data), quantizer, len(data))


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"token file truncated: {what} needs {n} bytes, got {len(data)}")
    return data


def _read(f: BinaryIO, quantizer=None, size: int | None = None) -> tuple[torch.Tensor, TokenHeader]:
    """Read one token file from ``f``: the preamble, the header (checked against ``quantizer``
    when given), then exactly the payload the header's shape needs and the CRC -- never more."""
    pre = f.read(_PRE.size)
    if len(pre) < _PRE.size:
        raise ValueError(f"token file too short ({len(pre)} bytes)")
    magic, version, hlen = _PRE.unpack(pre)
    if magic != MAGIC:
        raise ValueError(f"not a GQ token file (magic {magic!r})")
    if version != VERSION:
        raise ValueError(f"unsupported token file version {version} (this library reads {VERSION})")
    if hlen > MAX_HEADER_BYTES or (size is not None and _PRE.size + hlen + 4 > size):
        raise ValueError(f"token file truncated or corrupt (header length {hlen}{'' if size is None else f', file {size} bytes'})")
    hraw = _read_exact(f, hlen, "the header")
    header = TokenHeader.from_json(hraw)
    if quantizer is not None:  # refuse a file for another codebook before reading its payload
        header.check_compatible(quantizer)
    count, bits = header.num_indices, header.bits
    need = (count * bits + 7) // 8
    if size is not None and _PRE.size + hlen + need + 4 != size:
        raise ValueError(
            f"token file size {size} does not match its header: shape {list(header.shape)} at {bits} bits needs a "
            f"{need}-byte payload ({_PRE.size + hlen + need + 4} bytes in all)"
        )
    payload = _read_exact(f, need, f"the payload of shape {list(header.shape)}")
    (crc,) = struct.unpack("<I", _read_exact(f, 4, "the checksum"))
    if f.read(1):
        raise ValueError("token file has bytes after its checksum")
    if zlib.crc32(payload, zlib.crc32(hraw, zlib.crc32(pre))) != crc:
        raise ValueError("token file checksum mismatch: truncated or corrupt")
    values = unpack_indices(payload, count, bits)
    if values.size and int(values.max()) >= header.codebook_size:
        raise ValueError(f"token file holds indices >= codebook_size {header.codebook_size}")
    return torch.from_numpy(values).reshape(header.shape), header


def save_tokens(file: str | os.PathLike | BinaryIO, indices: torch.Tensor, header: TokenHeader) -> int:
    """Write a ``.gqt`` file; returns its size in bytes."""
    data = dumps(indices, header)
    if isinstance(file, (str, os.PathLike)):
        with open(file, "wb") as f:
            f.write(data)
    else:
        file.write(data)
    return len(data)


def load_tokens(file: str | os.PathLike | BinaryIO | bytes, quantizer=None) -> tuple[torch.Tensor, TokenHeader]:
    """Read a ``.gqt`` file: ``(indices int64, header)``.

    With ``quantizer`` (the decoding model's :class:`~gq_plugin.GaussianQuantizer`) the header is
    checked against it (:meth:`TokenHeader.check_compatible`) before the payload is read or
    unpacked. Reads are bounded by the header: at most ``ceil(n * bits / 8)`` payload bytes for
    its shape, and a regular file whose size differs from what its header implies is refused
    before its payload is read. Directories, devices and corrupt files raise ``ValueError``.
    """
    if isinstance(file, (bytes, bytearray)):
        return loads(bytes(file), quantizer)
    if isinstance(file, (str, os.PathLike)):
        if os.path.isdir(file):
            raise ValueError(f"{os.fspath(file)!r} is a directory, not a token file")
        regular = os.path.isfile(file)  # a device or a pipe has no size to check against
        with open(file, "rb") as f:
            return _read(f, quantizer, os.fstat(f.fileno()).st_size if regular else None)
    if isinstance(file, io.BytesIO):
        return loads(file.getvalue(), quantizer)
    return _read(file, quantizer)

