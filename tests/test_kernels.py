"""Fused score+argmax kernels (csrc/, gq_plugin.search.kernels) against the float64 reference.

Tolerance for disagreements with :func:`search_reference` (documented in docs/kernels.md): the
backends compute ``W . F`` in float32 (W itself rounded to float32), so two codewords whose exact
scores differ by less than about ``D * eps32 * sum_j |W_j F_kj|`` may be ordered either way. We
accept a differing index only if its float64 score is within ``REL_TOL * scale`` of the best one,
with ``scale = max over the two codewords of sum_j |W_j F_kj|`` and ``REL_TOL = 1e-5``, and only
for a small fraction of the rows (near-ties are rare with continuous inputs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gq_plugin import search
from gq_plugin.search import kernels
from gq_plugin.search import (
    argmax_inner_product,
    codebook_features,
    compare_with_reference,
    gq_search,
    reference_scores,
    row_features,
)

REL_TOL = 1e-5
MAX_TIE_FRACTION = 0.02
# m = 1 with K >= 4096: K points on a line are ~1/K apart, closer than float32 can resolve the
# score, so near-ties are the norm there (every differing row is still checked against REL_TOL).
MAX_TIE_FRACTION_DENSE_1D = 0.75

ROOT = Path(__file__).resolve().parents[1]


def _cpu_backends() -> list[str]:
    return [b for b in search.available_backends("cpu") if b in ("torch", "cpp")]


def _posterior(n: int, m: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, m, generator=g) * 1.5
    logvar = torch.rand(n, m, generator=g) * 5.0 - 4.0  # sigma in [0.14, 1.6]
    codebook = torch.randn(k, m, generator=g)
    return mean, logvar, codebook


def _check_against_reference(idx, mean, logvar, codebook, beta, ref_s=None):
    """idx must equal the float64 argmax, except at documented near-ties. Returns #differences."""
    dense_1d = codebook.shape[1] == 1 and codebook.shape[0] >= 4096
    max_frac = MAX_TIE_FRACTION_DENSE_1D if dense_1d else MAX_TIE_FRACTION
    res = compare_with_reference(idx, mean, logvar, codebook, beta, rel_tol=REL_TOL, ref_scores=ref_s)
    assert res["wrong"] == 0 and res["equal"] + res["near_ties"] == idx.numel(), res
    assert res["near_ties"] <= max(1, int(max_frac * idx.numel())), res
    return res["near_ties"]


def test_compare_with_reference_counts():
    mean, logvar, codebook = _posterior(40, 4, 64, seed=3)
    ref_s = reference_scores(mean, logvar, codebook, 1.0)
    ref = ref_s.argmax(dim=1)
    ok = compare_with_reference(ref, mean, logvar, codebook, 1.0, rows_per_chunk=7)
    assert ok == {"rows": 40, "equal": 40, "near_ties": 0, "wrong": 0, "max_rel_gap": 0.0}
    bad = ref.clone()
    bad[5] = ref_s[5].argmin()  # the worst codeword: far outside any float32 tolerance
    bad[9] = 64  # out of range
    res = compare_with_reference(bad, mean, logvar, codebook, 1.0, ref_scores=ref_s)
    assert (res["equal"], res["near_ties"], res["wrong"]) == (38, 0, 2) and res["max_rel_gap"] == float("inf")
    # a near-tie: the runner-up of a row, with a tolerance wide enough to accept its gap
    second = ref_s[0].topk(2).indices[1]
    tie = ref.clone()
    tie[0] = second
    w = row_features(mean[:1], logvar[:1], 1.0).double().abs()
    f = codebook_features(codebook).double().abs()
    rel = float((ref_s[0, ref[0]] - ref_s[0, second]) / torch.maximum(w @ f[ref[0]], w @ f[second]))
    res = compare_with_reference(tie, mean, logvar, codebook, 1.0, rel_tol=1.01 * rel)
    assert (res["equal"], res["near_ties"], res["wrong"]) == (39, 1, 0)
    assert res["max_rel_gap"] == pytest.approx(rel, rel=1e-6)
    assert compare_with_reference(tie, mean, logvar, codebook, 1.0, rel_tol=0.99 * rel)["wrong"] == 1
    with pytest.raises(ValueError, match="idx"):
        compare_with_reference(ref[:3], mean, logvar, codebook)
    with pytest.raises(ValueError, match="codebook"):
        compare_with_reference(ref, mean, logvar, codebook[:, :2])


# ------------------------------------------------------------------ build / registration


