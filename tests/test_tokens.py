import io
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gq_plugin import GaussianQuantizer
from gq_plugin.rate import real_bpp
from gq_plugin.tokens import (
    TokenHeader,
    bits_per_index,
    dumps,
    load_tokens,
    loads,
    pack_indices,
    save_tokens,
    unpack_indices,
)


def _header(k=2**10, shape=(1, 2, 4, 4), **kw):
    q = GaussianQuantizer(8, k, 4, accept_image_fmap=True)
    return q, TokenHeader.for_quantizer(q, shape, model_id="test", image_size=(32, 32), **kw)


def test_bits_per_index():
    assert [bits_per_index(k) for k in (2, 3, 4, 5, 2**16, 2**16 + 1, 2**20)] == [1, 2, 2, 3, 16, 17, 20]
    with pytest.raises(ValueError, match="codebook_size"):
        bits_per_index(1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    k=st.integers(min_value=2, max_value=2**20),
    shape=st.lists(st.integers(min_value=0, max_value=7), min_size=1, max_size=4),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_pack_unpack_round_trip(k, shape, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, k, size=shape, dtype=np.int64)
    if a.size:
        a.reshape(-1)[0] = k - 1  # always exercise the largest value
    bits = bits_per_index(k)
    packed = pack_indices(a, bits)
    assert len(packed) == (a.size * bits + 7) // 8
    assert np.array_equal(unpack_indices(packed, a.size, bits).reshape(a.shape), a)


def test_pack_many_values_crosses_chunks():
    a = np.random.default_rng(0).integers(0, 2**17, size=300_001)
    assert np.array_equal(unpack_indices(pack_indices(a, 17), a.size, 17), a)


def test_file_round_trip_and_sizes(tmp_path):
    q, header = _header()
    idx = torch.randint(0, 2**10, header.shape)
    path = tmp_path / "x.gqt"
    nbytes = save_tokens(path, idx, header)
    assert nbytes == os.path.getsize(path)
    back, h2 = load_tokens(path)
    assert torch.equal(back, idx) and back.dtype == torch.int64
    assert h2 == header
    # 32 indices x 10 bits = 40 bytes of payload
    assert nbytes == 10 + len(header.to_json()) + 40 + 4
    assert header.nominal_bpp() == pytest.approx(32 * 10 / 1024)
    assert header.num_pixels == 1024 and real_bpp(nbytes, header.num_pixels) == pytest.approx(nbytes * 8 / 1024)
    h2.check_compatible(q)
    buf = io.BytesIO()
    save_tokens(buf, idx, header)
    assert torch.equal(load_tokens(io.BytesIO(buf.getvalue()))[0], idx)


@pytest.mark.parametrize(
    "other, word",
    [
        (dict(codebook_size=2**11), "codebook_size"),
        (dict(codebook_dim=8), "codebook_dim"),
        (dict(grouping="strided"), "grouping"),
        (dict(seed=1), "seed"),
        (dict(codebook="iid"), "codebook"),
    ],
)
def test_refuses_mismatched_model(other, word):
    _, header = _header()
    kw = dict(dim=8, codebook_size=2**10, codebook_dim=4)
    kw.update(other)
    with pytest.raises(ValueError, match=word):
        header.check_compatible(GaussianQuantizer(**kw))


def test_refuses_fingerprint_mismatch():
    q, header = _header()
    header.fingerprint = "0" * 16
    with pytest.raises(ValueError, match="fingerprint"):
        header.check_compatible(q)


def test_truncated_and_corrupt_files_raise():
    _, header = _header()
    data = dumps(torch.randint(0, 2**10, header.shape), header)
    for cut in (0, 3, 9, 20, len(data) - 5, len(data) - 1):
        with pytest.raises(ValueError):
            loads(data[:cut])
    for pos in (0, 5, 15, len(data) - 10, len(data) - 2):
        bad = bytearray(data)
        bad[pos] ^= 0x41
        with pytest.raises(ValueError):
            loads(bytes(bad))


def test_dumps_validates_indices():
    _, header = _header()
    with pytest.raises(ValueError, match="shape"):
        dumps(torch.zeros(1, 2, 4, 3, dtype=torch.long), header)
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        dumps(torch.full(header.shape, 1024), header)


def test_fuzz_random_bytes_never_crash_or_hang():
    rng = random.Random(0)
    _, header = _header()
    valid = dumps(torch.randint(0, 2**10, header.shape), header)
    for i in range(3000):
        kind = i % 3
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        elif kind == 1:  # valid prefix with random tail
            cut = rng.randrange(0, len(valid))
            data = valid[:cut] + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 50)))
        else:  # random bit flips
            b = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            data = bytes(b)
        if data == valid:
            continue
        with pytest.raises(ValueError):
            loads(data)


def test_fuzz_valid_crc_with_hostile_header():
    """Headers that pass the checksum but lie (huge shapes, bad types) must still raise."""
    import struct
    import zlib

    def build(hjson: bytes, payload: bytes = b"") -> bytes:
        body = struct.pack("<4sHI", b"GQT\x00", 1, len(hjson)) + hjson + payload
        return body + struct.pack("<I", zlib.crc32(body))

    _, header = _header()
    good = header.to_json().decode()
    for bad in (
        good.replace('"shape":[1,2,4,4]', '"shape":[100000,100000,100000,100000]'),
        good.replace('"shape":[1,2,4,4]', '"shape":[-1]'),
        good.replace('"codebook_size":1024', '"codebook_size":1'),
        good.replace('"codebook_size":1024', '"codebook_size":"1024"'),
        good.replace('"grouping":"contiguous"', '"grouping":"x"'),
        "[1, 2, 3]",
        "{}",
    ):
        with pytest.raises(ValueError):
            loads(build(bad.encode(), b"\x00" * 40))
