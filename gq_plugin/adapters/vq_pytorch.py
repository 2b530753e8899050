"""vector-quantize-pytorch adapter: :class:`GaussianQuantize`, a GQ drop-in for ``VectorQuantize``.

Constructor vocabulary of ``VectorQuantize``: ``dim``, ``codebook_size``, ``codebook_dim``,
``heads``, ``separate_codebook_per_head``, ``accept_image_fmap``, ``channel_last``; call contract
``quantized, indices, loss = q(x)``.

**Input (decision):** GQ needs a posterior, so ``x`` carries ``2 * dim`` channels, mean first
then log-variance (like diffusers' "moments" and PR #234), on the channel axis of the layout;
alternatively pass ``q(mean, logvar)`` / ``q((mean, logvar))`` with ``dim`` channels each. The
*output* has ``dim`` channels, as ``VectorQuantize``'s. So the layer in front of the quantizer
must emit ``2 * dim`` channels (e.g. ``nn.Conv2d(..., 2 * dim, 1)``); everything after it is
unchanged.

**Indices** are shaped like ``VectorQuantize``'s: ``(b, n)`` / ``(b, h, w)`` / ``(b,)`` when a token
has one codebook index (``codebook_dim == dim``, ``heads == 1``), and ``(b, n, G)`` /
``(b, h, w, G)`` / ``(b, G)`` with ``G = dim / codebook_dim`` sub-codebooks ("heads") per token.
int64. Indices are also returned in training (``search_in_train=True`` by default here, as
``VectorQuantize`` always returns them; set it False to skip the search while training).

**Loss**: TDC loss in training, 0 in eval.

Differences from ``VectorQuantize``: there is no projection (``heads * codebook_dim`` must equal
``dim``; with ``heads`` given and ``codebook_dim`` omitted, ``codebook_dim = dim / heads``); all
heads share one fixed Gaussian codebook (``separate_codebook_per_head=True`` is accepted but
changes nothing -- a second seeded Gaussian codebook would be statistically identical); the
codebook is a fixed buffer (no EMA, k-means, dead-code expiry). ``mask``/``lens`` are not supported.
"""

from __future__ import annotations

import sys
import warnings

import torch

from ..quantizer import GaussianQuantizer


class GaussianQuantize(GaussianQuantizer):
    """Gaussian Quant + TDC with ``VectorQuantize``'s constructor and return conventions."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        accept_image_fmap: bool = False,
        channel_last: bool = True,
        search_in_train: bool = True,
        **gq_kwargs,
    ) -> None:
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if codebook_dim is None:
            if dim % heads:
                raise ValueError(f"heads={heads} must divide dim={dim} (GQ has no projection)")
            codebook_dim = dim // heads
        elif heads != 1 and heads * codebook_dim != dim:
            raise ValueError(
                f"heads * codebook_dim must equal dim for GQ (no projection): {heads} * {codebook_dim} != {dim}"
            )
        if separate_codebook_per_head:
            warnings.warn(
                "GaussianQuantize: all heads share one fixed Gaussian codebook; separate_codebook_per_head is ignored", stacklevel=2
            )
        for bad in ("accept_3d_fmap", "kmeans_init", "decay", "use_cosine_sim", "learnable_codebook", "commitment_weight"):
            if bad in gq_kwargs:
                raise TypeError(f"GaussianQuantize does not take VectorQuantize's {bad!r} (fixed Gaussian codebook, TDC loss)")
        super().__init__(dim, codebook_size, codebook_dim, accept_image_fmap=accept_image_fmap, channel_last=channel_last,
                         search_in_train=search_in_train, **gq_kwargs)
        self.heads = self.num_codebooks
        self.separate_codebook_per_head = separate_codebook_per_head
        _register_if_loaded()

    # ----------------------------------------------------------- index layouts

    def _to_vq_indices(self, idx: torch.Tensor | None) -> torch.Tensor | None:
        """core layout ((B,H,W,G) / (B,N,G) / (B,G)) -> VectorQuantize layout (drop G when 1)."""
        if idx is None:
            return None
        return idx[..., 0] if self.num_codebooks == 1 else idx

    def _from_vq_indices(self, indices: torch.Tensor) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor):
            raise ValueError(f"indices must be a tensor, got {type(indices).__name__}")
        g = self.num_codebooks
        if g == 1:
            indices = indices.unsqueeze(-1)
        elif indices.shape[-1] != g:
            raise ValueError(f"indices must end with the {g} heads axis, got {tuple(indices.shape)}")
        if self.accept_image_fmap and indices.ndim != 4:
            raise ValueError(f"indices must be (b, h, w{', heads' if g > 1 else ''}), got {tuple(indices.shape)}")
        return indices

    def _check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return super()._check_indices(self._from_vq_indices(indices))

    # ----------------------------------------------------------- public API

    def forward(self, x, logvar: torch.Tensor | None = None, generator: torch.Generator | None = None,
                return_loss_breakdown: bool = False):
        quantized, idx, loss = super().forward(x, logvar, generator=generator)
        out = (quantized, self._to_vq_indices(idx), loss)
        if return_loss_breakdown:
            return (*out, {"tdc": loss, **self.tdc.last_stats})
        return out

    @torch.no_grad()
    def quantize(self, x, logvar: torch.Tensor | None = None):
        z_hat, idx = super().quantize(x, logvar)
        return z_hat, self._to_vq_indices(idx)

    @torch.no_grad()
    def encode_indices(self, x, logvar: torch.Tensor | None = None) -> torch.Tensor:
        return self.quantize(x, logvar)[1]

    # Indices (VectorQuantize layout, read by the overridden _check_indices) -> the quantized
    # output in forward's layout; no projection, so the codes are the output.
    get_output_from_indices = GaussianQuantizer.dequant
    get_codes_from_indices = GaussianQuantizer.dequant
    indices_to_codes = GaussianQuantizer.dequant


def register_with_vector_quantize_pytorch() -> bool:
    """Add :class:`GaussianQuantize` to ``vector_quantize_pytorch.utils.QUANTIZE_KLASSES`` so the
    package's ``Sequential`` recognises it as the quantizer. Returns True if registered."""
    try:
        from vector_quantize_pytorch import utils
    except ImportError:
        return False
    klasses = getattr(utils, "QUANTIZE_KLASSES", None)
    if klasses is None:
        return False
    if GaussianQuantize not in klasses:
        utils.QUANTIZE_KLASSES = tuple(klasses) + (GaussianQuantize,)
    return True


def _register_if_loaded() -> None:
    if "vector_quantize_pytorch.utils" in sys.modules:
        register_with_vector_quantize_pytorch()