def test_import_is_lazy():
    """Importing gq_plugin (and even gq_plugin.search.kernels) must not compile anything."""
    code = (
        "import sys, gq_plugin, gq_plugin.search.kernels as k; "
        "assert k._STATE == {}, k._STATE; "
        "assert not any(n.startswith('gq_search_cpu') for n in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_backends_registered():
    names = search.available_backends("cpu")
    assert "torch" in names
    assert "cuda" in search._BACKENDS and "cpp" in search._BACKENDS
    if shutil.which(os.environ.get("CXX", "c++")) is not None:
        assert "cpp" in names, "a C++ compiler is present but the cpp kernel did not build"
        assert search.select_backend("cpu") == "cpp"
    assert not search._AVAILABLE["cuda"](torch.device("cpu"))


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(kernels, "_STATE", {})

    def boom(kind):
        raise OSError("no compiler\nsecond line")

    monkeypatch.setattr(kernels, "_build", boom)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert kernels.load_cpu() is None
        assert not kernels.cpu_available("cpu")
        assert kernels.load_cpu() is None
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "falling back" in msgs[0], msgs
    assert "cpp" not in search.available_backends("cpu")
    # the torch backend still answers
    w, f = torch.randn(5, 4), torch.randn(9, 4)
    assert argmax_inner_product(w, f).tolist() == (w @ f.T).argmax(1).tolist()


def test_disable_env(monkeypatch):
    monkeypatch.setattr(kernels, "_STATE", {})
    monkeypatch.setenv("GQ_KERNELS_DISABLE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.load_cpu() is None


def test_sources_inside_package():
    """JIT from an installed wheel needs the sources inside the package (gq_plugin/csrc)."""
    pkg_src = ROOT / "gq_plugin" / "csrc"
    for name in kernels.CPU_SOURCES + kernels.CUDA_SOURCES + ("gq_search_cpu_kernel.h",):
        assert (pkg_src / name).is_file(), name
    assert kernels.source_dir().resolve() == (ROOT / "csrc").resolve()


# ------------------------------------------------------------------ correctness vs reference


@pytest.mark.parametrize("m", [1, 4, 8, 16])
@pytest.mark.parametrize("k", [2, 17, 4096, 65536])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_backends_match_reference(m, k, beta):
    n = {2: 301, 17: 301, 4096: 101, 65536: 33}[k]  # odd N; fewer rows for big K (float64 reference)
    mean, logvar, codebook = _posterior(n, m, k, seed=1000 * m + k + int(beta))
    ref_s = reference_scores(mean, logvar, codebook, beta, chunk=8)
    for name in _cpu_backends():
        idx = gq_search(mean, logvar, codebook, beta=beta, backend=name)
        assert idx.dtype == torch.int64 and idx.shape == (n,)
        _check_against_reference(idx, mean, logvar, codebook, beta, ref_s)


@pytest.mark.parametrize("n,k,d", [(1, 1, 2), (7, 2, 2), (101, 17, 8), (257, 4096, 32), (63, 1000, 5), (65, 300, 33),
                                   (31, 129, 64), (9, 70, 100), (2049, 64, 16)])
def test_cpp_matches_torch(n, k, d):
    if "cpp" not in _cpu_backends():
        pytest.skip("cpp kernel not built (no C++ compiler?)")
    w, f = torch.randn(n, d), torch.randn(k, d)
    a = argmax_inner_product(w, f, backend="cpp")
    b = argmax_inner_product(w, f, backend="torch")
    s = w.double() @ f.double().T
    diff = (a != b).nonzero().flatten()
    for i in diff.tolist():  # only float32 near-ties may differ
        scale = float((w[i].double().abs() @ f.double().abs().T).max())
        assert abs(float(s[i, a[i]] - s[i, b[i]])) <= REL_TOL * scale
    assert diff.numel() <= max(1, n // 50)


@pytest.mark.parametrize("d", [2, 8, 32, 7])
def test_exact_ties_smallest_index(d):
    """Integer-valued features make every score exact: ties must go to the smallest index."""
    if "cpp" not in _cpu_backends():
        pytest.skip("cpp kernel not built")
    g = torch.Generator().manual_seed(d)
    w = torch.randint(-2, 3, (301, d), generator=g).float()
    base = torch.randint(-2, 3, (40, d), generator=g).float()
    f = torch.cat([base, base, base.flip(0), base])  # every codeword appears 4 times (K = 160)
    expect = (w.long() @ f.long().T).argmax(dim=1)  # first maximal index
    for name in _cpu_backends():
        assert torch.equal(argmax_inner_product(w, f, backend=name), expect), name
    # one codeword better than all others, placed last
    f2 = torch.cat([torch.zeros(99, d), torch.ones(1, d)])
    w2 = torch.ones(3, d)
    assert argmax_inner_product(w2, f2, backend="cpp").tolist() == [99, 99, 99]
    # all scores equal -> index 0
    assert argmax_inner_product(w2, torch.zeros(130, d), backend="cpp").tolist() == [0, 0, 0]


def test_cpp_noncontiguous_and_dtypes():
    if "cpp" not in _cpu_backends():
        pytest.skip("cpp kernel not built")
    w = torch.randn(40, 16, dtype=torch.float64)[:, ::2]
    f = torch.randn(8, 300).t()
    ref = (w.float() @ f.float().T).argmax(1)
    assert torch.equal(argmax_inner_product(w, f, backend="cpp"), ref)


def test_env_forces_backend(monkeypatch):
    if "cpp" not in _cpu_backends():
        pytest.skip("cpp kernel not built")
    monkeypatch.setenv("GQ_SEARCH_BACKEND", "torch")
    assert search.select_backend("cpu") == "torch"
    monkeypatch.setenv("GQ_SEARCH_BACKEND", "cpp")
    assert search.select_backend("cpu") == "cpp"
    monkeypatch.setenv("GQ_SEARCH_BACKEND", "cuda")
    with pytest.raises(RuntimeError):
        search.select_backend("cpu")


# ------------------------------------------------------------------ CUDA


def _nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def test_cuda_kernel_compiles(tmp_path):
    """Compile-only check of the CUDA kernel (standalone .cu, no torch headers, no GPU needed)."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set NVCC=/path/to/nvcc); CUDA kernel compile check skipped")
    src = kernels.source_dir() / "gq_search_cuda_kernel.cu"
    proc = subprocess.run(
        [nvcc, "-O3", "-std=c++17", "-Xptxas", "-v", "-c", str(src), "-o", str(tmp_path / "k.o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "k.o").stat().st_size > 0
    assert "error" not in proc.stderr.lower()
    spills = [line for line in proc.stderr.splitlines() if "spill stores" in line]
    assert spills and all(" 0 bytes spill stores" in line for line in spills), spills  # no register spills


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")


@needs_cuda
@pytest.mark.parametrize("m", [1, 4, 8, 16])
@pytest.mark.parametrize("k", [2, 17, 4096, 65536])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_cuda_matches_reference(m, k, beta):
    if "cuda" not in search.available_backends("cuda"):
        pytest.fail("a CUDA device is present but the cuda kernel did not build")
    n = {2: 301, 17: 301, 4096: 101, 65536: 33}[k]
    mean, logvar, codebook = _posterior(n, m, k, seed=1000 * m + k + int(beta))
    idx = gq_search(mean.cuda(), logvar.cuda(), codebook.cuda(), beta=beta, backend="cuda").cpu()
    _check_against_reference(idx, mean, logvar, codebook, beta)


@needs_cuda
@pytest.mark.parametrize("n,k,d", [(1, 1, 2), (4099, 17, 8), (5, 70001, 32), (63, 1000, 5), (31, 129, 64), (9, 70, 100)])
def test_cuda_exact_and_ties(n, k, d):
    g = torch.Generator().manual_seed(n + k + d)
    w = torch.randint(-2, 3, (n, d), generator=g).float()
    f = torch.randint(-2, 3, (k, d), generator=g).float()
    expect = (w.double() @ f.double().T).argmax(dim=1)  # exact on integers; first maximal index
    got = argmax_inner_product(w.cuda(), f.cuda(), backend="cuda").cpu()
    assert torch.equal(got, expect)


@needs_cuda
@pytest.mark.parametrize("m,k", [(4, 4096), (16, 65536)])
def test_every_cuda_backend_matches_reference(m, k):
    """Every backend available for CUDA tensors (torch tiled and the fused kernel) vs float64."""
    names = search.available_backends("cuda")
    assert "torch" in names and "cuda" in names, names
    mean, logvar, codebook = _posterior(257, m, k, seed=7 * m + k)
    for name in names:
        idx = gq_search(mean.cuda(), logvar.cuda(), codebook.cuda(), beta=1.0, backend=name)
        assert idx.is_cuda and idx.dtype == torch.int64 and idx.shape == (257,), name
        _check_against_reference(idx.cpu(), mean, logvar, codebook, 1.0)
    assert search.select_backend("cuda") == "cuda"
