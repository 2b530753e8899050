"""A compiled search kernel earns trust before it serves: the first-use self-check.

Before a compiled backend (``cpp``, ``cuda``, or one registered with ``self_check=True``) serves
its first search on a device, :mod:`gq_plugin.search` runs it, once per process and per
(backend, device), on a fixed set of small problems built on that device (:func:`self_check_problems`):

* row counts and codebook sizes that are not multiples of the kernels' tiles (the CPU kernel's
  6-row micro-kernel, 48-row blocks and 32/64-codeword panels; the CUDA kernel's 8-32-row blocks and
  1,024-codeword K-splits), a single codeword, a codebook split across threads / CUDA blocks, and
  enough rows that every thread gets several row blocks;
* ``m`` in {1, 3, 4, 16} and the widest rows the kernel accepts (``m = 32``, 64 features; the CPU
  kernel also a width outside its unrolled set), ``beta`` 0 and 1;
* extreme log-variances: at both ends of the clamp range, beyond them, and mixed within a row;
* exact ties (integer-valued features, so every score is exact): repeated codewords, also in
  different panels and K-splits, all-equal scores, the only best codeword in a padded last panel.
  These must go to the smallest index, exactly.

Each result is compared with the torch backend's on the same float32 features. A row where they
differ is judged against the float64 reference (:func:`~gq_plugin.search.compare_with_reference`,
``rel_tol = 1e-5``): a float32 near-tie is not a failure; anything else is, and so is any row of an
exact-tie problem that is not the smallest maximising index, a wrong shape / dtype / device, or an
exception. A kernel that fails is disabled for the process with one ``RuntimeWarning`` naming the
kernel and the failing case, and the torch backend serves instead.

``GQ_KERNELS_SELF_CHECK=0`` skips the check (the kernel is trusted unchecked).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..rate import LOGVAR_RANGE
from .features import codebook_features, row_features
from .reference import compare_with_reference
from .torch_backend import DEFAULT_TILE_K, DEFAULT_TILE_N, argmax_ip_torch

__all__ = ["Problem", "SelfCheckResult", "judge", "run_self_check", "self_check_enabled", "self_check_problems"]

ENV = "GQ_KERNELS_SELF_CHECK"
REL_TOL = 1e-5  # float32 near-ties allowed against the float64 reference (as tests/test_kernels.py)
WIDEST_M = 32  # 64 features: the widest row the CUDA kernel takes (CUDA_MAX_FEATURES)
# tile sizes the cases straddle (csrc/gq_search_cpu_kernel.h MC; csrc/gq_search_cuda_kernel.cu)
CPU_ROW_BLOCK = 48
CUDA_ROWS_PER_BLOCK = 32
CUDA_K_SPLIT = 1024

BackendFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """One self-check case: a posterior (N, m), a codebook (K, m) and ``beta``, on one device.

    ``exact``: integer-valued features, so every float32 score is exact and the answer is the
    smallest maximising index, with no tolerance.
    """

    name: str
    mean: torch.Tensor
    logvar: torch.Tensor
    codebook: torch.Tensor
    beta: float
    exact: bool = False

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, F)`` exactly as :func:`gq_plugin.search.gq_search` hands them to a backend."""
        w = row_features(self.mean, self.logvar, self.beta)
        return w, codebook_features(self.codebook)


@dataclass
class SelfCheckResult:
    """The verdict on one (backend, device): ``passed``; ``failure`` names the failing case."""

    backend: str
    device: str
    passed: bool
    cases: int
    seconds: float
    failure: str | None = None
    skipped: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def self_check_enabled() -> bool:
    """False when ``GQ_KERNELS_SELF_CHECK`` is 0 / false / no / off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _random(name, g, n, m, k, beta, device, lv_low=-4.0, lv_high=1.0) -> Problem:
    mean = torch.randn(n, m, generator=g) * 1.5
    logvar = torch.empty(n, m).uniform_(lv_low, lv_high, generator=g)
    codebook = torch.randn(k, m, generator=g)
    return Problem(f"{name} (N={n}, K={k}, m={m}, beta={beta:g})", mean.to(device), logvar.to(device), codebook.to(device), beta)


def _integer(name, g, n, m, base_k, copies, beta, device, flip=False) -> Problem:
    """Integer means and codewords, logvar 0: W = [(beta-1)/2, mean], F = [c^2, c], exact scores.
    The codebook is ``copies`` repetitions of ``base_k`` codewords (every score tied ``copies`` times)."""
    mean = torch.randint(-2, 3, (n, m), generator=g).float()
    base = torch.randint(-2, 3, (base_k, m), generator=g).float()
    parts = [base.flip(0) if flip and i % 2 else base for i in range(copies)]
    codebook = torch.cat(parts)
    k = codebook.shape[0]
    return Problem(f"{name} (N={n}, K={k}, m={m}, beta={beta:g})", mean.to(device), torch.zeros(n, m, device=device),
                   codebook.to(device), beta, exact=True)


def _extreme_logvar(g, m, k, beta, device) -> Problem:
    lo, hi = LOGVAR_RANGE
    rows = [torch.full((m,), v) for v in (lo, lo - 20.0, hi, hi + 20.0)]
    mixed = torch.tensor([lo if j % 2 else hi for j in range(m)])
    rows += [mixed, mixed.flip(0)]
    logvar = torch.stack(rows).repeat(7, 1)  # 42 rows
    mean = torch.randn(logvar.shape[0], m, generator=g) * 2.0
    codebook = torch.randn(k, m, generator=g)
    name = f"extreme log-variances {lo:g}/{hi:g} and beyond (N={logvar.shape[0]}, K={k}, m={m}, beta={beta:g})"
    return Problem(name, mean.to(device), logvar.to(device), codebook.to(device), beta)


def _many_rows(device: torch.device) -> int:
    """Enough rows that the kernel runs without codebook splits: 4 row blocks per CPU thread (the
    cpp kernel splits K below that), 8 blocks per CUDA SM; plus 7 so the count is ragged."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return 8 * sms * CUDA_ROWS_PER_BLOCK + 7
    return 4 * CPU_ROW_BLOCK * max(1, torch.get_num_threads()) + 7


