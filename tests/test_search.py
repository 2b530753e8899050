import subprocess
import sys
import textwrap

import pytest
import torch

from gq_plugin.codebook import make_codebook
from gq_plugin.search import (
    argmax_inner_product,
    codebook_features,
    gq_search,
    reference_scores,
    row_features,
    search_reference,
)

# Float32 GEMM-form scores may order two codewords differently from the float64 direct formula
# only when their exact scores are within float32 resolution of the score magnitude.
TIE_RTOL = 2e-5


def assert_same_or_tie(idx, mean, logvar, codebook, beta):
    ref = search_reference(mean, logvar, codebook, beta)
    diff = (idx != ref).nonzero().flatten()
    if diff.numel():
        scores = reference_scores(mean[diff], logvar[diff], codebook, beta)
        rows = torch.arange(diff.numel())
        best, got = scores[rows, ref[diff]], scores[rows, idx[diff]]
        scale = scores.abs().max(dim=1).values.clamp_min(1.0)
        assert torch.all((best - got) <= TIE_RTOL * scale), (best - got) / scale
    # ties are rare
    assert diff.numel() <= max(2, idx.numel() // 50)


@pytest.mark.parametrize("K", [2, 17, 256, 4096])
@pytest.mark.parametrize("m", [1, 4, 8, 16])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_tiled_search_matches_reference(K, m, beta):
    g = torch.Generator().manual_seed(K * 100 + m)
    n = 301
    codebook = make_codebook(K, m)
    mean = torch.randn(n, m, generator=g) * 1.2
    # sigma from 0.02 to ~3: sharp and broad posteriors
    logvar = torch.empty(n, m).uniform_(-7.8, 2.0, generator=g)
    idx = gq_search(mean, logvar, codebook, beta, tile_n=64, tile_k=100)
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    assert_same_or_tie(idx, mean, logvar, codebook, beta)


def test_gemm_form_equals_direct_score_up_to_row_constant():
    codebook = make_codebook(64, 4)
    mean, logvar = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    direct = reference_scores(mean, logvar, codebook, beta=0.7)
    gemm = row_features(mean.double(), logvar.double(), 0.7).double() @ codebook_features(codebook.double()).double().T
    delta = direct - gemm
    torch.testing.assert_close(delta, delta[:, :1].expand_as(delta), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tiles", [(1, 1), (7, 13), (300, 5000), (4096, 8192)])
def test_tile_sizes_do_not_change_results(tiles):
    codebook = make_codebook(1000, 8)
    mean, logvar = torch.randn(300, 8), torch.randn(300, 8) * 0.5 - 1
    base = gq_search(mean, logvar, codebook, tile_n=300, tile_k=1000)
    assert torch.equal(gq_search(mean, logvar, codebook, tile_n=tiles[0], tile_k=tiles[1]), base)


def test_ties_go_to_smallest_index_across_tiles():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0], [1.0, 0.0], [0.5, 1.0]])
    for tk in (1, 2, 3, 5):
        assert argmax_inner_product(w, f, backend="torch", tile_k=tk).tolist() == [1, 2]


def test_search_never_allocates_n_by_k_scores(monkeypatch):
    """By construction: every score block the torch backend computes is at most tile_n x tile_k."""
    seen = []
    real_mm = torch.mm

    def spy(a, b, *args, **kwargs):
        seen.append(a.shape[0] * b.shape[1])
        return real_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    codebook = make_codebook(4096, 16)
    mean, logvar = torch.randn(2000, 16), torch.zeros(2000, 16)
    gq_search(mean, logvar, codebook, backend="torch", tile_n=256, tile_k=512)
    assert seen and max(seen) <= 256 * 512 < 2000 * 4096


def test_search_peak_memory_bounded_at_full_scale():
    """By measurement: N=32768, K=2^16, m=16 would need 8 GiB for an N x K float32 score buffer."""
    code = textwrap.dedent(
        """
        import resource, torch
        from gq_plugin.codebook import make_codebook
        from gq_plugin.search import gq_search
        torch.set_num_threads(2)
        cb = make_codebook(2**16, 16)
        mean, logvar = torch.randn(32768, 16), torch.randn(32768, 16) * 0.1 - 2
        gq_search(mean[:8], logvar[:8], cb, backend="torch")  # warm up allocator / BLAS
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        idx = gq_search(mean, logvar, cb, backend="torch")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert idx.shape == (32768,)
        print((after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"GQ_SEARCH_BACKEND": "torch", **__import__("os").environ})
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.split()[-1])
    assert extra < 512 * 2**20, f"search used {extra / 2**20:.0f} MiB extra"


def test_search_runs_in_float32_under_autocast():
    codebook = make_codebook(2048, 8)
    mean, logvar = torch.randn(500, 8), torch.randn(500, 8) * 0.3 - 2
    ref = gq_search(mean, logvar, codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gq_search(mean, logvar, codebook)
    assert torch.equal(got, ref)
    # bf16 inputs are upcast, not searched in bf16
    got16 = gq_search(mean.bfloat16(), logvar.bfloat16(), codebook)
    assert torch.equal(got16, gq_search(mean.bfloat16().float(), logvar.bfloat16().float(), codebook))


def test_search_bad_input():
    cb = make_codebook(16, 4)
    with pytest.raises(ValueError, match="mean and logvar"):
        gq_search(torch.zeros(3, 4), torch.zeros(3, 5), cb)
    with pytest.raises(ValueError, match="codebook"):
        gq_search(torch.zeros(3, 4), torch.zeros(3, 4), make_codebook(16, 3))
    with pytest.raises(ValueError, match="backend"):
        gq_search(torch.zeros(3, 4), torch.zeros(3, 4), cb, backend="faiss")
    with pytest.raises(ValueError, match="tile_n"):
        gq_search(torch.zeros(3, 4), torch.zeros(3, 4), cb, tile_n=0)
    assert gq_search(torch.zeros(0, 4), torch.zeros(0, 4), cb).shape == (0,)


def test_quantizer_search_uses_its_own_logvar_range():
    """row_features clamped to the fixed LOGVAR_RANGE, overriding a quantizer's wider logvar_range."""
    from gq_plugin import GaussianQuantizer

    g = torch.Generator().manual_seed(0)
    q = GaussianQuantizer(2, 64, 2, logvar_range=(-30.0, 26.0)).eval()
    mean = torch.randn(4000, 2, generator=g) * 7e10  # mu / sigma^2 ~ 1 at logvar 25, ~150 at the old clamp 20
    logvar = torch.full((4000, 2), 25.0)
    idx = q.encode_indices(mean, logvar)[:, 0]
    # the direct score log N(c; mu, sigma^2) - log N(c; 0, I) in float64, logvar unclamped (25 < 26)
    mu, lv, cb = mean.double(), logvar.double(), q.codebook.double()
    scores = (-0.5 * (cb[None] - mu[:, None]).square() * torch.exp(-lv[:, None]) + 0.5 * cb[None].square()).sum(-1)
    assert torch.equal(idx, scores.argmax(1))
    assert torch.equal(idx, search_reference(mean, logvar, q.codebook, logvar_range=(-30.0, 26.0)))
    # the default range still clamps at 20 (and gives other indices here)
    assert not torch.equal(idx, search_reference(mean, logvar, q.codebook))
