"""Video and audio GQ tokens keep their time axis (issue #29 item 3): ``.gqt`` files, token shards +
``TokenDataset``, and ``gq decode`` writing one PNG per frame. Against a tiny real AutoencoderKLWan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import _diffusers_zoo as zoo  # noqa: E402

from gq_plugin import adapters  # noqa: E402
from gq_plugin.adapters import _layout  # noqa: E402
from gq_plugin.lab.tokenize_dataset import TokenDataset, write_token_shards  # noqa: E402
from gq_plugin.lab.video_tokens import encode_video, frame_paths  # noqa: E402
from gq_plugin.tokens import LAYOUTS, TokenHeader, dumps, load_tokens, loads, save_tokens  # noqa: E402

K = 2**6


@pytest.fixture(scope="module")
def wan():
    vae, x = zoo.build("AutoencoderKLWan")
    adapters.patch_autoencoder_kl(vae, K=K, m=2)
    videos = torch.cat([x, x.flip(2), -x])  # three different (1, 3, 5, 16, 16) videos
    return vae, videos


def test_adapter_layout_names_are_token_file_layouts():
    for ndim in (3, 4, 5):
        assert LAYOUTS[_layout.token_layout(ndim)] == ndim
    with pytest.raises(ValueError, match="no token layout for 2-d indices"):
        _layout.token_layout(2)


def test_video_gqt_round_trip(wan, tmp_path):
    vae, videos = wan
    idx, header = encode_video(vae, videos, mid="wan:abc")
    assert idx.shape == (3, 2, 3, 8, 8) and header.layout == "B,G,T,H,W"
    assert header.image_size == (16, 16) and header.extra["num_frames"] == 5
    assert header.num_pixels == 3 * 5 * 16 * 16
    assert header.nominal_bpp() == idx.numel() * 6 / (3 * 5 * 16 * 16)
    save_tokens(tmp_path / "v.gqt", idx, header)
    back, h2 = load_tokens(tmp_path / "v.gqt", quantizer=vae.gq_quantizer)
    assert torch.equal(back, idx) and h2 == header
    with torch.no_grad():  # the file decodes to what the model's own round trip gives
        assert torch.equal(vae.decode_indices(back).sample, vae.decode(vae.encode(videos).latent_dist.mode()).sample)


def test_video_header_is_validated():
    vae, _ = zoo.build("AutoencoderKLWan")
    adapters.patch_autoencoder_kl(vae, K=K, m=2)
    idx = torch.zeros(1, 2, 3, 8, 8, dtype=torch.long)
    good = TokenHeader.for_quantizer(vae.gq_quantizer, idx.shape, image_size=(16, 16))
    assert good.layout == "B,G,T,H,W"
    loads(dumps(idx, good))
    bad = TokenHeader.for_quantizer(vae.gq_quantizer, idx.shape, image_size=(16, 24))  # frame not the token grid x factor
    with pytest.raises(ValueError, match=r"image_size=\[16, 24\] is not the token grid \(H, W\)=\(8, 8\)"):
        loads(dumps(idx, bad))
    flat = TokenHeader.for_quantizer(vae.gq_quantizer, (1, 2, 8, 8), layout="B,G,T,H,W")
    with pytest.raises(ValueError, match="layout='B,G,T,H,W' does not describe a 4-d shape"):
        loads(dumps(torch.zeros(1, 2, 8, 8, dtype=torch.long), flat))
    other = TokenHeader.for_quantizer(vae.gq_quantizer, (1, 4, 3, 8, 8))  # G = 4, the model has 2
    with pytest.raises(ValueError, match="sub-codebooks per token .G in layout B,G,T,H,W.: file 4 vs model 2"):
        loads(dumps(torch.zeros(1, 4, 3, 8, 8, dtype=torch.long), other), quantizer=vae.gq_quantizer)
    assert TokenHeader.for_quantizer(vae.gq_quantizer, idx.shape, image_size=(16, 16)).num_pixels is None  # frames unknown


def test_audio_tokens_round_trip_and_dataset(tmp_path):
    vae, x = zoo.build("AutoencoderOobleck")
    adapters.patch_autoencoder_kl(vae, K=K, m=2)
    idx = vae.encode_indices(x)
    assert idx.shape == (2, 2, 16)
    header = TokenHeader.for_quantizer(vae.gq_quantizer, idx.shape, layout="B,G,T")
    back, h = loads(dumps(idx, header), quantizer=vae.gq_quantizer)
    assert torch.equal(back, idx) and h.layout == "B,G,T"
    write_token_shards(tmp_path, idx, vae, layout="B,G,T", shard_size=1)
    ds = TokenDataset(tmp_path)
    assert ds.layout == "B,G,T" and len(ds) == 2 and torch.equal(torch.stack([ds[0], ds[1]]), idx)


@pytest.mark.parametrize("in_memory", [True, False])
def test_video_token_shards_and_dataset(wan, tmp_path, in_memory):
    vae, videos = wan
    idx, _ = encode_video(vae, videos)
    manifest = write_token_shards(tmp_path, idx, vae, keys=["a", "b", "c"], shard_size=2, image_size=(16, 16),
                                  extra={"num_frames": 5})
    assert manifest.endswith("manifest.json") and sorted(p.name for p in tmp_path.glob("shard-*.gqt")) == [
        "shard-000000.gqt", "shard-000001.gqt"]
    ds = TokenDataset(tmp_path, in_memory=in_memory, return_keys=True)
    assert ds.layout == "B,G,T,H,W" and ds.token_shape == (2, 3, 8, 8) and len(ds) == 3
    for i, key in enumerate("abc"):
        t, k = ds[i]
        assert k == key and t.dtype == torch.int64 and torch.equal(t, idx[i])
    ds.check_compatible(vae.gq_quantizer)
    _, h = load_tokens(tmp_path / "shard-000001.gqt")
    assert h.extra["num_frames"] == 5 and h.extra["keys"] == ["c"] and h.image_size == (16, 16)
    with pytest.raises(ValueError, match="holds shards made with other settings"):
        write_token_shards(tmp_path, idx, vae, keys=["a", "b", "c"], shard_size=1, image_size=(16, 16))
    with pytest.raises(ValueError, match="keys must be 3 distinct names"):
        write_token_shards(tmp_path / "x", idx, vae, keys=["a", "a", "c"])


def test_gq_decode_writes_every_frame(wan, tmp_path):
    from PIL import Image

    from gq_plugin.lab.cli import main
    from gq_plugin.lab.codec import model_id
    from gq_plugin.lab.plots import to_uint8

    vae, videos = wan
    model_dir = tmp_path / "model"
    vae.save_pretrained(model_dir)
    idx, header = encode_video(vae, videos[:2], mid=model_id(model_dir))
    save_tokens(tmp_path / "v.gqt", idx, header)
    assert main(["decode", str(tmp_path / "v.gqt"), "--model", str(model_dir), "-o", str(tmp_path / "out" / "clip.png"),
                 "--batch-size", "1"]) == 0
    where = frame_paths(tmp_path / "out" / "clip.png", 2, 5)
    assert where[1][4].name == "clip_1_f004.png"
    with torch.no_grad():
        ref = vae.decode_indices(idx).sample.clamp(-1, 1)
    for v in range(2):
        for f in range(5):
            png = np.asarray(Image.open(where[v][f]))
            assert np.array_equal(png, to_uint8(ref[v, :, f]))
    assert len(list((tmp_path / "out").glob("*.png"))) == 10
