"""Fused score+argmax kernels from ``csrc/`` (C++/OpenMP and CUDA), built on first use.

A leaf module: it imports nothing from gq_plugin. :mod:`gq_plugin.search` lists its two
backends in its backend table:

* ``"cpp"``  -- ``csrc/gq_search_cpu.cpp``: register-blocked SIMD micro-kernel, OpenMP over rows.
* ``"cuda"`` -- ``csrc/gq_search_cuda_kernel.cu`` (+ ``gq_search_cuda.cpp`` binding): W tile in
  shared memory, codewords in registers, per-thread running argmax, warp-shuffle reduction.

Nothing is compiled at import time. The first time a backend's ``available(device)`` is asked
(i.e. the first search that could use it), the extension is built once with
:func:`torch.utils.cpp_extension.load` (JIT, needs a C++ compiler and ``ninja``; the CUDA one also
``nvcc`` and a CUDA build of torch) into ``$GQ_KERNELS_BUILD_DIR`` if set, else torch's default
extensions directory (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``); later processes
reuse the cached build. If the build fails, one one-line ``RuntimeWarning`` is emitted and the torch
backend is used.

The CPU build uses ``-O3 -march=native`` because it is compiled on the machine that runs it. Set
``GQ_KERNELS_MARCH`` to another ``-march`` value (e.g. ``x86-64-v3``) or to an empty string to build
a portable binary, e.g. when the extension directory is shared between different machines.

``GQ_KERNELS_DISABLE=1`` skips building (the torch backend is used, without a warning).

Builds are serialised across processes by an OS file lock that dies with its holder, so a build
killed halfway never leaves later processes waiting on torch's ``lock`` file forever (that stale
file is removed and the kernel rebuilt); a live build is waited for at most
``GQ_KERNELS_LOCK_TIMEOUT`` seconds (default 900), then the torch backend is used with the
one-line warning. A process that has to wait says so on stderr (and how long it waited).

Build names include a hash of the source and torch paths, so checkouts sharing an extensions
directory do not rebuild each other's kernel (see :func:`_checkout_tag`).

Before a compiled kernel serves its first search on a device, :mod:`gq_plugin.search` runs its
self-check (:mod:`gq_plugin.search.selfcheck`; ``GQ_KERNELS_SELF_CHECK=0`` skips it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch
import warnings

__all__ = [
    "argmax_ip_cpu",
    "argmax_ip_cuda",
    "cpu_available",
    "cuda_available",
    "load_cpu",
    "load_cuda",
    "source_dir",
]

CPU_SOURCES = ("gq_search_cpu.cpp",)
CUDA_SOURCES = ("gq_search_cuda.cpp", "gq_search_cuda_kernel.cu")

_LOCK = threading.Lock()
_STATE: dict[str, tuple[bool, ModuleType | None]] = {}


def source_dir() -> Path:
    """Directory holding the kernel sources (``gq_plugin/csrc`` when installed, else ``csrc/``)."""
    here = Path(__file__).resolve().parent.parent  # gq_plugin/
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / CPU_SOURCES[0]).is_file():
            return cand
    raise FileNotFoundError("gq_plugin kernel sources (csrc/gq_search_cpu.cpp) not found")


def _build_dir(name: str) -> str | None:
    root = os.environ.get("GQ_KERNELS_BUILD_DIR")
    if not root:
        return None  # torch default: $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/<py>_<cu>/
    path = Path(root).expanduser() / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _cpu_flags() -> list[str]:
    march = os.environ.get("GQ_KERNELS_MARCH", "native")
    flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    if march:
        flags.append(f"-march={march}")
    return flags


def _checkout_tag() -> str:
    """Where the sources and torch's headers live. ``cpp_extension.load`` writes both paths into
    the build's ``build.ninja``, so two checkouts (or virtualenvs) sharing one build directory
    would make ninja recompile on every alternate load and hold the build lock each time; the
    build names include this, so each checkout keeps its own cached build."""
    return f"src={source_dir()}|torch={os.path.dirname(torch.__file__)}"


def _cpu_build_name() -> str:
    """Extension name for the CPU build. With ``-march=native`` it includes a hash of this CPU's
    model and ISA flags, so a shared extensions directory never hands a binary built for one CPU
    to another (which could die with SIGILL); and of :func:`_checkout_tag`."""
    march = os.environ.get("GQ_KERNELS_MARCH", "native")
    ident = f"march={march}|{_checkout_tag()}"
    if march == "native":
        ident += "|" + platform.machine() + "|" + platform.processor()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith(("model name", "flags", "Features", "isa")):
                    ident += "|" + line
                    if line.startswith(("flags", "Features", "isa")):
                        break
        except OSError:
            pass
    return "gq_search_cpu_" + hashlib.sha1(ident.encode()).hexdigest()[:10]


def _disabled() -> bool:
    return os.environ.get("GQ_KERNELS_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def _announce_build(name: str, what: str, duration: str) -> None:
    """Say on stderr, before compiling, that the first search builds ``what`` (only when no cached
    build exists; later processes load the cached library silently)."""
    from torch.utils import cpp_extension

    build_dir = _build_dir(name) or cpp_extension._get_build_directory(name, verbose=False)
    if any(Path(build_dir).glob(f"{name}*.so")) or any(Path(build_dir).glob(f"{name}*.pyd")):
        return
    print(f"gq_plugin: building the {what}, once, {duration} (cached in {build_dir}; GQ_KERNELS_DISABLE=1 skips it)",
          file=sys.stderr, flush=True)


def _build(kind: str) -> ModuleType:
    from torch.utils import cpp_extension

    src = source_dir()
    verbose = os.environ.get("GQ_KERNELS_VERBOSE", "") not in ("", "0")
    if kind == "cpu":
        name = _cpu_build_name()
        _announce_build(name, "fused CPU search kernel", "~15 s")
        return cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in CPU_SOURCES],
            extra_cflags=_cpu_flags(),
            extra_ldflags=["-fopenmp"],
            build_directory=_build_dir(name),
            verbose=verbose,
        )
    if kind == "cuda":
        if torch.version.cuda is None:
            raise RuntimeError("torch is a CPU-only build")
        name = _cuda_build_name()
        _announce_build(name, "fused CUDA search kernel", "~1 min")
        return cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in CUDA_SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            build_directory=_build_dir(name),
            verbose=verbose,
        )
    raise ValueError(kind)


LOCK_TIMEOUT_S = 900.0  # default of GQ_KERNELS_LOCK_TIMEOUT
# build name -> seconds this process waited for another process's build lock (absent: no wait)
LOCK_WAITS: dict[str, float] = {}


def _build_name(kind: str) -> str | None:
    if kind == "cpu":
        return _cpu_build_name()
    return _cuda_build_name() if torch.version.cuda is not None else None


def _cuda_build_name() -> str:
    return "gq_search_cuda_" + hashlib.sha1(_checkout_tag().encode()).hexdigest()[:10]


def _build_directory(name: str) -> Path:
    """Where ``cpp_extension.load`` builds ``name``: ``$GQ_KERNELS_BUILD_DIR/<name>`` or torch's default."""
    d = _build_dir(name)
    if d is None:
        from torch.utils import cpp_extension

        d = cpp_extension._get_build_directory(name, verbose=False)
    return Path(d)


