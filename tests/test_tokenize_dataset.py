"""``gq tokenize``: folders and tar shards -> token shards + manifest; resume; 2 ranks; TokenDataset; decode."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
PIL = pytest.importorskip("PIL.Image")

from gq_plugin.lab import tokenize_dataset as td  # noqa: E402
from gq_plugin.lab.cli import main as gq_main  # noqa: E402
from gq_plugin.lab.data import wheel_photos  # noqa: E402
from gq_plugin.tokens import load_tokens  # noqa: E402

MICRO_MODEL = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "block_out_channels": [8, 16], "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 4, "sample_size": 32, "mid_block_add_attention": False,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    from gq_plugin.adapters import patch_autoencoder_kl

    torch.manual_seed(0)
    vae = AutoencoderKL(**MICRO_MODEL)
    patch_autoencoder_kl(vae, K=256, m=2)
    d = tmp_path_factory.mktemp("model")
    vae.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """7 real photos (from wheels), shrunk to 48 px short side so the tests stay fast."""
    d = tmp_path_factory.mktemp("photos")
    for key, path, _ in list(wheel_photos())[:7]:
        im = PIL.open(path).convert("RGB")
        s = 48 / min(im.size)
        im.resize((max(48, round(im.size[0] * s)), max(48, round(im.size[1] * s)))).save(d / f"{key}.png")
    if len(list(d.iterdir())) < 7:
        pytest.skip("needs the photos shipped in scikit-image / scikit-learn / pyiqa wheels")
    return d


def _reference(model_dir, paths):
    """Indices straight from the public API: vae.encode_indices of load_image."""
    from gq_plugin.lab.codec import load_image, load_model

    vae = load_model(model_dir)
    x = torch.stack([load_image(p, SIZE, 2) for p in paths])
    with torch.no_grad():
        return vae.encode_indices(x)


def _make_tar(path, files, with_cls=True):
    with tarfile.open(path, "w") as t:
        for i, f in enumerate(files):
            t.add(f, arcname=f"sample{i:03d}{Path(f).suffix}")
            if with_cls:
                data = str(i).encode()
                info = tarfile.TarInfo(f"sample{i:03d}.cls")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path


def test_list_items_folder_tar_globs_and_errors(photos, tmp_path):
    files = sorted(photos.iterdir())
    items = td.list_items(photos)
    assert [it.key for it in items] == [f.name for f in files]
    _make_tar(tmp_path / "a-000.tar", files[:3])
    _make_tar(tmp_path / "a-001.tar", files[3:5])
    for src in (str(tmp_path / "a-{000..001}.tar"), str(tmp_path / "a-*.tar"), tmp_path):
        items = td.list_items(src)
        assert [it.key for it in items] == ["a-000.tar/sample000", "a-000.tar/sample001", "a-000.tar/sample002",
                                            "a-001.tar/sample000", "a-001.tar/sample001"], src
    # a tar member's bytes are found by offset, without the tar module
    with open(items[4].path, "rb") as f:
        f.seek(items[4].offset)
        assert f.read(items[4].size) == files[4].read_bytes()
    assert td._expand_braces("x{08..10}.tar") == ["x08.tar", "x09.tar", "x10.tar"]
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as t:
        t.add(files[0], arcname="s.png")
    with pytest.raises(ValueError, match="compressed tar"):
        td.list_items(tmp_path / "x.tar.gz")
    (tmp_path / "x.tar.gz").unlink()
    with pytest.raises(ValueError, match="does not exist"):
        td.list_items(tmp_path / "missing")
    with pytest.raises(ValueError, match="matches no file"):
        td.list_items(str(tmp_path / "b-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        td.list_items(tmp_path / "empty")


def test_tokenize_resume_dataset_and_decode(model_dir, photos, tmp_path, monkeypatch, capsys):
    out = tmp_path / "tok"
    files = sorted(photos.iterdir())
    # a run killed while writing its third shard: the first two are complete files, nothing else is
    real_write = td._write_shard
    calls = []

    def dying_write(out_, s, *a, **k):
        calls.append(s)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_write(out_, s, *a, **k)

    monkeypatch.setattr(td, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        td.tokenize(model_dir, photos, out, size=SIZE, batch_size=3, workers=0, shard_size=2, progress=False)
    assert sorted(p.name for p in out.glob("shard-*.gqt")) == ["shard-000000.gqt", "shard-000001.gqt"]
    assert not (out / "manifest.json").exists()
    first_mtime = (out / "shard-000000.gqt").stat().st_mtime_ns
    monkeypatch.setattr(td, "_write_shard", real_write)
    # the re-run skips the finished shards and writes the rest (with 2 DataLoader workers this time)
    info = td.tokenize(model_dir, photos, out, size=SIZE, batch_size=3, workers=2, shard_size=2, progress=False)
    assert (info["skipped_shards"], info["written_shards"], info["written_images"], info["num_shards"]) == (2, 2, 3, 4)
    assert (out / "shard-000000.gqt").stat().st_mtime_ns == first_mtime
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [2, 2, 2, 1]
    assert (manifest["codebook_size"], manifest["codebook_dim"], manifest["image_size"], manifest["num_images"]) == (256, 2, [SIZE, SIZE], 7)
    from gq_plugin.lab.codec import model_id

    assert manifest["bits_per_index"] == 8 and manifest["model_id"] == model_id(model_dir)
    ref = _reference(model_dir, files)
    assert manifest["token_shape"] == list(ref.shape[1:])
    # TokenDataset: int64 index maps equal to encode_indices, in memory or read lazily
    for ds in (td.TokenDataset(out), td.TokenDataset(out, in_memory=False, return_keys=True, cache_shards=1)):
        assert len(ds) == 7
        got = torch.stack([ds[i][0] if ds.return_keys else ds[i] for i in range(7)])
        assert got.dtype == torch.int64 and torch.equal(got, ref)
    assert td.TokenDataset(out).keys == [f.name for f in files]
    loader = torch.utils.data.DataLoader(td.TokenDataset(out), batch_size=4, shuffle=False)
    assert torch.equal(torch.cat(list(loader)), ref)
    # same settings into the same folder: nothing to do; other settings: refused, naming the field
    assert td.tokenize(model_dir, photos, out, size=SIZE, workers=0, shard_size=2, progress=False)["written_shards"] == 0
    with pytest.raises(ValueError, match="shard_size: 2 then, 3 now"):
        td.tokenize(model_dir, photos, out, size=SIZE, workers=0, shard_size=3, progress=False)
    # gq decode reads a shard, a few images at a time
    assert gq_main(["decode", str(out / "shard-000001.gqt"), "--model", str(model_dir), "-o", str(tmp_path / "d.png"),
                    "--max-images", "1", "--batch-size", "1"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "d_0.png")]
    from gq_plugin.lab.codec import decode_indices, load_model
    from gq_plugin.lab.plots import to_uint8

    vae = load_model(model_dir)
    expected = to_uint8(decode_indices(vae, ref[2:3])[0])
    assert np.array_equal(np.asarray(PIL.open(tmp_path / "d_0.png")), expected)
    # a corrupt shard is refused by TokenDataset
    raw = bytearray((out / "shard-000003.gqt").read_bytes())
    raw[-8] ^= 0xFF
    (out / "shard-000003.gqt").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        td.TokenDataset(out)


def test_tar_shards_give_the_folder_tokens_and_ranks_split_shards(model_dir, photos, tmp_path):
    files = sorted(photos.iterdir())
    _make_tar(tmp_path / "w-000.tar", files[:4])
    _make_tar(tmp_path / "w-001.tar", files[4:])
    out = tmp_path / "tok"
    # two independent jobs (e.g. a cluster array): rank 1 first, then rank 0; the last one writes the manifest
    i1 = td.tokenize(model_dir, str(tmp_path / "w-{000..001}.tar"), out, size=SIZE, workers=0, shard_size=3, progress=False, rank=1, world_size=2)
    assert i1["manifest"] is None and i1["written_shards"] == 1
    i0 = td.tokenize(model_dir, str(tmp_path / "w-{000..001}.tar"), out, size=SIZE, workers=0, shard_size=3, progress=False, rank=0, world_size=2)
    assert i0["written_shards"] == 2 and i0["manifest"]
    ds = td.TokenDataset(out, return_keys=True)
    assert torch.equal(torch.stack([ds[i][0] for i in range(len(ds))]), _reference(model_dir, files))
    assert ds[5][1] == "w-001.tar/sample001"
    assert [load_tokens(out / td.shard_name(s))[1].extra["rank"] for s in range(3)] == [0, 1, 0]
    with pytest.raises(ValueError, match="rank must lie"):
        td.tokenize(model_dir, photos, tmp_path / "x", rank=2, world_size=2, progress=False)
    with pytest.raises(ValueError, match="shard_size must be an int >= 1"):
        td.tokenize(model_dir, photos, tmp_path / "x", shard_size=0, progress=False)


def test_accelerate_launch_two_processes_write_disjoint_shards(model_dir, photos, tmp_path):
    out = tmp_path / "tok"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no GPU: accelerate falls back to gloo on CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gq_plugin.lab.cli", "tokenize", str(model_dir), str(photos),
           "--out", str(out), "--size", str(SIZE), "--shard-size", "2", "--workers", "0", "--batch-size", "2", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "7 image(s) in 4 shard(s)" in proc.stdout
    writers = [load_tokens(out / td.shard_name(s))[1].extra["rank"] for s in range(4)]
    assert writers == [0, 1, 0, 1]  # shard i by rank i % 2, each file by one rank
    assert not list(out.glob(".*tmp*"))
    ds = td.TokenDataset(out)
    assert torch.equal(torch.stack([ds[i] for i in range(7)]), _reference(model_dir, sorted(photos.iterdir())))
