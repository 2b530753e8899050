"""vector-quantize-pytorch baselines behind one API.

Every baseline quantizes a *deterministic* latent ``z`` of shape ``(B, C, H, W)`` (C channels, not
the 2C of a posterior) and returns ``(z_q, indices, aux_loss)``:

* ``z_q``: ``(B, C, H, W)`` (straight-through gradients where the library provides them);
* ``indices``: int64, ``(B, H, W)`` (one index per position) or ``(B, C, H, W)`` for the
  per-channel TokenBridge quantizer;
* ``aux_loss``: a scalar tensor (commitment / entropy loss; 0 where the method has none).

Attributes: ``codebook_size`` (per index), ``bits_per_token`` (bits per latent position),
``needs_posterior = False``. ``decode_indices(indices) -> z_q`` inverts the lookup (the "indices in"
half of a tokenizer: equal to the ``z_q`` of the forward pass that produced the indices, in eval). vector-quantize-pytorch is imported when a baseline is built.
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from .tokenbridge import TokenBridgeQuantizer

# FSQ levels from the FSQ paper (Mentzer et al. 2023, Table 1) for ~2^k codes
FSQ_LEVELS = {
    8: [8, 6, 5],
    10: [8, 5, 5, 5],
    12: [7, 5, 5, 5, 5],
    14: [8, 8, 8, 6, 5],
    16: [8, 8, 8, 5, 5, 5],
}


def _vqp():
    try:
        import vector_quantize_pytorch as vqp
    except ImportError as e:  # pragma: no cover
        raise ImportError("this baseline needs vector-quantize-pytorch: pip install 'gq-plugin[vq]'") from e
    return vqp


def _check_fmap(z: torch.Tensor, channels: int) -> None:
    if z.ndim != 4 or z.shape[1] != channels:
        raise ValueError(f"expected a (B, {channels}, H, W) latent, got {tuple(z.shape)}")


class BaselineQuantizer(nn.Module, abc.ABC):
    """The calling convention of every baseline (module docstring); subclasses implement ``forward`` and
    ``decode_indices``."""

    needs_posterior = False
    name = "baseline"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    codebook_size: int
    bits_per_token: float

    @abc.abstractmethod
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` latent -> ``(z_q, indices, aux_loss)`` (module docstring)."""

    @abc.abstractmethod
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices`` as returned by ``forward`` -> the quantized latent ``(B, C, H, W)``."""


class VQBaseline(BaselineQuantizer):
    """``VectorQuantize`` (EMA codebook, k-means init on the first batch).

    ``kmeans_init_vectors = N > 0`` asks the trainer to run the k-means init on N encoder latents before
    the first step instead (:meth:`init_codebook`; at least K of them, so that a large codebook does not
    start as duplicates of one batch's few hundred vectors)."""

    name = "vq"

    def __init__(self, channels: int, codebook_size: int, codebook_dim: int | None = None, decay: float = 0.8,
                 kmeans_init: bool = True, commitment_weight: float = 1.0, kmeans_init_vectors: int = 0, **kwargs) -> None:
        super().__init__(channels)
        kmeans_init_vectors = int(kmeans_init_vectors or 0)
        if kmeans_init_vectors < 0 or (kmeans_init_vectors and not kmeans_init):
            raise ValueError(f"kmeans_init_vectors must be >= 0 and needs kmeans_init=True, got {kmeans_init_vectors} "
                             f"(kmeans_init={kmeans_init})")
        self.kmeans_init_vectors = kmeans_init_vectors
        self.q = _vqp().VectorQuantize(dim=channels, codebook_size=codebook_size, codebook_dim=codebook_dim, decay=decay,
                                       kmeans_init=kmeans_init, commitment_weight=commitment_weight, accept_image_fmap=True, **kwargs)
        self.codebook_size = codebook_size
        self.bits_per_token = math.log2(codebook_size)

    def forward(self, z):
        _check_fmap(z, self.channels)
        z_q, idx, loss = self.q(z)
        return z_q, idx.long(), loss.reshape(())

    def decode_indices(self, indices):
        return self.q.get_output_from_indices(indices.long())

    def init_codebook(self, z: torch.Tensor) -> None:
        """k-means init of the codebook on latents ``z`` ``(B, C, H, W)`` (every position a vector), through
        the layer's own projection and codebook (:func:`~gq_plugin.lab.baselines.kmeans.init_codebook_`,
        chunked, so N >= K = 2^16 vectors fit in memory)."""
        from .kmeans import init_codebook_

        _check_fmap(z, self.channels)
        init_codebook_(self.q, z.permute(0, 2, 3, 1).reshape(-1, self.channels), self.channels)


class SimVQBaseline(VQBaseline):
    """``SimVQ`` (Zhu et al. 2024): a frozen random codebook through a learned linear map (no EMA, no
    dead codes by construction), rotation trick on; a second learned-VQ baseline for large codebooks.
    Same calling convention as :class:`VQBaseline` (its ``forward``)."""

    name = "simvq"

    def __init__(self, channels: int, codebook_size: int, rotation_trick: bool = True, commitment_weight: float = 1.0, **kwargs) -> None:
        BaselineQuantizer.__init__(self, channels)
        self.kmeans_init_vectors = 0  # a frozen random codebook: no k-means init
        self.q = _vqp().SimVQ(dim=channels, codebook_size=codebook_size, channel_first=True, rotation_trick=rotation_trick,
                              commitment_weight=commitment_weight, **kwargs)
        self.codebook_size, self.bits_per_token = codebook_size, math.log2(codebook_size)


class FSQBaseline(BaselineQuantizer):
    """``FSQ(levels)`` with projections from/to C channels."""

    name = "fsq"

    def __init__(self, channels: int, levels: list[int], **kwargs) -> None:
        super().__init__(channels)
        self.levels = list(levels)
        self.q = _vqp().FSQ(levels=self.levels, dim=channels, **kwargs)
        self.codebook_size = int(math.prod(self.levels))
        self.bits_per_token = math.log2(self.codebook_size)

    def forward(self, z):
        _check_fmap(z, self.channels)
        z_q, idx = self.q(z)
        return z_q, idx.long(), torch.zeros((), device=z.device)

    def decode_indices(self, indices):
        return self.q.indices_to_codes(indices.long())


class LFQBaseline(BaselineQuantizer):
    """``LFQ`` (lookup-free, ``log2 K`` binary codes); ``spherical=True`` gives BSQ."""

    name = "lfq"

    def __init__(self, channels: int, codebook_size: int, spherical: bool = False, entropy_loss_weight: float = 0.1, **kwargs) -> None:
        super().__init__(channels)
        if codebook_size < 2 or codebook_size & (codebook_size - 1):
            raise ValueError(f"LFQ/BSQ codebook_size must be a power of 2, got {codebook_size}")
        self.q = _vqp().LFQ(dim=channels, codebook_size=codebook_size, spherical=spherical,
                            entropy_loss_weight=entropy_loss_weight, **kwargs)
        self.name = "bsq" if spherical else "lfq"
        self.codebook_size = codebook_size
        self.bits_per_token = math.log2(codebook_size)

    def forward(self, z):
        _check_fmap(z, self.channels)
        out = self.q(z)
        z_q, idx, aux = out[0], out[1], out[2]
        return z_q, idx.long(), torch.as_tensor(aux, device=z.device).reshape(())

    def decode_indices(self, indices):
        return self.q.indices_to_codes(indices.long())


class TokenBridgeBaseline(BaselineQuantizer):
    """TokenBridge's per-channel quantizer on ``(B, C, H, W)``: ``C * bits`` bits per position.

    ``scale`` multiplies the latent before quantization (TokenBridge: 0.2325 for MAR's KL-16
    VAE; 1.0 here by default) and divides the dequantised values after.
    """

    name = "tokenbridge"

    def __init__(self, channels: int, bits: int = 6, scale: float = 1.0, quant_min: float = -5.0, quant_max: float = 5.0,
                 std_range: float = 3.0) -> None:
        super().__init__(channels)
        self.q = TokenBridgeQuantizer(bits, quant_min, quant_max, std_range)
        self.scale = float(scale)
        self.codebook_size = self.q.quant_levels
        self.bits_per_token = float(channels * bits)

    def forward(self, z):
        _check_fmap(z, self.channels)
        idx, deq = self.q.quantize(z * self.scale)
        z_hat = deq / self.scale
        z_q = z + (z_hat - z).detach()  # straight-through
        return z_q, idx, torch.zeros((), device=z.device)

    def dequantize(self, indices):
        return self.q.dequantize(indices) / self.scale

    decode_indices = dequantize
