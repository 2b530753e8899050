"""Data-driven init of a baseline's codebook before the first training step.

A recipe's ``quantizer.kmeans_init_vectors: N`` (VQ only) makes :func:`train` encode at least N latent
vectors of the training set with the starting model and run the codebook's k-means init on all of
them (:meth:`~gq_plugin.lab.baselines.vqp.VQBaseline.init_codebook`), instead of vector-quantize-pytorch's
default of k-means on the first batch. It runs once, on a fresh start (a resumed run restores its
trained codebook), on every rank with the same images, so ranks start with the same codebook.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def collect_latents(wrapper, dataset, n: int, batch_size: int, seed: int, device=None, progress: bool = True) -> torch.Tensor:
    """At least ``n`` latent vectors (the posterior means the baseline quantizes) as ``(B, C, h, w)``.

    Draws the training set in a seeded random order of its own (``torch.Generator(seed)``; the training
    stream is not touched) and passes over it again while fewer than ``n`` positions have been seen
    (random crops differ between passes). Raises ``ValueError`` for an empty dataset or ``n < 1``."""
    from torch.utils.data import DataLoader, RandomSampler

    from ..adapters.wrapper import posterior_of
    from .data import images_of

    if n < 1:
        raise ValueError(f"kmeans_init_vectors must be >= 1, got {n}")
    if len(dataset) == 0:
        raise ValueError("kmeans_init_vectors: the training set is empty")
    gen = torch.Generator().manual_seed(int(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, generator=gen))
    was_training = wrapper.training
    wrapper.eval()
    out, seen = [], 0
    bar = tqdm(total=n, disable=not progress, desc="k-means init: encoding", unit="vec", dynamic_ncols=True)
    try:
        while seen < n:
            for batch in loader:
                x = images_of(batch)
                z = posterior_of(wrapper.model.encode(x if device is None else x.to(device))).mean
                out.append(z.float())
                positions = z[:, 0].numel()  # one vector per latent position
                bar.update(min(positions, n - seen))
                seen += positions
                if seen >= n:
                    break
    finally:
        bar.close()
        wrapper.train(was_training)
    return torch.cat(out)


def init_baseline_codebook(wrapper, dataset, batch_size: int, seed: int, device=None, progress: bool = True) -> int:
    """Run the bottleneck quantizer's data-driven k-means init if it asks for one (``kmeans_init_vectors``);
    returns the number of vectors used (0: nothing to do)."""
    q = getattr(getattr(wrapper, "bottleneck", None), "quantizer", None)
    n = int(getattr(q, "kmeans_init_vectors", 0) or 0)
    if not n:
        return 0
    z = collect_latents(wrapper, dataset, n, batch_size, seed, device, progress)
    q.init_codebook(z)
    return z[:, 0].numel()
