import subprocess
import sys

import pytest
import torch

from gq_plugin.codebook import (
    codebook_fingerprint,
    fingerprint_to_tensor,
    group_channels,
    group_index_map,
    make_codebook,
    tensor_to_fingerprint,
    ungroup_channels,
)


def test_sobol_codebook_matches_reference_generator():
    # First entries of the authors' codebook (K=2^16, m=16, seed 42): scipy norm.ppf of SobolEngine(16, scramble=True,
    # seed=42).draw(2**16), the recipe of their repository (tongdaxu/VQ-VAE-from-Gaussian-VAE), written out in tests/_authors.py.
    cb = make_codebook(2**16, 16)
    assert cb.shape == (65536, 16) and cb.dtype == torch.float32
    torch.testing.assert_close(cb[0, :4], torch.tensor([2.8088, -1.2571, 0.9268, -0.2033]), atol=1e-4, rtol=0)
    torch.testing.assert_close(cb[1, :4], torch.tensor([-0.1910, 1.1431, -1.0624, 0.6763]), atol=1e-4, rtol=0)
    assert abs(cb.mean().item()) < 1e-3 and abs(cb.std().item() - 1) < 1e-3
    assert torch.unique(cb, dim=0).shape[0] == 65536


def test_sobol_is_stratified_in_one_dimension():
    # 2^n scrambled Sobol points put exactly one point in each 1/K-probability stratum.
    cb = make_codebook(64, 1).double().squeeze(1)
    u = torch.special.ndtr(cb)
    strata = torch.floor(u * 64).long()
    assert torch.equal(torch.sort(strata).values, torch.arange(64))


def test_iid_codebook_is_seeded_and_gaussian():
    a = make_codebook(4096, 8, seed=1, kind="iid")
    b = make_codebook(4096, 8, seed=1, kind="iid")
    c = make_codebook(4096, 8, seed=2, kind="iid")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.mean().item()) < 0.05 and abs(a.std().item() - 1) < 0.05
    assert codebook_fingerprint(a) != codebook_fingerprint(make_codebook(4096, 8, seed=1, kind="sobol"))


def test_codebook_identical_in_fresh_process_with_other_thread_count():
    code = (
        "import torch; torch.set_num_threads(1);"
        "from gq_plugin.codebook import make_codebook, codebook_fingerprint;"
        "print(codebook_fingerprint(make_codebook(2**12, 16)), codebook_fingerprint(make_codebook(1000, 3, 7, 'iid')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [codebook_fingerprint(make_codebook(2**12, 16)), codebook_fingerprint(make_codebook(1000, 3, 7, "iid"))]


def test_make_codebook_returns_a_copy():
    a = make_codebook(16, 2)
    a.zero_()
    assert make_codebook(16, 2).abs().sum() > 0


def test_fingerprint_tensor_round_trip():
    fp = codebook_fingerprint(make_codebook(256, 4))
    assert len(fp) == 16
    t = fingerprint_to_tensor(fp)
    assert t.dtype == torch.int64 and tensor_to_fingerprint(t) == fp
    assert tensor_to_fingerprint(fingerprint_to_tensor("ffffffffffffffff")) == "ffffffffffffffff"


def test_grouping_maps():
    # strided: with C=16, m=4 sub-codebook 1 holds channels 1, 5, 9, 13 (the authors' layout)
    assert group_index_map(16, 4, "strided")[1].tolist() == [1, 5, 9, 13]
    assert group_index_map(16, 4, "contiguous")[1].tolist() == [4, 5, 6, 7]
    x = torch.arange(2 * 16).reshape(2, 16)
    for grouping in ("contiguous", "strided"):
        g = group_channels(x, 4, grouping)
        assert g.shape == (2, 4, 4)
        assert torch.equal(g[0], x[0][group_index_map(16, 4, grouping)])
        assert torch.equal(ungroup_channels(g, grouping), x)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(codebook_size=1, codebook_dim=4), "codebook_size"),
        (dict(codebook_size=0, codebook_dim=4), "codebook_size"),
        (dict(codebook_size=16.0, codebook_dim=4), "codebook_size"),
        (dict(codebook_size=16, codebook_dim=0), "codebook_dim"),
        (dict(codebook_size=16, codebook_dim=4, kind="uniform"), "codebook"),
    ],
)
def test_bad_codebook_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_codebook(**kwargs)


def test_bad_grouping_arguments():
    with pytest.raises(ValueError, match=r"codebook_dim=5 must divide .*16.*\[1, 2, 4, 8, 16\]"):
        group_channels(torch.zeros(2, 16), 5)
    with pytest.raises(ValueError, match="grouping"):
        group_channels(torch.zeros(2, 16), 4, "interleaved")
