"""How token maps become sequences for x-transformers' ``AutoregressiveWrapper``.

``AutoregressiveWrapper`` models one token per sequence position. A tokenizer gives ``G`` codes per
latent position (``(B, G, h, w)``: ``G = C / m`` GQ sub-codebooks, 1 for VQ / FSQ / LFQ / BSQ,
``C`` for TokenBridge), each in ``[0, K)``. The sequence is **position-major, code-minor**: the
positions in raster order (row by row), and at each position its ``G`` codes one after the other::

    seq = [BOS, c(0,0)_0, ..., c(0,0)_{G-1}, c(0,1)_0, ..., c(h-1,w-1)_{G-1}]     length 1 + h*w*G

so code ``g`` of a position is predicted from every code of the earlier positions and codes
``0..g-1`` of its own: an exact chain-rule factorisation, and the summed cross-entropy is the
model's negative log-likelihood of the whole index map (in bits per image: comparable across
tokenizers). Codes of different sub-codebooks share one vocabulary of ``K`` entries (every GQ group
uses the same codebook size); a product code such as FSQ's ``prod(levels)`` grid is already one
index, one token. Fusing the ``G`` GQ codes into one token would need a ``K**G`` vocabulary.

``BOS = K`` is an input-only token: the network embeds ``K + 1`` tokens but predicts only ``K``
(x-transformers' ``logits_dim``), so sampling can never emit it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    """``codebook_size`` K and ``token_shape`` (G, h, w) of the index maps a prior models."""

    codebook_size: int
    token_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.token_shape) != 3 or any(int(s) < 1 for s in self.token_shape):
            raise ValueError(f"token_shape must be (G, h, w) of positive ints, got {self.token_shape!r}")
        if int(self.codebook_size) < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")

    @property
    def bos(self) -> int:
        return int(self.codebook_size)

    @property
    def num_tokens(self) -> int:
        """Tokens per image (``G * h * w``), the BOS not counted."""
        g, h, w = self.token_shape
        return g * h * w

    def to_sequence(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, G, h, w)`` -> ``(B, 1 + h*w*G)`` int64 with the BOS in front."""
        if tuple(indices.shape[1:]) != tuple(self.token_shape):
            raise ValueError(f"index maps of shape {tuple(indices.shape[1:])} do not match the prior's token shape {tuple(self.token_shape)}")
        seq = indices.long().permute(0, 2, 3, 1).reshape(indices.shape[0], -1)
        return torch.cat([torch.full((seq.shape[0], 1), self.bos, dtype=torch.long, device=seq.device), seq], 1)

    def to_indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, h*w*G)`` sampled tokens (no BOS) -> ``(B, G, h, w)``."""
        g, h, w = self.token_shape
        if tokens.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens per image, got {tokens.shape[-1]}")
        return tokens.long().reshape(tokens.shape[0], h, w, g).permute(0, 3, 1, 2).contiguous()
