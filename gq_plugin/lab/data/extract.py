"""Photo extraction helpers: Qt ``.rcc`` bundles, Enlightenment ``.edj`` files, Debian copyright (DEP-5) licences."""

from __future__ import annotations

import fnmatch
import io
import os
import re
import struct
import zlib
from collections.abc import Iterator

import numpy as np

# ============================================================================ extraction helpers

def _open_rgb(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _to_rgb(im, background=(0, 0, 0)):
    """RGB copy; transparency composited on ``background``."""
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, background)
        bg.paste(rgba, mask=rgba.split()[-1])
        return bg
    return im.convert("RGB")


def _is_colour(im, tol: int = 3) -> bool:
    a = np.asarray(_to_rgb(im).resize((64, 64)), dtype=np.int16)
    return bool(np.abs(a[..., 0] - a[..., 1]).max() > tol or np.abs(a[..., 1] - a[..., 2]).max() > tol)


def rcc_entries(data: bytes) -> Iterator[tuple[str, bytes]]:
    """``(path, bytes)`` of every file in a Qt binary resource (``.rcc``) bundle.

    Parses the ``qres`` header, the node tree and the UTF-16 name table (format versions 1-3);
    zlib-compressed entries are inflated (zstd ones are skipped).
    """
    if data[:4] != b"qres":
        raise ValueError("not a Qt .rcc bundle")
    version, tree, payload, names = struct.unpack(">IIII", data[4:20])
    node = 14 if version < 2 else 22

    def name_at(off: int) -> str:
        (n,) = struct.unpack(">H", data[names + off : names + off + 2])
        return data[names + off + 6 : names + off + 6 + 2 * n].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        i, prefix = stack.pop()
        base = tree + i * node
        name_off, flags = struct.unpack(">IH", data[base : base + 6])
        name = name_at(name_off) if i else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", data[base + 6 : base + 14])
            sub = f"{prefix}{name}/" if i else ""
            stack.extend((c, sub) for c in range(first, first + count))
            continue
        (off,) = struct.unpack(">I", data[base + 10 : base + 14])
        (size,) = struct.unpack(">I", data[payload + off : payload + off + 4])
        raw = data[payload + off + 4 : payload + off + 4 + size]
        if flags & 4:  # zstd: not in the stdlib, and not used by the photo bundles
            continue
        if flags & 1:
            raw = zlib.decompress(raw[4:])
        yield prefix + name, raw


def edj_largest_jpeg(data: bytes) -> tuple[bytes, object] | None:
    """Largest decodable JPEG stream inside an EET (``.edj``) file: ``(bytes, PIL image)``."""
    best = None
    i = 0
    while (i := data.find(b"\xff\xd8\xff", i)) >= 0:
        j = data.find(b"\xff\xd9", i)
        im = None
        while j > 0:
            try:
                im = _open_rgb(data[i : j + 2])
                break
            except Exception:  # EOI marker inside the stream: try the next one
                j = data.find(b"\xff\xd9", j + 2)
        if im is None:
            i += 3
            continue
        if best is None or im.size[0] * im.size[1] > best[1].size[0] * best[1].size[1]:
            best = (data[i : j + 2], im)
        i = j + 2
    return best


def _dep5_licenses(copyright_text: str) -> list[tuple[list[str], str, str]]:
    """``[(file patterns, license, copyright holder)]`` of a machine-readable copyright file."""
    out = []
    for para in re.split(r"\n\s*\n", copyright_text):
        fields: dict[str, str] = {}
        first: dict[str, str] = {}  # the value on the key's own line
        key = None
        for line in para.splitlines():
            if (line[:1] in (" ", "\t") or ":" not in line) and key:  # continuation line
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                fields[key] = first[key] = val.strip()
        if "files" in fields and "license" in fields:
            lic = first.get("license", "")[:60]
            holder = fields.get("copyright", "")[:120]
            out.append((fields["files"].split(), lic, holder))
    return out


def _license_for(path_in_pkg: str, dep5, default: str) -> str:
    """Licence hint of one file: the last matching DEP-5 paragraph, else ``default``."""
    stem = os.path.splitext(path_in_pkg)[0]
    hit = None
    for patterns, lic, holder in dep5:
        for pat in patterns:
            if pat == "*":
                continue
            p = pat.lstrip("./")
            base = os.path.basename(p)
            specific = not any(c in base for c in "*?[")  # a named file, not a wildcard
            if (
                fnmatch.fnmatch(path_in_pkg, p)
                or fnmatch.fnmatch(path_in_pkg, "*/" + p)
                or fnmatch.fnmatch(stem, "*/" + os.path.splitext(p)[0])
                or (specific and os.path.splitext(base)[0] == os.path.basename(stem))
            ):
                hit = (lic, holder)
    if hit is None:
        return default
    lic, holder = hit
    return f"{lic} ({holder})" if holder else lic