@contextlib.contextmanager
def _build_lock(name: str | None):
    """Serialise builds of ``name`` across processes, and clear a stale torch build lock.

    ``torch.utils.cpp_extension.load`` guards a build directory with a ``lock`` file that only its
    creator removes: if that process is killed mid-build, every later ``load`` waits forever. So
    builds first take an OS lock (``flock``) on ``<build dir>/gq_build.lock``, which the OS
    releases when its holder dies. Whoever holds it knows that any torch ``lock`` file there is
    stale (its owner held the OS lock and is gone) and removes it. A live builder is waited for at
    most ``GQ_KERNELS_LOCK_TIMEOUT`` seconds (default 900), then ``TimeoutError`` (the caller falls
    back to the torch backend with its one-line warning). A wait is said on stderr when it begins
    and ends, and its length kept in :data:`LOCK_WAITS`. Without ``fcntl`` (Windows) a torch lock
    older than the timeout counts as stale.
    """
    if name is None:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    timeout = float(os.environ.get("GQ_KERNELS_LOCK_TIMEOUT", LOCK_TIMEOUT_S))
    build_dir = _build_directory(name)
    build_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(build_dir / "gq_build.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            start = time.monotonic()
            deadline, waited = start + timeout, False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if not waited:
                        waited = True
                        print(f"gq_plugin: waiting for another process's build of the search kernel in {build_dir} "
                              f"(up to GQ_KERNELS_LOCK_TIMEOUT={timeout:g} s)", file=sys.stderr, flush=True)
                    if time.monotonic() >= deadline:
                        LOCK_WAITS[name] = time.monotonic() - start
                        raise TimeoutError(
                            f"waited GQ_KERNELS_LOCK_TIMEOUT={timeout:g} s for another process building {build_dir}"
                        ) from None
                    time.sleep(0.2)
            if waited:
                LOCK_WAITS[name] = time.monotonic() - start
                print(f"gq_plugin: waited {LOCK_WAITS[name]:.1f} s for the build lock of {build_dir}", file=sys.stderr, flush=True)
        stale = build_dir / "lock"
        try:
            if fcntl is not None or time.time() - stale.stat().st_mtime > timeout:
                stale.unlink()
        except FileNotFoundError:
            pass
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _load(kind: str) -> ModuleType | None:
    """Build/import the extension once per process; ``None`` (+ one warning) when it cannot."""
    state = _STATE.get(kind)
    if state is not None:
        return state[1]
    with _LOCK:
        state = _STATE.get(kind)
        if state is not None:
            return state[1]
        mod: ModuleType | None = None
        if not _disabled():
            try:
                with _build_lock(_build_name(kind)):
                    mod = _build(kind)
            except Exception as exc:  # noqa: BLE001 - no compiler, no nvcc, build error ...
                msg = " ".join(str(exc).split())
                if len(msg) > 160:
                    msg = msg[:157] + "..."
                warn_fallback(f"{kind} kernel unavailable: {type(exc).__name__}: {msg}")
        _STATE[kind] = (mod is not None, mod)
        return mod


def load_cpu() -> ModuleType | None:
    """The compiled CPU extension (built on first call), or ``None`` if it cannot be built."""
    return _load("cpu")


def load_cuda() -> ModuleType | None:
    """The compiled CUDA extension (built on first call), or ``None`` if it cannot be built."""
    if not torch.cuda.is_available():
        return None
    return _load("cuda")


def cpu_available(device: torch.device | str = "cpu") -> bool:
    return torch.device(device).type == "cpu" and load_cpu() is not None


def cuda_available(device: torch.device | str = "cuda") -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and load_cuda() is not None


def argmax_ip_cpu(w: torch.Tensor, f: torch.Tensor, tile_n: int = 0, tile_k: int = 0) -> torch.Tensor:
    """Fused CPU kernel; tiles are fixed inside the kernel (``tile_n``/``tile_k`` are ignored)."""
    mod = load_cpu()
    if mod is None:
        raise RuntimeError("gq_plugin cpp kernel is not available")
    return mod.argmax_ip(w.float().contiguous(), f.float().contiguous(), torch.get_num_threads())


def argmax_ip_cuda(w: torch.Tensor, f: torch.Tensor, tile_n: int = 0, tile_k: int = 0) -> torch.Tensor:
    """Fused CUDA kernel (D <= 64 features per row; :mod:`gq_plugin.search` routes wider rows to torch)."""
    if w.shape[1] > 64:
        raise ValueError(f"the cuda kernel takes at most 64 features per row, got {w.shape[1]}")
    mod = load_cuda()
    if mod is None:
        raise RuntimeError("gq_plugin cuda kernel is not available")
    return mod.argmax_ip(w.float().contiguous(), f.float().contiguous())



def warn_fallback(reason: str) -> None:
    """One-line warning used when a compiled backend cannot be used."""
    warnings.warn(f"gq_plugin: falling back to the torch search backend ({reason})", RuntimeWarning, stacklevel=3)
