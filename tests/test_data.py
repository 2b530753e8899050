"""Offline photo fetching and the split-by-photo crop dataset."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gq_plugin.lab.data import (
    DEBIAN_SOURCES,
    PHOTO_SETS,
    PhotoDataset,
    edj_largest_jpeg,
    ensure_photos,
    fetch_main,
    fetch_photos,
    list_images,
    rcc_entries,
    split_by_photo,
    wheel_photos,
)

HAVE_WHEEL_PHOTOS = importlib.util.find_spec("skimage") is not None or importlib.util.find_spec("sklearn") is not None


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


@pytest.fixture()
def folder(tmp_path):
    """A user folder: nested dirs, mixed extensions, one non-image file, one tiny image."""
    exts = [".jpg", ".png", ".webp", ".bmp", ".JPEG"]
    for i in range(20):
        sub = tmp_path / f"d{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        _photo(120 + 7 * i, 90 + 5 * i, i).save(sub / f"img{i:02d}{exts[i % len(exts)]}")
    _photo(40, 30, 99).save(tmp_path / "tiny.png")  # smaller than the crop: upscaled
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


# ------------------------------------------------------------------------------ split
def test_split_by_photo_disjoint_deterministic():
    keys = [f"photo_{i}.jpg" for i in range(101)]
    tr, ev = split_by_photo(keys, eval_fraction=0.1, seed=0)
    assert set(tr).isdisjoint(ev) and sorted(tr + ev) == list(range(101))
    assert len(ev) == 10
    assert (tr, ev) == split_by_photo(keys, 0.1, 0)
    # independent of input order: the same photos end up in eval
    rev = keys[::-1]
    _, ev_rev = split_by_photo(rev, 0.1, 0)
    assert {keys[i] for i in ev} == {rev[i] for i in ev_rev}
    assert split_by_photo(keys, 0.1, 1)[1] != ev  # the seed matters
    assert split_by_photo(keys[:3], 0.1, 0)[1] != []  # at least one eval photo
    with pytest.raises(ValueError):
        split_by_photo(keys, 1.0)


# ------------------------------------------------------------------------------ dataset
def test_dataset_user_folder_split_and_crops(folder):
    files = list_images(folder)
    assert len(files) == 21 and all(p.suffix.lower() != ".txt" for p in files)
    train = PhotoDataset(folder, split="train", size=64, eval_fraction=0.2, seed=0)
    ev = PhotoDataset(folder, split="eval", size=64, eval_fraction=0.2, seed=0)
    assert set(train.paths).isdisjoint(ev.paths)
    assert train.n_photos + ev.n_photos == 21 and ev.n_photos == 4
    for ds in (train, ev):
        for i in range(len(ds)):
            x = ds[i]
            assert x.shape == (3, 64, 64) and x.dtype == torch.float32
            assert x.min() >= -1.0 and x.max() <= 1.0
    # train crops are random, the tiny photo is upscaled rather than dropped
    allds = PhotoDataset(folder, split="all", size=64)
    assert allds.n_photos == 21
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=8, shuffle=True)))
    assert batch.shape == (8, 3, 64, 64)


def test_eval_crops_deterministic(folder):
    a = PhotoDataset(folder, split="eval", size=48, eval_fraction=0.3, crops_per_image=3)
    b = PhotoDataset(folder, split="eval", size=48, eval_fraction=0.3, crops_per_image=3)
    assert len(a) == 3 * a.n_photos
    xa = torch.stack([a[i] for i in range(len(a))])
    xb = torch.stack([b[i] for i in range(len(b))])
    assert torch.equal(xa, xb)
    n = a.n_photos
    assert not torch.equal(xa[0], xa[n])  # crop 1 of photo 0 differs from its centre crop
    # centre crop by hand
    with Image.open(a.paths[0]) as im:
        im = im.convert("RGB")
        w, h = im.size
        x0, y0 = (w - 48) // 2, (h - 48) // 2
        ref = torch.from_numpy(np.array(im.crop((x0, y0, x0 + 48, y0 + 48)))).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(xa[0], ref)


def test_train_crops_random_flip_and_resize(folder):
    torch.manual_seed(0)
    ds = PhotoDataset(folder, split="train", size=32, resize=64, scale_range=(0.6, 1.0), crops_per_image=2, cache=True)
    assert len(ds) == 2 * ds.n_photos
    xs = torch.stack([ds[0] for _ in range(8)])
    assert xs.shape == (8, 3, 32, 32)
    assert not all(torch.equal(xs[0], x) for x in xs[1:])  # random crops
    noflip = PhotoDataset([ds.paths[0]], split="all", size=32, hflip=False)
    assert noflip.n_photos == 1


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch"):
        PhotoDataset(tmp_path, split="train")
    with pytest.raises(ValueError):
        PhotoDataset(tmp_path, split="test")


# ------------------------------------------------------------------------------ extraction
def _make_rcc(files: dict[str, tuple[bytes, bool]]) -> bytes:
    """A minimal version-1 Qt .rcc bundle: root dir -> 'res' dir -> files (optionally zlib)."""
    names = b""
    name_off = {}
    for n in ["res", *files]:
        name_off[n] = len(names)
        enc = n.encode("utf-16-be")
        names += struct.pack(">HI", len(n), 0) + enc
    payload = b""
    data_off = {}
    for n, (raw, compress) in files.items():
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw) if compress else raw
        data_off[n] = len(payload)
        payload += struct.pack(">I", len(blob)) + blob
    nodes = struct.pack(">IHII", 0, 2, 1, 1)  # root: 1 child starting at node 1
    nodes += struct.pack(">IHII", name_off["res"], 2, len(files), 2)
    for n, (_, compress) in files.items():
        nodes += struct.pack(">IHHHI", name_off[n], 1 if compress else 0, 0, 0, data_off[n])
    header_len = 20
    tree_off = header_len
    data_start = tree_off + len(nodes)
    names_start = data_start + len(payload)
    return b"qres" + struct.pack(">IIII", 1, tree_off, data_start, names_start) + nodes + payload + names


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rcc_parser_roundtrip():
    webp = _encode(_photo(160, 130, 1), "WEBP", quality=90)
    rcc = _make_rcc({"a.webp": (webp, False), "README": (b"Files: a.webp\nLicense: CC0-1.0\n", True)})
    got = dict(rcc_entries(rcc))
    assert got["res/a.webp"] == webp
    assert got["res/README"].startswith(b"Files: a.webp")
    assert Image.open(io.BytesIO(got["res/a.webp"])).size == (160, 130)
    with pytest.raises(ValueError):
        list(rcc_entries(b"nope" + bytes(30)))


def test_edj_largest_jpeg():
    small = _encode(_photo(64, 48, 2), "JPEG")
    big = _encode(_photo(300, 200, 3), "JPEG")
    blob = b"EET\x00junk" + small + b"\x00" * 17 + big + b"tail\xff\xd9"
    data, im = edj_largest_jpeg(blob)
    assert im.size == (300, 200) and data == big


def test_allow_lists_are_explicit():
    assert set(PHOTO_SETS) >= {"tiny", "small", "full", "wheels"}
    for name, pkgs in PHOTO_SETS.items():
        assert all(p in DEBIAN_SOURCES for p in pkgs), name
    for src in DEBIAN_SOURCES.values():
        assert src.items, src.package
    assert "scream.jpg" not in DEBIAN_SOURCES["darknet"].items  # a painting
    assert "umang_by_Abhishek_Mudgal.jpg" not in DEBIAN_SOURCES["lomiri-wallpapers-16.04"].items


# ------------------------------------------------------------------------------ fetching
@pytest.mark.skipif(not HAVE_WHEEL_PHOTOS, reason="pip install scikit-image scikit-learn")
def test_fetch_wheel_photos_manifest(tmp_path):
    out = tmp_path / "photos"
    manifest = fetch_photos(out, sets=("wheels",), max_short_side=96, use_apt=False, quiet=True)
    doc = json.loads(manifest.read_text())
    items = doc["items"]
    assert doc["n_photos"] == len(items) == len(list(wheel_photos())) >= 2
    assert len({it["md5"] for it in items}) == len(items)
    for it in items:
        assert (out / it["file"]).is_file()
        assert min(it["size"]) <= 96 and min(it["original_size"]) >= min(it["size"])
        assert it["source"] == "wheels" and it["license"]
        with Image.open(out / it["file"]) as im:
            assert list(im.size) == it["size"] and im.mode == "RGB"
    # idempotent: a second fetch adds nothing
    fetch_photos(out, sets=("wheels",), max_short_side=96, use_apt=False, quiet=True)
    assert json.loads(manifest.read_text())["n_photos"] == len(items)
    # the manifest feeds the dataset, split by photo
    tr = PhotoDataset(manifest, split="train", size=64, eval_fraction=0.25)
    ev = PhotoDataset(out, split="eval", size=64, eval_fraction=0.25)
    assert set(tr.keys).isdisjoint(ev.keys) and tr.n_photos + ev.n_photos == len(items)
    assert tr[0].shape == (3, 64, 64)


@pytest.mark.skipif(not HAVE_WHEEL_PHOTOS, reason="pip install scikit-image scikit-learn")
def test_ensure_photos(tmp_path, folder):
    m = ensure_photos(tmp_path / "cache", "tiny", use_apt=False, max_short_side=64, quiet=True)
    n = json.loads(m.read_text())["n_photos"]
    assert n >= 2
    assert ensure_photos(tmp_path / "cache", "tiny", use_apt=False, quiet=True) == m  # no refetch
    assert ensure_photos(folder) == folder  # a plain image folder is used as is


@pytest.mark.skipif(not HAVE_WHEEL_PHOTOS, reason="pip install scikit-image scikit-learn")
def test_fetch_main_cli(tmp_path, capsys):
    assert fetch_main(["list"]) == 0
    assert "gcompris-qt-data" in capsys.readouterr().out
    rc = fetch_main(["fetch", "--dir", str(tmp_path), "--set", "wheels", "--no-apt", "--max-side", "64", "--quiet"])
    assert rc == 0 and (tmp_path / "manifest.json").is_file()
    assert fetch_main(["fetch", "--dir", str(tmp_path), "--package", "no-such-package"]) == 2


def _apt_works() -> bool:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return False
    r = subprocess.run(["apt-cache", "policy", "palapeli-data"], capture_output=True, text=True)
    cand = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("Candidate:")]
    return r.returncode == 0 and bool(cand) and "(none)" not in cand[0]


@pytest.mark.slow
@pytest.mark.skipif(not _apt_works(), reason="apt-get / Debian package lists unavailable")
def test_fetch_small_debian_package(tmp_path):
    manifest = fetch_photos(tmp_path, sets=(), packages=["palapeli-data"], max_short_side=128, quiet=True)
    doc = json.loads(manifest.read_text())
    if "apt_failed" in doc["settings"]:
        pytest.skip(f"apt-get download failed: {doc['settings']['apt_failed']}")
    items = [it for it in doc["items"] if it["source"] == "palapeli-data"]
    assert len(items) == 5
    assert {Path(it["file"]).stem for it in items} == {Path(n).stem for n in DEBIAN_SOURCES["palapeli-data"].items}
    assert all(min(it["size"]) == 128 and it["version"] for it in items)
    assert list((tmp_path / "licenses" / "palapeli-data").glob("*copyright"))


def test_fetch_dedup_and_name_collisions(tmp_path, monkeypatch):
    import gq_plugin.lab.data.photos as data_mod

    src = tmp_path / "src"
    src.mkdir()
    _photo(200, 150, 1).save(src / "a.png")
    _photo(200, 150, 2).save(src / "b.png")
    shutil.copy(src / "a.png", src / "a_copy.png")  # same bytes: dropped by md5
    fake = [("same__name", src / "a.png", "CC0"), ("same__name", src / "b.png", "CC0"), ("copy", src / "a_copy.png", "CC0")]
    monkeypatch.setattr(data_mod, "wheel_photos", lambda: iter(fake))
    m = fetch_photos(tmp_path / "out", sets=("wheels",), max_short_side=100, use_apt=False, quiet=True)
    items = json.loads(m.read_text())["items"]
    assert len(items) == 2 and len({it["file"] for it in items}) == 2
    assert all((tmp_path / "out" / it["file"]).is_file() and min(it["size"]) == 100 for it in items)
    assert all(it["original_size"] == [200, 150] for it in items)


@pytest.mark.skipif(not HAVE_WHEEL_PHOTOS, reason="pip install scikit-image scikit-learn")
def test_fetch_refuses_mixed_sizes(tmp_path):
    fetch_photos(tmp_path, sets=("wheels",), max_short_side=64, use_apt=False, quiet=True)
    with pytest.raises(ValueError, match="max_short_side=64"):
        fetch_photos(tmp_path, sets=("wheels",), max_short_side=80, use_apt=False, quiet=True)
    m = fetch_photos(tmp_path, sets=("wheels",), max_short_side=80, use_apt=False, force=True, quiet=True)
    doc = json.loads(m.read_text())
    assert doc["settings"]["max_short_side"] == 80
    assert all(min(it["size"]) == 80 for it in doc["items"])  # every wheel photo is larger
    assert len(list((tmp_path / "photos").rglob("*.*"))) == doc["n_photos"]


@pytest.mark.skipif(not HAVE_WHEEL_PHOTOS, reason="pip install scikit-image scikit-learn")
def test_fetch_falls_back_to_wheels_without_apt(tmp_path, monkeypatch, capsys):
    import gq_plugin.lab.data.photos as data_mod

    monkeypatch.setattr(data_mod.shutil, "which", lambda name: None)  # no apt-get / dpkg-deb
    m = fetch_photos(tmp_path, sets=("tiny",), max_short_side=64)
    doc = json.loads(m.read_text())
    assert "apt_failed" in doc["settings"] and doc["n_photos"] > 0
    assert {it["source"] for it in doc["items"]} == {"wheels"}
    assert "falling back" in capsys.readouterr().err
