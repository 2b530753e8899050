"""k-means init of a large VQ codebook from at least K vectors, in bounded memory.

vector-quantize-pytorch initialises ``VectorQuantize(kmeans_init=True)`` with k-means on the *first
training batch*. For a 2^16 codebook that batch holds a few hundred to a few thousand vectors, so most
codewords start as duplicates (the library warns "k-means init received 512 vectors for a codebook of
65536"). Feeding it N >= K vectors instead runs into its k-means, which forms the whole (N, K) distance
matrix at once: 17 GB at N = K = 2^16.

:func:`chunked_kmeans` is the same algorithm with the same signature, random draws and update rule
(``sample_fn`` picks the initial means, argmax of ``-cdist`` or of the cosine similarity assigns,
empty clusters keep their mean, ``all_reduce_fn`` is called on the counts and the new means), but it
assigns the samples ``chunk`` rows at a time, so it never holds more than a (chunk, K) block.
:func:`init_codebook_` hands it to the codebook's own ``init_embed_``, which does the installed
version's bookkeeping (EMA buffers, ``initted``) around the result.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
import torch.nn.functional as F

#: samples assigned per block: a (CHUNK, K) float32 block is 1 GiB at K = 2^16
CHUNK = 4096


def _noop(x):
    return x


def chunked_kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int = 10, use_cosine_sim: bool = False,
                   sample_fn=None, all_reduce_fn=_noop, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means over ``samples`` ``(h, N, d)`` (h codebooks) -> ``(means (h, K, d), counts (h, K))``.

    The counts are those of the last assignment (before the last mean update), as in
    vector-quantize-pytorch. ``sample_fn(samples, K)`` draws the initial means (default: K distinct
    samples per codebook when N >= K, with replacement otherwise)."""
    if samples.ndim != 3:
        raise ValueError(f"samples must be (codebooks, N, dim), got {tuple(samples.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    h, n, dim = samples.shape
    sample_fn = sample_fn or _sample_vectors
    means = sample_fn(samples, num_clusters)
    counts = torch.zeros(h, num_clusters, dtype=torch.long, device=samples.device)
    for _ in range(num_iters):
        buckets = torch.empty(h, n, dtype=torch.long, device=samples.device)
        for i in range(0, n, chunk):
            block = samples[:, i:i + chunk]
            sim = block @ means.transpose(1, 2) if use_cosine_sim else -torch.cdist(block, means)
            buckets[:, i:i + chunk] = sim.argmax(dim=-1)
        counts = torch.stack([torch.bincount(b, minlength=num_clusters) for b in buckets])
        all_reduce_fn(counts)
        empty = counts == 0
        new_means = torch.zeros(h, num_clusters, dim, dtype=samples.dtype, device=samples.device)
        new_means.scatter_add_(1, buckets.unsqueeze(-1).expand(-1, -1, dim), samples)
        new_means = new_means / counts.masked_fill(empty, 1).unsqueeze(-1)
        all_reduce_fn(new_means)
        if use_cosine_sim:
            new_means = F.normalize(new_means, dim=-1)
        means = torch.where(empty.unsqueeze(-1), means, new_means)
    return means, counts


def _sample_vectors(samples: torch.Tensor, num: int) -> torch.Tensor:
    out = []
    for s in samples.unbind(0):
        idx = torch.randperm(s.shape[0], device=s.device)[:num] if s.shape[0] >= num else torch.randint(0, s.shape[0], (num,), device=s.device)
        out.append(s[idx])
    return torch.stack(out)


@contextlib.contextmanager
def _library_kmeans_replaced(chunk: int):
    """vector-quantize-pytorch's module-level ``kmeans`` swapped for :func:`chunked_kmeans` (restored after)."""
    mod = importlib.import_module("vector_quantize_pytorch.vector_quantize_pytorch")
    original = mod.kmeans

    def kmeans(samples, num_clusters, num_iters=10, use_cosine_sim=False, sample_fn=None, all_reduce_fn=_noop):
        return chunked_kmeans(samples, num_clusters, num_iters, use_cosine_sim, sample_fn, all_reduce_fn, chunk=chunk)

    mod.kmeans = kmeans
    try:
        yield
    finally:
        mod.kmeans = original


@torch.no_grad()
def init_codebook_(vq, x: torch.Tensor, dim: int, chunk: int = CHUNK) -> None:
    """Initialise ``vq`` (a ``vector_quantize_pytorch.VectorQuantize`` with ``kmeans_init=True``) by k-means
    on ``x`` ``(N, dim)`` (``dim``: the layer's input width): ``x`` goes through the layer's own input path (``project_in``, head split,
    the cosine codebook's l2 norm) and the codebook's ``init_embed_``, with the k-means chunked.

    Raises ``ValueError`` when the layer has no k-means init or is already initialised (a trained codebook
    is never overwritten)."""
    cb = getattr(vq, "_codebook", None)
    if not hasattr(cb, "initted") or not hasattr(cb, "init_embed_"):
        raise ValueError("init_codebook_: this vector-quantize-pytorch layer has no k-means init")
    if bool(cb.initted):
        raise ValueError("init_codebook_: the codebook is already initialised (kmeans_init=False, or trained)")
    if x.ndim != 2 or x.shape[1] != dim or x.shape[0] == 0:
        raise ValueError(f"init_codebook_: expected (N, {dim}) vectors with N >= 1, got {tuple(x.shape)}")
    z = vq.project_in(x.float().unsqueeze(0))  # (1, N, codebook_dim)
    z = vq.maybe_split_heads_from_input(z)  # (h, 1, N, d) with heads, else (1, N, d)
    z = cb.transform_input(z)
    flat = z.reshape(z.shape[0], -1, z.shape[-1]) if z.ndim == 4 else z
    with _library_kmeans_replaced(chunk):
        cb.init_embed_(flat)
