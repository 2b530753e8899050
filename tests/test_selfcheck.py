"""The first-use self-check of compiled search kernels (gq_plugin.search.selfcheck, issue #28).

A faulty extension is injected by wrapping what the JIT build returns (every 7th row's index off
by one, the fault measured in the issue): it must never produce a wrong index through the public
API without a warning, and the torch backend must serve instead. A healthy kernel stays selected.
The problem set also runs on the CUDA kernel when a device exists (skipped otherwise).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gq_plugin import GaussianQuantizer, search
from gq_plugin.search import gq_search, kernels, selfcheck, verify_backend
from gq_plugin.search.selfcheck import Problem, judge, run_self_check, self_check_problems
from gq_plugin.search.torch_backend import argmax_ip_torch


class _Faulty:
    """The real extension, with every 7th row's index off by one (still in range: a silent fault)."""

    def __init__(self, mod):
        self.mod = mod
        self.calls = 0

    def argmax_ip(self, w, f, *args):
        self.calls += 1
        idx = self.mod.argmax_ip(w, f, *args)
        idx[::7] = (idx[::7] + 1) % f.shape[0]
        return idx


class _Counting(_Faulty):
    """The real extension, unchanged, counting its calls."""

    def argmax_ip(self, w, f, *args):
        self.calls += 1
        return self.mod.argmax_ip(w, f, *args)


@pytest.fixture
def fresh(monkeypatch):
    """No cached verdicts, no env overrides; returns a function that installs a wrapped cpp build."""
    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    for var in ("GQ_KERNELS_SELF_CHECK", "GQ_SEARCH_BACKEND", "GQ_KERNELS_DISABLE"):
        monkeypatch.delenv(var, raising=False)

    def install(wrapper_cls):
        real = kernels.load_cpu()
        if real is None:
            pytest.skip("cpp kernel not built (no C++ compiler?)")
        wrapped = wrapper_cls(real)
        monkeypatch.setattr(kernels, "_STATE", {})
        monkeypatch.setattr(kernels, "_build", lambda kind: wrapped)  # what the JIT build returns
        return wrapped

    return install


def _runtime_warnings(rec) -> list[str]:
    return [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]


def _quantizer(backend=None):
    return GaussianQuantizer(dim=8, codebook_size=256, codebook_dim=4, search_backend=backend).eval()


def test_faulty_kernel_is_caught_through_the_quantizer(fresh):
    faulty = fresh(_Faulty)
    x = torch.randn(4, 64, 16, generator=torch.Generator().manual_seed(0))  # channel-last: mean 8 + logvar 8
    with torch.no_grad():
        expect_z, expect = _quantizer("torch")(x)[:2]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        q = _quantizer()
        with torch.no_grad():
            z, idx, _ = q(x)
            idx2 = q(x)[1]
        assert search.select_backend("cpu") == "torch"
        assert "cpp" not in search.available_backends("cpu")
    assert torch.equal(idx, expect) and torch.equal(idx2, expect)
    assert torch.equal(z, expect_z)
    msgs = _runtime_warnings(rec)
    assert len(msgs) == 1, msgs
    assert "cpp kernel failed its self-check on cpu: case '" in msgs[0] and "GQ_KERNELS_SELF_CHECK=0" in msgs[0], msgs
    assert "\n" not in msgs[0]
    res = verify_backend("cpp", "cpu")
    assert not res.passed and res.failure.startswith("case '") and res.failure in msgs[0]
    assert faulty.calls >= 1  # the check ran the injected kernel
    # the fault is real: the injected kernel itself disagrees with the torch backend on this input
    w = search.row_features(x[..., :8].reshape(-1, 4), x[..., 8:].reshape(-1, 4))
    f = q._codebook_features
    assert not torch.equal(kernels.argmax_ip_cpu(w, f), argmax_ip_torch(w, f))
    # forcing the disabled kernel is an error, not a silent wrong answer
    with pytest.raises(RuntimeError, match="failed its self-check"):
        gq_search(x[..., :8].reshape(-1, 4), x[..., 8:].reshape(-1, 4), q._codebook, backend="cpp")