def _gen(i: int) -> torch.Generator:
    """Each problem its own seeded generator: the set does not depend on the others' sizes (the
    "many rows" case grows with the thread count)."""
    return torch.Generator().manual_seed(2026 + i)


def self_check_problems(device: torch.device | str = "cpu", max_features: int | None = None) -> list[Problem]:
    """The fixed self-check problem set, built on ``device`` (seeded: the same on every call; only
    the "many rows" case's row count depends on the machine).

    ``max_features``: the widest rows (2m) the kernel accepts (``None``: any width, then a width
    outside the CPU kernel's unrolled set is added).
    """
    device = torch.device(device)
    widest = WIDEST_M if max_features is None else min(WIDEST_M, max_features // 2)
    if widest < 1:
        raise ValueError(f"max_features must be >= 2, got {max_features}")
    k_split = 2 * CUDA_K_SPLIT + 953  # 3001: three CUDA K-splits, many CPU panels
    probs = [
        _random("ragged tiles", _gen(1), CPU_ROW_BLOCK + 1, 4, 65, 1.0, device),
        _random("few rows, split codebook", _gen(2), 5, 16, k_split, 0.0, device),
        _random("one codeword", _gen(3), 97, 3, 1, 1.0, device),
        _random("dense 1-D codebook", _gen(4), 129, 1, 4097, 1.0, device),  # float32 near-ties
        _random("m=3", _gen(5), 61, 3, 130, 0.0, device),
        _random("widest rows", _gen(6), 31, widest, 129, 0.0, device),
        _random("widest rows", _gen(7), 25, widest, 67, 1.0, device),
        _random("many rows", _gen(8), _many_rows(device), 8, 200, 1.0, device),
        _extreme_logvar(_gen(9), 4, 300, 1.0, device),
        _extreme_logvar(_gen(10), 16, 70, 0.0, device),
        _integer("exact ties, repeated codewords", _gen(11), 61, 4, 40, 4, 1.0, device, flip=True),
        _integer("exact ties across K-splits", _gen(12), 7, 16, 1000, 3, 0.0, device),
        _integer("exact ties, widest rows", _gen(13), 19, widest, 33, 3, 1.0, device),
    ]
    if max_features is None:
        probs.append(_random("generic width", _gen(14), 13, WIDEST_M + 1, 70, 1.0, device))
    # all scores equal (W = 0): index 0
    n, m, k = 11, 4, 131
    probs.append(Problem(f"all scores equal (N={n}, K={k}, m={m}, beta=1)", torch.zeros(n, m, device=device),
                         torch.zeros(n, m, device=device), torch.randint(-2, 3, (k, m), generator=_gen(0)).float().to(device), 1.0, exact=True))
    # the only best codeword is the last one, in a padded last panel
    cb = torch.zeros(k - 1, m).tolist() + [[1.0] * m]
    probs.append(Problem(f"best codeword last (N={n}, K={k}, m={m}, beta=1)", torch.ones(n, m, device=device),
                         torch.zeros(n, m, device=device), torch.tensor(cb, device=device), 1.0, exact=True))
    return probs


def judge(problem: Problem, idx: torch.Tensor, torch_idx: torch.Tensor) -> str | None:
    """``None`` when the kernel's ``idx`` is right, else why not (one line).

    Exact problems: every row must be the smallest maximising index. Others: rows that differ from
    the torch backend's ``torch_idx`` are judged against the float64 reference (near-ties pass).
    """
    n, k = problem.mean.shape[0], problem.codebook.shape[0]
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or tuple(idx.shape) != (n,):
        got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        return f"returned {got}, expected int64 ({n},)"
    if idx.device != problem.mean.device:
        return f"returned indices on {idx.device}, expected {problem.mean.device}"
    idx = idx.cpu()
    if problem.exact:
        w, f = problem.features()
        expect = (w.double() @ f.double().T).argmax(dim=1).cpu()  # exact scores; argmax keeps the first
        bad = (idx != expect).nonzero().flatten()
        if bad.numel():
            r = int(bad[0])
            return f"{bad.numel()} of {n} rows not the smallest maximising index (row {r}: {int(idx[r])}, expected {int(expect[r])})"
        return None
    diff = (idx != torch_idx.cpu()).nonzero().flatten()
    if not diff.numel():
        return None
    rows = diff.to(problem.mean.device)
    res = compare_with_reference(idx[diff], problem.mean[rows], problem.logvar[rows], problem.codebook, problem.beta,
                                 rel_tol=REL_TOL)
    if res["wrong"]:
        r = int(diff[0])
        return (f"{res['wrong']} of {n} rows wrong against the float64 reference (e.g. row {r}: {int(idx[r])}, "
                f"torch backend {int(torch_idx[r])}; K={k})")
    return None


@contextlib.contextmanager
def _one_cpu_thread():
    """torch's intra-op threads set to 1 for the block, then restored."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def run_self_check(name: str, fn: BackendFn, device: torch.device | str, max_features: int | None = None,
                   reference: BackendFn = argmax_ip_torch) -> SelfCheckResult:
    """Run backend ``fn`` (the backend table's ``fn(W, F, tile_n, tile_k)``) on every problem on
    ``device``; stop at the first failing case. Uncached: :func:`gq_plugin.search.verify_backend`
    is the cached, warning entry point."""
    device = torch.device(device)
    t = time.perf_counter()
    # Everything but the kernel runs on one CPU thread, before and after the kernel calls, which run
    # back to back with the thread count they serve with (the CPU kernel's codebook split depends
    # on it): on a loaded machine every multi-threaded op on these tiny tensors waits for the
    # scheduler to wake the thread pool.
    own = _one_cpu_thread if device.type == "cpu" else contextlib.nullcontext
    failure = None
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        with own():
            probs = self_check_problems(device, max_features)
            feats = [p.features() for p in probs]
            refs = [reference(w, f, DEFAULT_TILE_N, DEFAULT_TILE_K) for w, f in feats]
        outs: list = []
        for w, f in feats:
            try:
                outs.append(fn(w, f, DEFAULT_TILE_N, DEFAULT_TILE_K))
            except Exception as exc:  # noqa: BLE001 - a crashing kernel fails the check, it does not crash the search
                outs.append(exc)
                break  # (a CUDA fault may poison the context: no further calls)
        with own():
            for p, out, ref in zip(probs, outs, refs):
                if isinstance(out, Exception):
                    why = "raised " + type(out).__name__ + ": " + " ".join(str(out).split())[:160]
                else:
                    why = judge(p, out, ref)
                if why is not None:
                    failure = f"case '{p.name}': {why}"
                    break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return SelfCheckResult(name, str(device), failure is None, len(probs), time.perf_counter() - t, failure)


# --------------------------------------------------------------------------- per-process verdicts

_LOCK = threading.Lock()
_RESULTS: dict[tuple[str, str], SelfCheckResult] = {}


def device_key(device: torch.device) -> str:
    """``cuda`` -> ``cuda:<current index>``, so one device is checked once whatever its spelling."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def verdict(name: str, fn: BackendFn, device: torch.device, max_features: int | None,
            on_failure: Callable[[str], None]) -> SelfCheckResult:
    """The cached verdict on (``name``, ``device``), running the check the first time (``on_failure``
    is called once, with a one-line reason, when it fails). Skipped (passed) when disabled by env."""
    key = (name, device_key(device))
    res = _RESULTS.get(key)
    if res is not None:
        return res
    with _LOCK:
        res = _RESULTS.get(key)
        if res is None:
            if self_check_enabled():
                res = run_self_check(name, fn, key[1], max_features)
            else:
                res = SelfCheckResult(name, key[1], True, 0, 0.0, skipped=True)
            _RESULTS[key] = res
            if not res.passed:
                on_failure(f"the {name} kernel failed its self-check on {key[1]}: {res.failure}; it is disabled "
                           f"for this process ({ENV}=0 skips the check)")
    return res


def forget(name: str) -> None:
    """Drop the cached verdicts on backend ``name`` (it was registered anew)."""
    with _LOCK:
        for key in [k for k in _RESULTS if k[0] == name]:
            del _RESULTS[key]


def results() -> list[SelfCheckResult]:
    """Every verdict reached in this process."""
    return list(_RESULTS.values())