def test_healthy_kernel_stays_selected_and_is_checked_once(fresh):
    counting = fresh(_Counting)
    mean, logvar = torch.randn(300, 4), torch.randn(300, 4)
    codebook = torch.randn(512, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = gq_search(mean, logvar, codebook)
        cases = len(self_check_problems("cpu"))
        assert counting.calls == cases + 1  # the problem set, then the search itself
        gq_search(mean, logvar, codebook)
        assert counting.calls == cases + 2  # checked once per process and device
        assert search.select_backend("cpu") == "cpp" and "cpp" in search.available_backends("cpu")
    res = verify_backend("cpp", "cpu")
    assert res.passed and not res.skipped and res.failure is None and res.cases == cases and res.seconds > 0
    assert torch.equal(first, gq_search(mean, logvar, codebook, backend="torch"))


def test_env_skips_the_check(fresh, monkeypatch):
    faulty = fresh(_Faulty)
    monkeypatch.setenv("GQ_KERNELS_SELF_CHECK", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert search.select_backend("cpu") == "cpp"
    assert faulty.calls == 0
    # what skipping means: the injected fault goes straight through (the check is what stops it)
    mean, logvar, codebook = torch.randn(300, 4), torch.randn(300, 4), torch.randn(512, 4)
    assert not torch.equal(gq_search(mean, logvar, codebook), gq_search(mean, logvar, codebook, backend="torch"))
    res = verify_backend("cpp", "cpu")
    assert res.skipped and res.passed and res.cases == 0


def test_torch_backend_needs_no_check(fresh):
    res = verify_backend("torch", "cpu")
    assert res.passed and res.cases == 0
    with pytest.raises(ValueError, match="backend must be one of"):
        verify_backend("nope", "cpu")


def test_registered_backend_can_opt_in(fresh, monkeypatch):
    monkeypatch.setattr(search, "_BACKENDS", dict(search._BACKENDS))
    monkeypatch.setattr(search, "_AVAILABLE", dict(search._AVAILABLE))
    monkeypatch.setattr(search, "_SELF_CHECKED", dict(search._SELF_CHECKED))

    def largest_index_on_ties(w, f, tile_n, tile_k):  # right scores, wrong tie rule
        s = w.double() @ f.double().T
        return (s.shape[1] - 1 - s.flip(1).argmax(1)).to(torch.int64)

    search.register_backend("lastties", largest_index_on_ties, lambda d: True, self_check=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert "lastties" not in search.available_backends("cpu")
    msgs = _runtime_warnings(rec)
    assert len(msgs) == 1 and "lastties kernel failed" in msgs[0] and "exact ties" in msgs[0], msgs
    with pytest.raises(RuntimeError, match="failed its self-check"):
        search.select_backend("cpu", "lastties")
    # without self_check=True it is trusted as registered
    search.register_backend("lastties", largest_index_on_ties, lambda d: True)
    assert search.select_backend("cpu", "lastties") == "lastties"
    # registered anew (fixed), it is checked anew: the old verdict is forgotten
    search.register_backend("lastties", argmax_ip_torch, lambda d: True, self_check=True)
    assert search.select_backend("cpu", "lastties") == "lastties" and verify_backend("lastties", "cpu").cases > 0


# ------------------------------------------------------------------ the judge


def _exact_problem() -> Problem:
    return next(p for p in self_check_problems("cpu") if p.name.startswith("exact ties, repeated"))


def test_float64_kernel_passes_despite_float32_near_ties():
    """A kernel exact in float64 disagrees with the float32 torch backend on near-ties only: no failure."""
    def f64(w, f, tile_n, tile_k):
        return (w.double() @ f.double().T).argmax(1)

    differing = 0
    for p in self_check_problems("cpu"):
        w, f = p.features()
        differing += int((f64(w, f, 0, 0) != argmax_ip_torch(w, f)).sum())
    assert differing >= 1  # the tolerance path is exercised
    res = run_self_check("f64", f64, "cpu")
    assert res.passed and res.failure is None and res.cases == len(self_check_problems("cpu"))


def test_judge_rejects_wrong_ties_shapes_and_far_indices():
    p = _exact_problem()
    w, f = p.features()
    right = argmax_ip_torch(w, f)
    assert judge(p, right, right) is None
    s = w.double() @ f.double().T
    last = (s.shape[1] - 1 - s.flip(1).argmax(1)).to(torch.int64)  # same scores, largest tied index
    why = judge(p, last, right)
    assert why.startswith(f"{p.mean.shape[0]} of {p.mean.shape[0]} rows not the smallest maximising index"), why
    assert judge(p, right.int(), right) == f"returned torch.int32 ({p.mean.shape[0]},), expected int64 ({p.mean.shape[0]},)"
    assert judge(p, right[:-1], right).startswith("returned torch.int64")
    q = next(p for p in self_check_problems("cpu") if p.name.startswith("ragged tiles"))
    w, f = q.features()
    good = argmax_ip_torch(w, f)
    worst = (w @ f.T).argmin(1)
    bad = good.clone()
    bad[3] = worst[3]
    assert judge(q, bad, good) == (f"1 of 49 rows wrong against the float64 reference (e.g. row 3: {int(worst[3])}, "
                                   f"torch backend {int(good[3])}; K=65)")


def test_crashing_kernel_fails_the_check():
    def boom(w, f, tile_n, tile_k):
        raise RuntimeError("illegal memory access\nat line 3")

    res = run_self_check("boom", boom, "cpu")
    assert not res.passed and res.failure.endswith("raised RuntimeError: illegal memory access at line 3")
    assert res.failure.startswith("case 'ragged tiles (N=49, K=65, m=4, beta=1)'")


def test_problem_set_covers_the_edge_cases():
    probs = self_check_problems("cpu")
    names = " | ".join(p.name for p in probs)
    ms = {p.mean.shape[1] for p in probs}
    assert {1, 3, 4, 16, 32, 33} <= ms and {p.beta for p in probs} == {0.0, 1.0}
    assert any(p.codebook.shape[0] == 1 for p in probs) and any(p.codebook.shape[0] > 2048 for p in probs)
    assert sum(p.exact for p in probs) == 5 and "extreme log-variances" in names
    lv = torch.cat([p.logvar.flatten() for p in probs])
    assert lv.min() < -30 and lv.max() > 20  # beyond the clamp range at both ends
    assert max(p.mean.shape[1] for p in self_check_problems("cpu", max_features=64)) == 32  # the CUDA width
    for p in probs:
        if p.exact:  # integer features: every float32 score is exact
            w, f = p.features()
            assert torch.equal(w @ f.T, (w.double() @ f.double().T).float()), p.name
    with pytest.raises(ValueError, match="max_features"):
        self_check_problems("cpu", max_features=1)


# ------------------------------------------------------------------ CUDA (skipped without a device)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")


@needs_cuda
def test_self_check_problems_run_on_cuda():
    probs = self_check_problems("cuda", max_features=search.CUDA_MAX_FEATURES)
    assert all(p.mean.is_cuda and p.logvar.is_cuda and p.codebook.is_cuda for p in probs)
    assert run_self_check("torch", argmax_ip_torch, "cuda", search.CUDA_MAX_FEATURES).passed
    if "cuda" not in search.available_backends("cuda"):
        pytest.fail(f"a CUDA device is present but the cuda kernel is not usable: {selfcheck.results()}")
    res = verify_backend("cuda", "cuda")
    assert res.passed and res.cases == len(probs) and res.device == f"cuda:{torch.cuda.current_device()}", res


@needs_cuda
def test_faulty_cuda_kernel_is_caught(monkeypatch):
    real = kernels.load_cuda()
    if real is None:
        pytest.fail("a CUDA device is present but the cuda kernel did not build")
    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    monkeypatch.setattr(kernels, "_STATE", {"cuda": (True, _Faulty(real))})
    mean, logvar, codebook = torch.randn(500, 4).cuda(), torch.randn(500, 4).cuda(), torch.randn(300, 4).cuda()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        idx = gq_search(mean, logvar, codebook)
    assert torch.equal(idx, gq_search(mean, logvar, codebook, backend="torch"))
    msgs = _runtime_warnings(rec)
    assert len(msgs) == 1 and "cuda kernel failed its self-check on cuda:" in msgs[0], msgs


def test_build_names_are_per_checkout(monkeypatch, tmp_path):
    """Two checkouts sharing an extensions directory must not rebuild each other's kernel (each
    load from the other rewrote build.ninja and recompiled under the build lock)."""
    here_cpu, here_cuda = kernels._cpu_build_name(), kernels._cuda_build_name()
    assert here_cpu == kernels._cpu_build_name() and here_cpu.startswith("gq_search_cpu_")
    monkeypatch.setattr(kernels, "source_dir", lambda: tmp_path / "other_checkout" / "csrc")
    assert kernels._cpu_build_name() != here_cpu and kernels._cuda_build_name() != here_cuda
    assert kernels._cuda_build_name().startswith("gq_search_cuda_")


def test_problems_do_not_depend_on_the_thread_count():
    """Only the "many rows" case grows with the threads; every other problem is the same tensor."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = self_check_problems("cpu")
        torch.set_num_threads(3)
        three = self_check_problems("cpu")
    finally:
        torch.set_num_threads(n)
    assert len(one) == len(three)
    for p, q in zip(one, three):
        if p.name.startswith("many rows"):
            assert (p.mean.shape[0], q.mean.shape[0]) == (4 * 48 + 7, 4 * 48 * 3 + 7)
            continue
        assert p.name == q.name and p.beta == q.beta and p.exact == q.exact
        assert torch.equal(p.mean, q.mean) and torch.equal(p.logvar, q.logvar) and torch.equal(p.codebook, q.codebook)
